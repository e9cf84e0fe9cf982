"""``hessfine crosscheck``: this tool's Hessian trace and top eigenvalues next to PyHessian's.

PyHessian (Yao, Gholami, Keutzer & Mahoney, "PyHessian: Neural Networks Through the Lens of the
Hessian", IEEE BigData 2020) estimates, for the mean loss L̄ = (1/N) Σ_n ℓ(f(x_n), y_n) over one
batch and the parameters that require gradients,

* Tr ∇²L̄ by Hutchinson's estimator with Rademacher probes z: E[zᵀ ∇²L̄ z] = Tr ∇²L̄;
* the top eigenvalues of ∇²L̄ by power iteration with deflation.

Marking only the selected layers as trainable makes its Hessian the selected-parameter Hessian
(cross-layer blocks included). Its trace is Σ_i Tr of the diagonal blocks, which equals
Σ_i mean_x Tr[H_i(x)] — the sum of this tool's per-layer ``trace.mean`` (docs/schema.md) — and its
top eigenvalues are those of the same matrix as
:func:`hessfine.bounds.estimators.spectra.whole_top_eigenvalues`.

PyHessian's own behaviour that this module works around or reports (pyhessian 0.1):

* ``trace(maxIter, tol)`` stops as soon as two consecutive running means agree to ``tol``
  relative to the (signed) running mean, so it may use only a handful of probes (and always stops
  after two when the trace is negative). It is called with ``tol = -inf`` so that it uses exactly
  ``probes`` probes; its standard error is the sample standard deviation over √probes.
* power iteration converges to the eigenvalue of largest *magnitude*; its stopping rule is a
  relative change below ``tol`` (1e-3 by default) between consecutive Rayleigh quotients, so its
  value is accurate to roughly that tolerance; vectors are normalised by ‖v‖ + 1e-6, which biases
  the value by about −2e-6/‖Hv‖ relatively.
* random vectors are drawn from the global generator with the default dtype: both are set here
  (seeded, inside :func:`torch.random.fork_rng`; default dtype = the model's dtype).
* ``hessian(..., cuda=True)`` moves the data with ``.cuda()`` but not the model; here ``cuda``
  follows the model's device and the data are moved beforehand.
* its constructor calls ``loss.backward(create_graph=True)``, which leaves graph-carrying ``.grad``
  fields (a reference cycle); they are reset to ``None`` afterwards, and ``requires_grad`` flags
  are restored.
* ``density()`` calls ``torch.eig``, removed from PyTorch, so spectral densities are not compared.
* its loss is ``criterion(model(inputs), targets)``: the criterion here takes the logits out of a
  Hugging Face model's output first.

The model is loaded as ``hessfine measure`` loads the fine-tuned one: a Hugging Face directory
(``--model hf``) by transformers' ``from_pretrained``; a PEFT adapter merged into its base model
(``--reference``, else the local directory its ``adapter_config.json`` names;
:mod:`hessfine.analysis.hf_loading`), its layers by default those the adapter changes.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> rows = crosscheck(model, x, y, layers=["0.weight", "2.weight"], probes=50)
    >>> [row.quantity for row in rows]
    ['trace', 'eigenvalue_1']
"""

from __future__ import annotations

import argparse
import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from hessfine.analysis.errors import InputError
from hessfine.analysis.progress import add_quiet_option
from hessfine.bounds.functional import FunctionalModel, logits_of
from hessfine.bounds.safe_autodiff import differentiable
from torch import Tensor, nn


@dataclass(frozen=True)
class CrosscheckRow:
    """One compared quantity: our estimate and PyHessian's, with standard errors where defined."""

    quantity: str
    ours: float
    ours_stderr: float | None
    pyhessian: float
    pyhessian_stderr: float | None
    relative_difference: float


def relative_difference(ours: float, theirs: float) -> float:
    """|ours − theirs| / |theirs| (0 when both vanish, ∞ when only theirs does)."""
    if theirs == 0.0:
        return 0.0 if ours == 0.0 else math.inf
    return abs(ours - theirs) / abs(theirs)


@contextlib.contextmanager
def _only_trainable(model: nn.Module, layers: Sequence[str]) -> Iterator[None]:
    """Mark exactly ``layers`` as requiring gradients; restore flags and clear ``.grad`` after."""
    named = dict(model.named_parameters())
    missing = [name for name in layers if name not in named]
    if missing:
        raise InputError(f"layers {missing} are not parameters of the model; check --layers")
    flags = {name: p.requires_grad for name, p in named.items()}
    grads = {name: p.grad for name, p in named.items()}
    chosen = set(layers)
    try:
        for name, p in named.items():
            p.requires_grad_(name in chosen)
            p.grad = None
        yield
    finally:
        for name, p in named.items():
            p.grad = grads[name]
            p.requires_grad_(flags[name])


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def pyhessian_engine(
    model: nn.Module, x: Tensor, y: Tensor, *, layers: Sequence[str], seed: int = 0
) -> Iterator[object]:
    """A ``pyhessian.hessian`` for the mean cross-entropy of (x, y) w.r.t. ``layers`` only.

    Inside the context only ``layers`` require gradients, the default dtype is the model's, the
    global generator is seeded with ``seed`` (and restored after), attention uses the
    differentiable math kernel, and ``.grad`` fields are reset on exit.
    """
    from pyhessian import hessian as PyHessian

    param = next(model.parameters())
    device = param.device
    devices = [device] if device.type == "cuda" else []
    with (
        _only_trainable(model, layers),
        _default_dtype(param.dtype),
        differentiable(),
        torch.random.fork_rng(devices=devices),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        torch.manual_seed(seed)
        yield PyHessian(
            model,
            lambda output, target: nn.functional.cross_entropy(logits_of(output), target),
            data=(x.to(device), y.to(device)),
            cuda=device.type == "cuda",
        )


def pyhessian_estimates(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    layers: Sequence[str],
    probes: int = 200,
    top_k: int = 1,
    seed: int = 0,
    power_iterations: int = 100,
    power_tol: float = 1e-3,
) -> tuple[list[float], list[float]]:
    """PyHessian's Hutchinson samples zᵀ∇²L̄z (exactly ``probes``) and its ``top_k`` eigenvalues.

    The Hessian is that of the mean cross-entropy over the batch w.r.t. ``layers`` only.
    """
    with pyhessian_engine(model, x, y, layers=layers, seed=seed) as engine:
        samples = engine.trace(maxIter=probes, tol=-math.inf)
        values, _ = engine.eigenvalues(maxIter=power_iterations, tol=power_tol, top_n=top_k)
    return [float(s) for s in samples], [float(v) for v in values]


def crosscheck(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    layers: Sequence[str],
    probes: int = 200,
    top_k: int = 1,
    seed: int = 0,
    power_iterations: int = 100,
    power_tol: float = 1e-3,
) -> list[CrosscheckRow]:
    """Compare the trace and the ``top_k`` eigenvalues of the selected-layer Hessian of the mean loss.

    Ours: Σ_i of :func:`hessfine.bounds.estimators.traces.layer_traces` means and
    :func:`hessfine.bounds.estimators.spectra.whole_top_eigenvalues`; the standard errors of the
    layers are combined in quadrature, which ignores the correlation of the layers' samples drawn
    from the same joint probe (the cross-layer terms z_iᵀH_ij z_j enter both layers' samples), so
    it can understate the standard error of the sum. Theirs: :func:`pyhessian_estimates`. Rows are
    ``trace`` and ``eigenvalue_1`` … ``eigenvalue_k`` with |ours − theirs| / |theirs|; when
    Lanczos exhausts its Krylov space after m < k steps (a Hessian with fewer than k distinct
    eigenvalues seen from the start vector), only the first m eigenvalues are compared.
    """
    from hessfine.bounds.estimators.spectra import whole_top_eigenvalues
    from hessfine.bounds.estimators.traces import layer_traces

    layers = list(layers)
    if not layers:
        raise InputError("no layers selected; pass --layers patterns that match weights")
    named = dict(model.named_parameters())
    missing = [name for name in layers if name not in named]
    if missing:
        raise InputError(f"layers {missing} are not parameters of the model; check --layers")
    if probes < 2:
        raise InputError(f"--probes {probes}: need at least 2 probes for a standard error")
    dim = sum(named[name].numel() for name in layers)
    if top_k > dim:
        raise InputError(
            f"--top-k {top_k}: the selected layers have only {dim} weights; pass --top-k ≤ {dim}"
        )
    fmodel, params = FunctionalModel.from_module(model)
    device = x.device
    batches = [(x, y)]
    traces = layer_traces(
        fmodel,
        params,
        layers,
        batches,
        probes=probes,
        generator=torch.Generator(device).manual_seed(seed),
    )
    ours_trace = sum(float(traces[name].mean) for name in layers)
    ours_stderr = math.sqrt(sum(float(traces[name].stderr) ** 2 for name in layers))
    spectrum = whole_top_eigenvalues(
        fmodel,
        params,
        layers,
        batches,
        k=top_k,
        generator=torch.Generator(device).manual_seed(seed),
    )
    samples, theirs_values = pyhessian_estimates(
        model,
        x,
        y,
        layers=layers,
        probes=probes,
        top_k=top_k,
        seed=seed,
        power_iterations=power_iterations,
        power_tol=power_tol,
    )
    theirs_trace = sum(samples) / len(samples)
    variance = sum((s - theirs_trace) ** 2 for s in samples) / (len(samples) - 1)
    rows = [
        CrosscheckRow(
            quantity="trace",
            ours=ours_trace,
            ours_stderr=ours_stderr,
            pyhessian=theirs_trace,
            pyhessian_stderr=math.sqrt(variance / len(samples)),
            relative_difference=relative_difference(ours_trace, theirs_trace),
        )
    ]
    for j, (ours_value, theirs_value) in enumerate(
        zip(spectrum.values, theirs_values[: len(spectrum.values)], strict=True), start=1
    ):
        rows.append(
            CrosscheckRow(
                quantity=f"eigenvalue_{j}",
                ours=float(ours_value),
                ours_stderr=None,
                pyhessian=theirs_value,
                pyhessian_stderr=None,
                relative_difference=relative_difference(float(ours_value), theirs_value),
            )
        )
    return rows


def format_table(rows: Sequence[CrosscheckRow]) -> str:
    """A markdown table of the rows, side by side."""

    def pm(value: float, stderr: float | None) -> str:
        return f"{value:.6g}" if stderr is None else f"{value:.6g} ± {stderr:.2g}"

    lines = [
        "| quantity | hessfine | PyHessian | relative difference |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.quantity} | {pm(row.ours, row.ours_stderr)} "
            f"| {pm(row.pyhessian, row.pyhessian_stderr)} | {row.relative_difference:.2e} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hessfine crosscheck``."""
    parser.description = (
        "Compare this tool's Hessian trace and top eigenvalues with PyHessian's on the same "
        "model, parameters and batch (Hessian of the mean cross-entropy w.r.t. the selected "
        "layers)."
    )
    parser.epilog = (
        "examples:\n"
        "  hessfine crosscheck                       # random resnet18, 64 random 3x32x32 images\n"
        "  hessfine crosscheck --model torchvision:resnet18 --checkpoint run/epoch_10.safetensors"
        " --data digits:test --samples 128 --probes 500 --top-k 3\n"
        "  hessfine crosscheck --layers 'layer4.*' 'fc.weight'\n"
        "  hessfine crosscheck --model hf --checkpoint lora_adapter/ --reference vit_base/"
        " --data images.pt --samples 32"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--model", default="torchvision:resnet18", help="model SPEC (default torchvision:resnet18)"
    )
    parser.add_argument(
        "--model-kwargs",
        default='{"num_classes": 10}',
        help="JSON keyword arguments of the model factory (default '{\"num_classes\": 10}')",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint to load (optional): a file, a Hugging Face directory (--model hf) or a "
        "PEFT adapter directory (merged into its base model)",
    )
    parser.add_argument(
        "--reference",
        default=None,
        metavar="BASE",
        help="the base model of a PEFT adapter --checkpoint (default: the local directory its "
        "adapter_config.json names)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow checkpoints that contain pickled code",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="data SPEC (default: random 3x32x32 images with random labels)",
    )
    parser.add_argument(
        "--samples", type=int, default=64, help="examples in the batch, class-stratified (64)"
    )
    parser.add_argument("--probes", type=int, default=200, help="Hutchinson probes (200)")
    parser.add_argument("--top-k", type=int, default=1, help="number of top eigenvalues (1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--layers",
        nargs="+",
        action="extend",
        default=None,
        metavar="GLOB",
        help="parameter-name globs (repeated options add up)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto|cpu|cuda|cuda:N (default auto: cuda if available)"
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    add_quiet_option(parser)


def _batch(args: argparse.Namespace, model: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A seeded class-stratified choice of ``--samples`` examples of ``--data``
    (:mod:`hessfine.analysis.sampling`), or a seeded random image batch."""
    if args.data is None:
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.samples, 3, 32, 32, generator=g, dtype=dtype)
        with torch.no_grad():
            classes = logits_of(model(x[:1])).shape[-1]
        return x, torch.randint(0, classes, (args.samples,), generator=g)
    from hessfine.analysis.data import check_labels, load_data
    from hessfine.analysis.sampling import stratified_sample

    data = load_data(args.data, trust=args.trust_checkpoint)
    sample = stratified_sample(
        data.y, args.samples, generator=torch.Generator().manual_seed(args.seed)
    )
    x, y = next(iter(data.subset(sample.indices).batches(args.samples, dtype=dtype)))
    if not isinstance(x, Tensor):
        raise InputError(f"--data {args.data}: crosscheck needs tensor inputs (PyHessian)")
    with torch.no_grad():
        classes = logits_of(model(x[:1])).shape[-1]
    check_labels(data, classes, option="--data")
    return x, y


def load_model(args: argparse.Namespace, dtype: torch.dtype) -> tuple[nn.Module, list[str]]:
    """The model of ``--model`` in ``dtype`` with the weights of ``--checkpoint`` (module docs)
    and the selected layers: ``--layers``, else an adapter's layers, else the default selection."""
    from hessfine.analysis.checkpoints import (
        adapter_base,
        align,
        apply_adapter,
        load_checkpoint,
        select_layers,
    )
    from hessfine.analysis.hf_loading import load_pretrained, load_reference, pretrained_route
    from hessfine.analysis.model_specs import build_model, parse_model_kwargs
    from hessfine.analysis.sources.hf import model_directory

    kwargs = parse_model_kwargs(args.model_kwargs)
    if args.checkpoint is None:
        if args.reference is not None:
            raise InputError(
                "--reference is the base model of a PEFT adapter --checkpoint; drop it"
            )
        model = build_model(args.model, kwargs).to(dtype)
        return model, select_layers(model, args.layers)
    label, trust = "--checkpoint", args.trust_checkpoint
    hf_files = model_directory(args.checkpoint) is not None
    checkpoint = load_checkpoint(args.checkpoint, trust=trust, label=label, tensors=not hf_files)
    adapter = checkpoint.adapter
    if adapter is None and args.reference is not None:
        raise InputError(
            f"--reference is the base model of a PEFT adapter, and --checkpoint {args.checkpoint} "
            "is not one; drop --reference"
        )
    base = (
        None
        if adapter is None
        else adapter_base(
            adapter,
            args.reference,
            label=label,
            fix="pass --reference the base model's directory (save_pretrained) or weights file",
        )
    )
    model_source = base or str(args.checkpoint)
    if pretrained_route(args.model, checkpoint, model_source):
        loaded = load_pretrained(
            checkpoint,
            model_source,
            spec=args.model,
            model_kwargs=kwargs,
            dtype=dtype,
            layers=tuple(args.layers or ()),
            trust=trust,
        )
        return loaded.module, loaded.layers
    given = Path(model_source).expanduser()
    model = build_model(args.model, kwargs, hf_directory=given if given.is_dir() else given.parent)
    model = model.to(dtype)
    if base is not None:
        checkpoint = apply_adapter(checkpoint, load_reference(base, model, trust=trust))
    elif hf_files:  # a Hugging Face directory built from another spec: its tensors by file names
        checkpoint = load_checkpoint(args.checkpoint, trust=trust, label=label)
    layers = select_layers(model, list(args.layers or checkpoint.layers or ()))
    align(model, checkpoint, checkpoint, layers=layers)  # loads and checks the weights
    return model, layers


def run(args: argparse.Namespace) -> int:
    """Run ``hessfine crosscheck``; print the side-by-side table; return 0."""
    from hessfine.analysis.measurement_inputs import unused_layers
    from hessfine.analysis.model_specs import resolve_device

    if args.samples < 1:
        raise InputError(f"--samples {args.samples}: must be at least 1")
    if args.top_k < 1:
        raise InputError(f"--top-k {args.top_k}: must be at least 1")
    dtype = getattr(torch, args.dtype)
    model, layers = load_model(args, dtype)
    device = resolve_device(args.device)
    model = model.to(dtype=dtype).eval()
    x, y = _batch(args, model, dtype)
    model = model.to(device)
    fmodel, params = FunctionalModel.from_module(model)
    unused = unused_layers(fmodel, params, layers, x[:1].to(device), y[:1].to(device))
    if len(unused) == len(layers):
        raise InputError("none of the selected layers is used in eval mode; check --layers")
    if unused:
        if not args.quiet:
            print(
                f"note: left out layers not used in eval mode (zero Hessian): {', '.join(unused)}"
            )
        layers = [name for name in layers if name not in unused]
    rows = crosscheck(
        model,
        x.to(device),
        y.to(device),
        layers=layers,
        probes=args.probes,
        top_k=args.top_k,
        seed=args.seed,
    )
    params = dict(model.named_parameters())
    if not args.quiet:
        print(
            f"model {args.model}, {len(layers)} layers, {sum(params[n].numel() for n in layers)} "
            f"weights, {x.shape[0]} examples, {args.probes} probes, {args.dtype} on {device}"
        )
    print(format_table(rows))
    if len(rows) - 1 < args.top_k:
        print(
            f"note: only {len(rows) - 1} of {args.top_k} eigenvalues compared: the Krylov space of "
            "the Lanczos start vector is exhausted (fewer distinct eigenvalues)"
        )
    return 0
