"""The ``hessfine`` command line (docs/cli.md): a thin layer over the Python API.

Exit status 0 on success; 2 on a usage or input error, with one line on stderr naming the bad
input and the fix (``--debug`` adds the traceback); 1 on an unexpected internal error.
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

from hessfine.analysis.errors import InputError
from hessfine.analysis.progress import add_quiet_option

MEASURE_EXAMPLES = """\
examples:
  hessfine measure ft.safetensors --reference pretrained.safetensors \\
      --model torchvision:resnet18 --model-kwargs '{"num_classes": 10}' \\
      --data train/ --eval-data val/ --out results/ft
  hessfine measure runs/ --out results --samples 128 --trace --eigen 3   # every run, resumable
  hessfine measure ft.pt --reference pre.pt --model mymodels.py:build --data train.pt \\
      --out out --noise-sigma 1e-3 3e-3 1e-2 --certificate
  hessfine measure gpt2_ft/ --reference gpt2_base/ --model hf --task causal-lm \\
      --data tokens.pt --out out/lm      # tokens.pt: {'x': {'input_ids', 'attention_mask'}}
  hessfine measure bert_ft/ --reference bert_base/ --data reviews:train --text-column text \
      --out out/bert                     # raw text, tokenized by the saved tokenizer
"""


class _Parser(argparse.ArgumentParser):
    """argparse with single-line errors and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _samples(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'all', got {text!r}"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'all', got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _add_measure_arguments(parser: argparse.ArgumentParser) -> None:
    from hessfine.analysis.sources.processors import add_processing_options
    from hessfine.analysis.tasks import TASKS

    parser.description = (
        "Per-layer Hessian quadratic forms v_iᵀ H_i⁺(x) v_i of the weight change, traces, "
        "spectra, noise stability and the PAC-Bayes bounds of Ju, Li & Zhang (ICML 2022) for "
        "one fine-tuned checkpoint or every checkpoint in a directory of runs."
    )
    parser.epilog = MEASURE_EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add = parser.add_argument
    add(
        "checkpoint", metavar="CHECKPOINT", help="fine-tuned checkpoint file or directory (of runs)"
    )
    add("--reference", metavar="REF", help="pretrained checkpoint (default: from the run manifest)")
    add(
        "--data",
        metavar="TRAIN",
        help="training data: ImageFolder dir, .pt, .npz, datasets DIR[:SPLIT], digits:train",
    )
    add("--eval-data", metavar="EVAL", help="evaluation data, for the measured generalization gap")
    add(
        "--input-columns",
        nargs="+",
        action="extend",
        metavar="COL",
        help="datasets directory: input columns (default input_ids attention_mask)",
    )
    add("--label-column", metavar="COL", help="datasets directory: label column (default label)")
    add_processing_options(parser)
    add("--out", required=True, metavar="DIR", help="output directory")
    add(
        "--model",
        metavar="SPEC",
        help="torchvision:NAME, timm:NAME, hf, file.py:FACTORY, pkg.mod:FACTORY",
    )
    add(
        "--model-kwargs",
        metavar="JSON",
        help="keyword arguments of the model factory (JSON object)",
    )
    add(
        "--estimator",
        default="auto",
        choices=["auto", "block", "positive", "ggn", "reference-code"],
    )
    add(
        "--task",
        choices=TASKS,
        help="the per-example loss, the model's own (docs/inputs.md, Tasks): classification (y: "
        "(N,) classes), token-classification (y: (N, T), -100 ignored), regression (y: (N,) or "
        "(N, L) numbers; squared error), multi-label (y: (N, L) of 0/1), causal-lm (y: (N, T) "
        "unshifted, or absent), seq2seq-lm (y: decoder labels (N, T)); one example is one "
        "sequence for the token tasks. Default: from a Hugging Face model's config and class, "
        "else classification",
    )
    add(
        "--lanczos-steps",
        type=int,
        default=128,
        metavar="K",
        help="most Lanczos steps per example for the positive part (default 128)",
    )
    add(
        "--samples",
        type=_samples,
        default=256,
        metavar="N|all",
        help="examples for the Hessian maxima, traces, eigenvalues and noise (default 256; "
        "see --sample-order)",
    )
    add(
        "--sample-order",
        default="stratified",
        choices=["stratified", "file"],
        help="which N examples: a seeded class-stratified sample (default) or the first N in file "
        "order",
    )
    add(
        "--batch-size",
        type=int,
        metavar="B",
        help="examples per batch, the most per call (default 32; reference-code: 4, its batch)",
    )
    add(
        "--max-memory",
        metavar="SIZE",
        help="bound on the peak memory (CPU: resident set; CUDA: allocated), model included: "
        "bytes, a size (6GiB, 500MB) or a fraction (0.5) of the memory available at start; "
        "calls are sized to it from measured probe calls (default 0.5 on the CPU, 0.8 on CUDA)",
    )
    add("--hessian-split", default="train", choices=["train", "eval"])
    add(
        "--layers",
        nargs="+",
        action="extend",
        metavar="GLOB",
        help="parameter-name globs overriding the default layers",
    )
    add(
        "--head-reference",
        default=None,
        metavar="zero|PATH",
        help="W^(s) of a new head (default: the run manifest's head_reference, else zero)",
    )
    add(
        "--timm-weights",
        default="raw",
        choices=["raw", "ema"],
        help="timm train.py checkpoints: the raw weights (state_dict) or the EMA weights "
        "(state_dict_ema)",
    )
    add(
        "--trace", action="store_true", help="per-layer Hessian traces (mean and positive-part max)"
    )
    add(
        "--trace-probes", type=int, default=100, metavar="P", help="Hutchinson probes (default 100)"
    )
    add(
        "--positive-trace-probes",
        type=int,
        default=16,
        metavar="P",
        help="SLQ probes per example for the positive-part trace max on large smooth layers "
        "(default 16; layers with at most P·K weights are exact)",
    )
    add(
        "--positive-rtol",
        type=float,
        default=1e-2,
        metavar="R",
        help="accuracy of the positive part relative to the layer max at which an example's "
        "Lanczos stops (default 1e-2; 0 = always K steps)",
    )
    add(
        "--positive-target",
        default="max",
        choices=["max", "mean"],
        help="what the positive part's Lanczos runs converge to --positive-rtol: the layer's "
        "max (default; examples that cannot attain it stop early, so the mean is an interval) "
        "or the mean too (every example; several times the cost)",
    )
    add("--trace-method", default="hutchinson", choices=["hutchinson", "hutch++"])
    add("--eigen", type=int, default=0, metavar="K", help="top-K eigenvalues per layer and overall")
    add(
        "--density", action="store_true", help="eigenvalue density by SLQ, written to spectrum.json"
    )
    add(
        "--noise-sigma",
        type=float,
        nargs="+",
        action="extend",
        default=[],
        metavar="S",
        help="noise-stability scales σ",
    )
    add(
        "--noise-draws",
        type=int,
        default=50,
        metavar="D",
        help="antithetic noise pairs per σ (default 50)",
    )
    add("--noise-relative", action="store_true", help="noise σ·|w| instead of σ")
    add("--epsilon", type=float, default=0.0, metavar="E", help="ε of Theorem 2.1 (default 0)")
    add("--loss-bound", type=float, metavar="C", help="loss bound C (default: largest loss seen)")
    add("--n-train", type=int, metavar="N", help="training-set size n (default: size of --data)")
    add("--certificate", action="store_true", help="numerical PAC-Bayes certificate")
    add("--device", default="auto", metavar="auto|cpu|cuda|cuda:N")
    add("--dtype", default="float32", choices=["float32", "float64"])
    add("--seed", type=int, default=0)
    add(
        "--image-size",
        type=int,
        default=224,
        metavar="PX",
        help="ImageFolder crop size (default 224)",
    )
    add("--trust-checkpoint", action="store_true", help="allow pickled objects (runs their code)")
    add("--verbose", action="store_true", help="print the layer alignment table")
    add_quiet_option(parser)
    add(
        "--distribute",
        default="examples",
        choices=["examples", "checkpoints"],
        help="under torchrun: share each checkpoint's examples (default) or spread a directory "
        "of runs over the processes, one checkpoint per process at a time",
    )


def _run_measure(args: argparse.Namespace) -> int:
    from hessfine.analysis.distributed import detect
    from hessfine.analysis.measure import MeasureSettings, measure_path
    from hessfine.analysis.model_specs import parse_model_kwargs
    from hessfine.analysis.sources.processors import processing_options

    settings = MeasureSettings(
        estimator=args.estimator,
        task=args.task,
        lanczos_steps=args.lanczos_steps,
        positive_rtol=args.positive_rtol,
        positive_target=args.positive_target,
        samples=args.samples,
        sample_order=args.sample_order,
        batch_size=args.batch_size,
        max_memory=args.max_memory,
        hessian_split=args.hessian_split,
        layers=None if args.layers is None else tuple(args.layers),
        head_reference=args.head_reference,
        trace=args.trace,
        trace_probes=args.trace_probes,
        positive_trace_probes=args.positive_trace_probes,
        trace_method=args.trace_method,
        eigen=args.eigen,
        density=args.density,
        noise_sigma=tuple(args.noise_sigma),
        noise_draws=args.noise_draws,
        noise_relative=args.noise_relative,
        epsilon=args.epsilon,
        loss_bound=args.loss_bound,
        n_train=args.n_train,
        certificate=args.certificate,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        image_size=args.image_size,
        timm_weights=args.timm_weights,
    )
    settings.validate()
    context = detect(args.device)
    try:
        written = measure_path(
            args.checkpoint,
            out=args.out,
            settings=settings,
            quiet=args.quiet,
            verbose=args.verbose,
            context=context,
            distribute=args.distribute,
            reference=args.reference,
            data=args.data,
            eval_data=args.eval_data,
            model=args.model,
            model_kwargs=None
            if args.model_kwargs is None
            else parse_model_kwargs(args.model_kwargs),
            trust=args.trust_checkpoint,
            input_columns=None if args.input_columns is None else tuple(args.input_columns),
            label_column=args.label_column,
            processing=processing_options(args),
        )
    finally:
        context.close()
    if not args.quiet:
        for path in written:
            print(f"wrote {path}")
    return 0


def _subcommands() -> dict[str, tuple[str, Callable, Callable]]:
    """name → (help, add_arguments, run); imported lazily so --help stays fast."""
    from hessfine.analysis import compare, crosscheck, demo
    from hessfine.finetune import cli as finetune_cli

    return {
        "measure": (
            "measure Hessian quantities and bounds of checkpoints",
            _add_measure_arguments,
            _run_measure,
        ),
        "finetune": (
            "fine-tune a model with one of the methods",
            finetune_cli.add_arguments,
            finetune_cli.run,
        ),
        "compare": (
            "collect measurements: comparison.csv, correlations, figures",
            compare.add_arguments,
            compare.run,
        ),
        "figures": (
            "redraw figures from result files",
            compare.figures_add_arguments,
            compare.figures_run,
        ),
        "demo": (
            "the paper's study end to end: MNIST → UCI digits, no downloads",
            demo.add_arguments,
            demo.run,
        ),
        "crosscheck": (
            "compare traces and eigenvalues with PyHessian",
            crosscheck.add_arguments,
            crosscheck.run,
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    """The ``hessfine`` parser with all subcommands."""
    parser = _Parser(
        prog="hessfine",
        description="Hessian-based generalization analysis of fine-tuned networks "
        "(Ju, Li & Zhang, ICML 2022).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (help_text, add_arguments, run) in _subcommands().items():
        child = sub.add_parser(name, help=help_text)
        add_arguments(child)
        child.add_argument("--debug", action="store_true", help="show tracebacks")
        child.add_argument(
            "--threads",
            type=_positive,
            metavar="N",
            help="torch intra-op threads (default: torch's choice; 1 on a busy machine)",
        )
        child.set_defaults(handler=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hessfine`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # torch 2.14 warns about its own use of torch.jit.script when forward-mode AD first loads.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
    try:
        args = build_parser().parse_args(argv)
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        return int(args.handler(args) or 0)
    except SystemExit as stop:
        return int(stop.code or 0) if isinstance(stop.code, int) else 2
    except InputError as err:
        if debug:
            traceback.print_exc()
        print(f"hessfine: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hessfine: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 — the last line of defence of the command line
        if debug:
            traceback.print_exc()
        print(
            f"hessfine: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
