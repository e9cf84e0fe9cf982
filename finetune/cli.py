"""``hessfine finetune``: fine-tune with one of the methods in docs/finetune.md#methods and write a
run directory.

The command builds the model from ``--model`` (randomly initialised with ``--seed``), copies in
every tensor of ``--reference`` whose name and shape match (a head for another number of classes
keeps its fresh initialisation; a PEFT adapter is merged into its base model first, and a Hugging
Face model directory is loaded by ``from_pretrained`` for a ``--model hf`` model:
:func:`hessfine.analysis.hf_loading.load_reference`), optionally corrupts the training labels with class-conditional
noise, fine-tunes and writes ``--out`` (:mod:`hessfine.finetune.run_directory`). Inputs are held in memory (an
ImageFolder is decoded once); dict inputs (text models) are not supported here.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="hessfine finetune")
    >>> add_arguments(parser)
    >>> args = parser.parse_args(["--model", "hessfine.finetune.digit_networks:digits_cnn", "--reference", "r.pt",
    ...                           "--data", "digits:train", "--method", "robust", "--out", "runs/r",
    ...                           "--label-noise", "symmetric", "--noise-rate", "0.4"])
    >>> args.method, args.noise_rate, args.epochs
    ('robust', 0.4, 30)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from hashlib import sha256
from pathlib import Path
from typing import Any

import torch
from hessfine.analysis.errors import InputError
from hessfine.analysis.progress import add_quiet_option
from hessfine.analysis.sources.processors import add_processing_options, processing_options
from hessfine.bounds.functional import logits_of
from hessfine.finetune.confusion import corrupt_labels, load_confusion, noise_confusion
from hessfine.finetune.methods import (
    CONSISTENT_METHODS,
    METHODS,
    OPTIMIZERS,
    SCHEDULES,
    FinetuneConfig,
)
from hessfine.finetune.selection import Score, Selection, SelectionGrid, select, validation_split
from torch import Tensor, nn

__all__ = ["add_arguments", "run"]

EXAMPLES = """\
examples:
  # the paper's algorithm on digits with 40% symmetric label noise (F known from the rate)
  hessfine finetune --model hessfine.finetune.digit_networks:digits_cnn --reference pretrained.safetensors \\
      --data digits:train --eval-data digits:test --method robust \\
      --label-noise symmetric --noise-rate 0.4 --radius 2 --head-radius 5 --out runs/robust

  # the same with the noise matrix estimated by Dual-T
  hessfine finetune ... --method consistent --label-noise pair --noise-rate 0.3 \\
      --estimate-confusion --out runs/consistent-dualt

  # SAM with AdamW and a cosine schedule; label noise from a confusion-matrix file (k×k, rows sum to 1)
  hessfine finetune ... --method sam --sam-rho 0.05 --optimizer adamw --lr 0.001 \\
      --weight-decay 0.01 --schedule cosine --label-noise matrix --noise-matrix F.csv --out runs/sam

  # noise-stability optimisation: gradients averaged at W ± ε, ε ~ N(0, σ²I)
  hessfine finetune ... --method nso --nso-sigma 0.01 --nso-draws 1 --schedule step \\
      --lr-step-size 10 --lr-gamma 0.1 --out runs/nso

  # choose the learning rate and the radius on a validation split (20% of --data held out)
  hessfine finetune ... --method distance-constraint --select lr=0.01,0.05 --select radius=0.3,1 \\
      --out runs/dc-selected

  # a torchvision model with a new 10-class head, saving every 5th epoch
  hessfine finetune --model torchvision:resnet18 --model-kwargs '{"num_classes": 10}' \\
      --reference resnet18.pth --data train.npz --eval-data test.npz --method l2-sp \\
      --l2sp-alpha 0.01 --save-every 5 --out runs/l2sp
"""

_DEFAULTS = {f.name: f.default for f in fields(FinetuneConfig)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``hessfine finetune`` on ``parser``."""
    parser.description = (
        "Fine-tune a model from a pretrained checkpoint with one of the methods of Ju, Li & Zhang "
        "(ICML 2022) or a baseline, and write a run directory (one .safetensors per saved epoch, "
        "metrics.csv, hessfine.json) that 'hessfine measure' reads."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    d = _DEFAULTS
    what = parser.add_argument_group("model and data")
    what.add_argument(
        "--model", required=True, metavar="SPEC", help="model spec (docs/inputs.md#model-specs)"
    )
    what.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments for the model")
    what.add_argument(
        "--reference",
        required=True,
        metavar="PATH",
        help="pretrained checkpoint (file or dir; a PEFT adapter dir is merged into its base)",
    )
    what.add_argument("--data", required=True, metavar="TRAIN", help="training data spec")
    what.add_argument("--eval-data", metavar="EVAL", help="evaluation data spec (test split)")
    what.add_argument(
        "--input-columns",
        nargs="+",
        action="extend",
        metavar="COL",
        help="datasets directory: input columns (repeated options add up)",
    )
    what.add_argument("--label-column", metavar="COL", help="datasets directory: label column")
    add_processing_options(what)
    what.add_argument("--out", required=True, metavar="DIR", help="run directory to write")
    what.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    add_quiet_option(parser)
    what.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow pickled code in --reference and .pt data (only for trusted files)",
    )
    how = parser.add_argument_group("method")
    how.add_argument("--method", required=True, choices=METHODS)
    how.add_argument("--epochs", type=int, default=d["epochs"])
    how.add_argument("--batch-size", type=int, default=d["batch_size"])
    how.add_argument("--sam-rho", type=float, default=d["sam_rho"], help="SAM ascent radius ρ")
    how.add_argument(
        "--nso-sigma", type=float, default=d["nso_sigma"], help="NSO noise standard deviation σ"
    )
    how.add_argument(
        "--nso-draws", type=int, default=d["nso_draws"], help="NSO ± noise pairs per step"
    )
    how.add_argument(
        "--radius",
        type=float,
        default=d["radius"],
        help="Frobenius radius of the first extractor layer (distance-constraint, robust)",
    )
    how.add_argument(
        "--depth-scaling",
        type=float,
        default=d["depth_scaling"],
        help="ratio of the deepest extractor layer's radius to the first's (geometric in depth)",
    )
    how.add_argument(
        "--head-radius", type=float, default=d["head_radius"], help="radius of the new head"
    )
    how.add_argument("--l2sp-alpha", type=float, default=d["l2sp_alpha"], help="L2-SP weight α")
    how.add_argument("--label-smoothing", type=float, default=d["label_smoothing"])
    how.add_argument("--mixup-alpha", type=float, default=d["mixup_alpha"])
    how.add_argument(
        "--validation-fraction",
        type=float,
        default=d["validation_fraction"],
        help="held-out share of the training data (early-stopping)",
    )
    how.add_argument("--patience", type=int, default=d["patience"], help="early-stopping patience")
    opt = parser.add_argument_group("optimiser and schedule")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"])
    opt.add_argument("--lr", type=float, default=d["lr"], help="(initial) learning rate")
    opt.add_argument("--momentum", type=float, default=d["momentum"], help="SGD momentum")
    opt.add_argument(
        "--weight-decay",
        type=float,
        default=d["weight_decay"],
        help="weight decay λ (coupled for sgd, decoupled for adamw)",
    )
    opt.add_argument("--adam-beta1", type=float, default=d["adam_beta1"], help="AdamW β₁")
    opt.add_argument("--adam-beta2", type=float, default=d["adam_beta2"], help="AdamW β₂")
    opt.add_argument("--adam-eps", type=float, default=d["adam_eps"], help="AdamW ε")
    opt.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=d["schedule"],
        help="per-epoch learning-rate schedule",
    )
    opt.add_argument(
        "--lr-step-size",
        type=int,
        default=d["lr_step_size"],
        help="step schedule: multiply the rate by --lr-gamma every this many epochs",
    )
    opt.add_argument("--lr-gamma", type=float, default=d["lr_gamma"], help="step schedule factor")
    opt.add_argument(
        "--lr-min", type=float, default=d["lr_min"], help="cosine schedule: final rate floor"
    )
    how.add_argument(
        "--seed", type=int, default=d["seed"], help="seed of initialisation and batches"
    )
    how.add_argument(
        "--save-every", type=int, default=d["save_every"], help="save a checkpoint every K epochs"
    )
    how.add_argument(
        "--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N"
    )
    choose = parser.add_argument_group(
        "selection on a validation split (docs/finetune.md#selection)"
    )
    choose.add_argument(
        "--select",
        action="append",
        metavar="NAME=V1,V2,...",
        help="values to try of an option (its name as above without '--': lr, weight-decay, "
        "the method's own: radius, l2sp-alpha, sam-rho, nso-sigma, label-smoothing, "
        "mixup-alpha, ...); repeat it, or separate options by ';', for a grid. Every point is "
        "trained on the examples not held out and scored on the held-out ones (noisy labels "
        "under --label-noise); the run is trained with the most accurate point's options",
    )
    choose.add_argument(
        "--select-file",
        metavar="FILE",
        help='the grid as a JSON object, e.g. {"lr": [0.01, 0.05], "radius": [0.3, 1]}',
    )
    choose.add_argument(
        "--select-fraction",
        type=float,
        metavar="F",
        help="share of --data held out as the validation split of --select (default 0.2); "
        "it is not trained on and not counted in the n of the bounds",
    )
    noise = parser.add_argument_group("label noise")
    noise.add_argument(
        "--label-noise",
        choices=("none", "symmetric", "pair", "matrix"),
        default="none",
        help="corrupt the training labels: symmetric (rate = true flip rate), pair flip, or a "
        "confusion matrix from --noise-matrix",
    )
    noise.add_argument("--noise-rate", type=float, metavar="R", help="flip probability in [0, 1)")
    noise.add_argument(
        "--noise-matrix",
        metavar="FILE",
        help="k×k confusion matrix F[clean, observed] (.npy, .csv or .pt; rows sum to 1)",
    )
    noise.add_argument(
        "--noise-seed", type=int, help="seed of the label corruption (default: --seed)"
    )
    noise.add_argument(
        "--estimate-confusion",
        action="store_true",
        help="consistent/robust: estimate the noise matrix by Dual-T instead of using the rate",
    )


def _check_noise_options(args: argparse.Namespace) -> None:
    if args.label_noise in ("none", "matrix") and args.noise_rate is not None:
        raise InputError("--noise-rate needs --label-noise symmetric or pair")
    if args.label_noise == "matrix":
        if args.noise_matrix is None:
            raise InputError("--label-noise matrix needs --noise-matrix FILE (.npy, .csv or .pt)")
    elif args.noise_matrix is not None:
        raise InputError("--noise-matrix needs --label-noise matrix")
    if args.label_noise in ("symmetric", "pair") and (
        args.noise_rate is None or not 0.0 <= args.noise_rate < 1.0
    ):
        raise InputError(f"--label-noise {args.label_noise} needs --noise-rate R with 0 ≤ R < 1")


def _noise_matrix(args: argparse.Namespace, k: int) -> Tensor:
    if args.label_noise != "matrix":
        return noise_confusion(args.label_noise, k, args.noise_rate)
    try:
        return load_confusion(args.noise_matrix, k)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise InputError(
            f"--noise-matrix {args.noise_matrix}: {reason}; give a {k}×{k} non-negative matrix "
            "whose rows sum to 1"
        ) from None


SELECT_FRACTION = 0.2


def _grid(args: argparse.Namespace) -> SelectionGrid | None:
    """The grid of ``--select`` and ``--select-file``, checked against ``--method``; None
    without them."""
    if args.select_fraction is not None and not (args.select or args.select_file):
        raise InputError("--select-fraction needs --select NAME=V1,V2,... or --select-file FILE")
    if args.select_fraction is not None and not 0 < args.select_fraction < 1:
        raise InputError(f"--select-fraction {args.select_fraction}: give a share in (0, 1)")
    if not (args.select or args.select_file):
        return None
    axes: list[tuple[str, tuple[float | int, ...]]] = []
    if args.select_file is not None:
        try:
            loaded = json.loads(Path(args.select_file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise InputError(
                f"--select-file {args.select_file}: not a readable JSON file ({reason}); give an "
                'object such as {"lr": [0.01, 0.05], "radius": [0.3, 1]}'
            ) from None
        if not isinstance(loaded, dict):
            raise InputError(
                f"--select-file {args.select_file}: holds a {type(loaded).__name__}, not an "
                'object; give e.g. {"lr": [0.01, 0.05]}'
            )
        try:
            axes += SelectionGrid.from_mapping(loaded).axes
        except ValueError as err:
            raise InputError(f"--select-file {args.select_file}: {err}") from None
    try:
        if args.select:
            axes += SelectionGrid.parse(args.select).axes
        grid = SelectionGrid(tuple(axes))
        grid.check_method(args.method)
    except ValueError as err:
        raise InputError(f"--select: {err}") from None
    return grid


def _select(
    args: argparse.Namespace,
    grid: SelectionGrid,
    model: nn.Module,
    reference: dict[str, Tensor],
    data: tuple[Tensor, Tensor, Tensor],
    config: FinetuneConfig,
) -> tuple[Selection, Tensor]:
    """Choose ``config``'s options from ``grid`` on a held-out share of the training data;
    return the selection and the indices held out."""
    x, noisy, clean = data
    fraction = SELECT_FRACTION if args.select_fraction is None else args.select_fraction
    try:
        kept, held = validation_split(len(x), fraction, args.seed)
    except ValueError as err:
        raise InputError(f"--select-fraction {fraction}: {err}") from None

    def report(index: int, score: Score) -> None:
        if args.quiet:
            return
        point = " ".join(f"{k.replace('_', '-')}={v:g}" for k, v in score.options.items())
        result = (
            f"validation accuracy {score.validation_accuracy:.3f}"
            if score.error is None
            else f"failed ({score.error})"
        )
        print(f"select {index + 1}/{len(grid.points())}: {point}: {result}", flush=True)

    try:
        selection = select(
            model,
            reference,
            train_x=x[kept],
            train_y=noisy[kept],
            val_x=x[held],
            val_y=noisy[held],
            config=config,
            grid=grid,
            labels="clean" if args.label_noise == "none" else "noisy",
            train_y_clean=clean[kept],
            validation={"fraction": fraction, "indices": held.tolist()},
            on_point=report,
        )
    except ValueError as err:
        raise InputError(f"--select: {' '.join(str(err).split())}") from None
    return selection, held


def _inputs(data: Any, option: str) -> Tensor:
    if isinstance(data.x, Tensor):
        return data.x.float()
    if data.x is None:
        return torch.cat([x.float() for x, _ in data.batches(256)])
    raise InputError(
        f"{option} {data.name}: fine-tuning takes tensor inputs, not a dict of tensors; "
        "use image or feature data"
    )


def _config(args: argparse.Namespace, confusion: Tensor | None) -> FinetuneConfig:
    options = {
        "method": args.method,
        "epochs": args.epochs,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "momentum": args.momentum,
        "adam_beta1": args.adam_beta1,
        "adam_beta2": args.adam_beta2,
        "adam_eps": args.adam_eps,
        "schedule": args.schedule,
        "lr_step_size": args.lr_step_size,
        "lr_gamma": args.lr_gamma,
        "lr_min": args.lr_min,
        "batch_size": args.batch_size,
        "weight_decay": args.weight_decay,
        "sam_rho": args.sam_rho,
        "nso_sigma": args.nso_sigma,
        "nso_draws": args.nso_draws,
        "l2sp_alpha": args.l2sp_alpha,
        "radius": args.radius,
        "head_radius": args.head_radius,
        "depth_scaling": args.depth_scaling,
        "label_smoothing": args.label_smoothing,
        "mixup_alpha": args.mixup_alpha,
        "validation_fraction": args.validation_fraction,
        "patience": args.patience,
        "estimate_confusion": args.estimate_confusion,
        "seed": args.seed,
        "save_every": args.save_every,
    }
    if confusion is not None and not args.estimate_confusion:
        options["confusion"] = tuple(tuple(row) for row in confusion.tolist())
    try:
        return FinetuneConfig(**options)
    except ValueError as err:
        name, found, rest = str(err).partition(" = ")
        message = f"--{name.replace('_', '-')} {rest}" if found else str(err)
        raise InputError(message) from None


def run(args: argparse.Namespace) -> int:
    """Run ``hessfine finetune``; bad input raises :class:`InputError` (exit status 2)."""
    from hessfine.analysis.data import check_labels, load_data
    from hessfine.analysis.hf_loading import load_reference
    from hessfine.analysis.model_specs import build_model, parse_model_kwargs, resolve_device
    from hessfine.finetune.run_directory import finetune_run

    kwargs = parse_model_kwargs(args.model_kwargs)
    _check_noise_options(args)
    grid = _grid(args)
    if (
        args.method in CONSISTENT_METHODS
        and args.label_noise == "none"
        and not args.estimate_confusion
    ):
        raise InputError(
            f"--method {args.method} needs the noise matrix: pass --label-noise symmetric|pair "
            "--noise-rate R, --label-noise matrix --noise-matrix FILE, or --estimate-confusion"
        )
    if args.estimate_confusion and args.method not in CONSISTENT_METHODS:
        names = " or ".join(name for name in METHODS if name in CONSISTENT_METHODS)
        raise InputError(f"--estimate-confusion applies to --method {names} only")
    device = resolve_device(args.device)

    processing = processing_options(args)
    columns = {
        "input_columns": args.input_columns,
        "label_column": args.label_column,
        "processing": processing and processing.searching(args.reference),
    }
    train = load_data(args.data, trust=args.trust_checkpoint, label="--data", **columns)
    evaluation = (
        None
        if args.eval_data is None
        else load_data(args.eval_data, trust=args.trust_checkpoint, label="--eval-data", **columns)
    )
    train_x = _inputs(train, "--data")
    eval_x = None if evaluation is None else _inputs(evaluation, "--eval-data")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = build_model(args.model, kwargs)
    if hasattr(model, "config"):  # a transformers model: train on the logits of its output
        model.register_forward_hook(lambda _module, _inputs, output: logits_of(output))
    reference = load_reference(args.reference, model, trust=args.trust_checkpoint).state
    state = model.state_dict()
    matched = {
        name: tensor
        for name, tensor in reference.items()
        if name in state and tuple(tensor.shape) == tuple(state[name].shape)
    }
    if not matched:
        example = next(iter(reference), "none")
        raise InputError(
            f"--reference {args.reference}: no tensor matches the model's names and shapes (it "
            f"has e.g. {example!r}, the model {next(iter(state))!r}); check --model and --reference"
        )
    fresh = [name for name in state if name not in matched]

    with torch.no_grad():
        outputs = model(train_x[:2]).shape[-1]
    num_classes = max(train.num_classes, 0 if evaluation is None else evaluation.num_classes)
    check_labels(train, outputs, option="--data")
    if evaluation is not None:
        check_labels(evaluation, outputs, option="--eval-data")

    clean = train.y.long()
    confusion = None
    label_noise = None
    noisy = clean
    if args.label_noise != "none":
        noise_seed = args.seed if args.noise_seed is None else args.noise_seed
        confusion = _noise_matrix(args, outputs)
        noisy = corrupt_labels(
            clean, confusion, generator=torch.Generator().manual_seed(noise_seed)
        )
        label_noise = {
            "kind": args.label_noise,
            "rate": args.noise_rate,
            "confusion_matrix": confusion.tolist(),
            "seed": noise_seed,
            "flipped_fraction": (noisy != clean).double().mean().item(),
        }
        if args.noise_matrix is not None:
            label_noise["matrix_file"] = str(args.noise_matrix)
            label_noise["matrix_sha256"] = sha256(Path(args.noise_matrix).read_bytes()).hexdigest()
    config = _config(args, confusion)

    model = model.to(device)
    described: dict[str, Any] = {"train": args.data, "eval": args.eval_data}
    described["num_classes"] = num_classes
    selection = None
    if grid is not None:
        selection, held = _select(args, grid, model, matched, (train_x, noisy, clean), config)
        config = selection.config(config)
        kept = torch.ones(len(train_x), dtype=torch.bool)
        kept[held] = False
        train_x, noisy, clean = train_x[kept], noisy[kept], clean[kept]
        described["held_out_indices"] = held.tolist()
    try:
        result = finetune_run(
            model,
            matched,
            train_x=train_x,
            train_y_noisy=noisy,
            train_y_clean=clean,
            eval_x=eval_x,
            eval_y=None if evaluation is None else evaluation.y.long(),
            config=config,
            out_dir=args.out,
            model_spec=args.model,
            model_kwargs=kwargs,
            reference_path=args.reference,
            data=described,
            label_noise=label_noise,
            overwrite=args.overwrite,
            selection=None if selection is None else selection.to_json(),
        )
    except (ValueError, FloatingPointError) as err:
        raise InputError(f"--method {args.method}: {' '.join(str(err).split())}") from None
    last = result.metrics[-1]
    summary = (
        f"wrote {len(result.checkpoints)} checkpoints to {result.directory} "
        f"({len(matched)} tensors from the reference, {len(fresh)} fresh: "
        f"{', '.join(fresh[:4]) or 'none'}{', ...' if len(fresh) > 4 else ''}); "
        f"epoch {last['epoch']}: train acc (clean) {last['train_acc_clean']:.3f}"
    )
    if last["eval_acc"] is not None:
        summary += f", eval acc {last['eval_acc']:.3f}"
    if result.manifest["best_epoch"] is not None:
        summary += f", best epoch {result.manifest['best_epoch']}"
    if selection is not None:
        chosen = ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in selection.choice.items())
        summary += f"; selected on {len(held)} held-out examples: {chosen}"
    if not args.quiet:
        print(summary, file=sys.stdout)
    return 0
