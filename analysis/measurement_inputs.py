"""What a measurement reads: the checkpoints, the model, the aligned layers and the data.

:func:`load_inputs` turns the command line's (or the Python API's) paths into a
:class:`MeasurementInputs`: the fine-tuned checkpoint and its reference (a PEFT adapter applied to
its base; a reference that is an adapter, as ``hessfine finetune --reference ADAPTER`` records,
merged into its own base: :func:`hessfine.analysis.hf_loading.load_reference`), the model built from its spec (a Hugging Face directory loaded by transformers'
``from_pretrained``, :mod:`hessfine.analysis.hf_loading`) and put in eval mode as a
:class:`~hessfine.bounds.functional.FunctionalModel` with the task's per-example loss, the
selected layers with their weight changes v_i = W_i − W_i^(s) (:func:`hessfine.analysis.checkpoints.align`),
and the training and evaluation data — under label noise recorded by the run, the clean training
labels, with the noisy ones kept beside them (:mod:`hessfine.analysis.run_labels`), and without
the examples a run held out of its training data file to select its hyperparameters (the
manifest's ``data.held_out_indices``). What the
command line leaves out comes from the run's manifest (``hessfine.json``): reference, model spec
and kwargs, data, head reference; a DCP checkpoint without ``config.json`` (a Trainer's FSDP
``checkpoint-N/``) takes the bare ``hf`` spec from the reference's directory. Every failure is an :class:`~hessfine.analysis.errors.InputError`
that names the input and the fix.

:func:`check_forward` then runs the model once on the data (inputs accepted, logits of the task's
shape, labels within the classes, deterministic), and :func:`unused_layers` finds the selected
layers the loss does not depend on.

Example:
    >>> inputs = load_inputs(Sources(Path("runs/robust/epoch_010.safetensors")),  # doctest: +SKIP
    ...                      settings=MeasureSettings(), device=torch.device("cpu"))
    >>> inputs.layers[:2], inputs.train.name  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from hessfine.analysis.checkpoints import (
    Alignment,
    Checkpoint,
    align,
    apply_adapter,
    load_checkpoint,
    load_head_reference,
    select_layers,
)
from hessfine.analysis.data import LabeledData, Processing, load_data
from hessfine.analysis.errors import InputError
from hessfine.analysis.fused_experts import NOTE as EXPERTS_NOTE
from hessfine.analysis.fused_experts import (
    fused_experts,
    fused_owners,
    fused_parts,
    split_alignment,
)
from hessfine.analysis.hf_loading import (
    LoadedModel,
    load_pretrained,
    load_reference,
    pretrained_route,
)
from hessfine.analysis.model_specs import build_model
from hessfine.analysis.run_labels import NoiseMatrix, RunLabels, noise_matrix, read_run_labels
from hessfine.analysis.sources.hf import model_directory
from hessfine.analysis.sources.timm_runs import TimmWeights
from hessfine.analysis.tasks import NOTES as TASK_NOTES
from hessfine.analysis.tasks import (
    TaskChoice,
    check_task_labels,
    choose_task,
    task_data,
    task_loss,
)
from hessfine.bounds.functional import (
    FunctionalModel,
    NondeterministicModelError,
    check_deterministic,
)
from hessfine.bounds.safe_autodiff import differentiable
from torch import Tensor

DType = Literal["float32", "float64"]


@dataclass(frozen=True)
class Sources:
    """Where a measurement's inputs come from (command-line values, else the run manifest)."""

    checkpoint: Path
    reference: str | None = None
    data: str | None = None
    eval_data: str | None = None
    model: str | None = None
    model_kwargs: Mapping[str, Any] | None = None
    trust: bool = False
    input_columns: tuple[str, ...] | None = None
    label_column: str | None = None
    processing: Processing | None = None


@dataclass(frozen=True)
class MeasurementInputs:
    """Everything a measurement computes on, loaded and aligned.

    ``layers`` are the selected layers (every one, used or not); ``directions`` v_i and
    ``distances`` ‖v_i‖_F per layer; ``attention`` and ``experts`` the implementations of a
    Hugging Face model; ``task`` the task measured and how it was chosen
    (:func:`hessfine.analysis.tasks.choose_task`); ``notes`` what the loading adds to
    ``measurement.json → notes``;
    ``train`` holds the labels the gap is stated against (the run's clean labels under recorded
    label noise) and ``noisy_train`` those trained on; ``data_specs`` what
    ``measurement.json → data`` records of where the data came from (``train``, ``eval``,
    ``input_columns``, ``label_column``).
    """

    checkpoint: Checkpoint
    reference: Checkpoint
    manifest: Mapping[str, Any]
    model_spec: str
    model_kwargs: dict[str, Any]
    fmodel: FunctionalModel
    params: dict[str, Tensor]
    layers: list[str]
    alignment: Alignment
    directions: dict[str, Tensor]
    distances: dict[str, float]
    attention: str | None
    experts: str | None
    task: TaskChoice
    notes: tuple[str, ...]
    train: LabeledData
    noisy_train: LabeledData
    eval: LabeledData | None
    run_labels: RunLabels | None
    noise: NoiseMatrix | None
    data_specs: dict[str, Any]
    device: torch.device
    dtype: torch.dtype


def load_inputs(
    sources: Sources,
    *,
    task: str | None,
    dtype: DType,
    layers: tuple[str, ...] | None,
    head_reference: str | None,
    image_size: int,
    device: torch.device,
    timm_weights: TimmWeights = "raw",
    verbose: bool = False,
) -> MeasurementInputs:
    """Load checkpoint, reference, model, aligned layers and data (module docstring).

    ``timm_weights`` chooses the raw or EMA weights of a timm checkpoint (the reference's are
    raw); ``verbose`` prints the layer alignment table; ``task`` is the task given, None to
    choose it from the model (:func:`hessfine.analysis.tasks.choose_task`).
    """
    src = sources
    hf_weights = model_directory(src.checkpoint) is not None
    checkpoint = load_checkpoint(
        src.checkpoint,
        trust=src.trust,
        label="checkpoint",
        timm_weights=timm_weights,
        tensors=not hf_weights,
    )
    if timm_weights == "ema" and checkpoint.training.get("tool") != "timm":
        raise InputError(
            f"checkpoint {checkpoint.path} is not written by timm's train.py, so it has no EMA "
            "weights; drop --timm-weights ema"
        )
    manifest = checkpoint.manifest
    base = checkpoint.directory or checkpoint.path.parent
    reference_spec = src.reference or _from_manifest(manifest, "reference", base)
    adapter = checkpoint.adapter
    if reference_spec is None and adapter is not None and adapter.base is not None:
        reference_spec = str(adapter.base)
    if reference_spec is None:
        raise InputError(
            "--reference is required (the pretrained checkpoint); pass --reference PATH"
        )
    hf_directory = base
    if adapter is not None or (checkpoint.pending is not None and not _has_config(base)):
        # the model is the adapter's base; a DCP checkpoint without config: the reference's
        given = Path(reference_spec).expanduser()
        hf_directory = given if given.is_dir() else given.parent
    spec = src.model or manifest.get("model")
    if spec is None:
        spec = "hf" if _has_config(hf_directory) else None
    if spec is None:
        raise InputError("--model is required (e.g. torchvision:resnet18); pass --model SPEC")
    kwargs = src.model_kwargs if src.model_kwargs is not None else manifest.get("model_kwargs", {})
    model_kwargs = dict(kwargs or {})
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    head = head_reference
    if head is None:  # not given: the run manifest's head_reference, else zero
        given_head = manifest.get("head_reference")
        head = (
            "zero"
            if given_head in (None, "zero")
            else _from_manifest(manifest, "head_reference", base)
        )
    model_options = {
        "spec": spec,
        "model_kwargs": model_kwargs,
        "dtype": torch_dtype,
        "layers": tuple(layers or ()),
        "trust": src.trust,
    }
    if pretrained_route(spec, checkpoint, reference_spec):
        head_state = load_head_reference(head, trust=src.trust)
        loaded = load_pretrained(
            checkpoint, reference_spec, head_reference=head_state, **model_options
        )
    else:
        if hf_weights and adapter is None:  # a model directory measured with another spec
            checkpoint = load_checkpoint(src.checkpoint, trust=src.trust, label="checkpoint")
        loaded = _load_state(
            checkpoint, reference_spec, hf_directory, head_reference=head, **model_options
        )
    module, selected, alignment = loaded.module, loaded.layers, loaded.alignment
    module.to(device=device)
    chosen = choose_task(task, module, hugging_face=spec.strip().partition(":")[0] == "hf")
    task = chosen.task
    fmodel, params = FunctionalModel.from_module(module, loss=task_loss(task), fused=loaded.fused)
    config = getattr(module, "config", None)
    if verbose:
        print(alignment.format_table())
    data_spec = src.data or _from_manifest(manifest, "data", base, key2="train")
    if data_spec is None:
        raise InputError("--data is required (the training data); pass --data PATH|digits:train")
    options = {
        "image_size": image_size,
        "trust": src.trust,
        "task": task,
        "input_columns": src.input_columns,
        "label_column": src.label_column,
        "pad_token_id": getattr(config, "pad_token_id", None),
        "processing": src.processing and src.processing.searching(base, loaded.reference.path),
    }
    if task != "classification" and (manifest.get("label_noise") or noise_matrix(manifest)):
        raise InputError(
            f"checkpoint {checkpoint.path}: the run records label noise, which hessfine measures "
            f"for classification only, not --task {task}; measure a run without label noise"
        )
    train = task_data(
        load_data(str(data_spec), label="--data", **options), task, module, option="--data"
    )
    train = _trained_examples(train, manifest)
    # Under recorded label noise: measure against the clean labels, keep the noisy ones.
    run_labels = read_run_labels(manifest, base, train)
    noisy_train = train
    if run_labels is not None:
        noisy_train = replace(train, y=run_labels.noisy)
        train = replace(train, y=run_labels.clean)
    eval_spec = src.eval_data or _from_manifest(manifest, "data", base, key2="eval")
    return MeasurementInputs(
        checkpoint=loaded.checkpoint,
        reference=loaded.reference,
        manifest=manifest,
        model_spec=spec,
        model_kwargs=model_kwargs,
        fmodel=fmodel,
        params=params,
        layers=selected,
        alignment=alignment,
        directions={
            name: alignment.directions[name].to(device=device, dtype=torch_dtype)
            for name in selected
        },
        distances={row.name: row.distance for row in alignment.rows},
        attention=getattr(config, "_attn_implementation", None),
        experts=loaded.experts,
        task=chosen,
        notes=loaded.notes + ((TASK_NOTES[task],) if task in TASK_NOTES else ()),
        train=train,
        noisy_train=noisy_train,
        eval=None
        if eval_spec is None
        else task_data(
            load_data(str(eval_spec), label="--eval-data", **options),
            task,
            module,
            option="--eval-data",
        ),
        run_labels=run_labels,
        noise=noise_matrix(manifest),
        data_specs={
            "train": str(data_spec),
            "eval": None if eval_spec is None else str(eval_spec),
            "input_columns": None if src.input_columns is None else list(src.input_columns),
            "label_column": src.label_column,
        },
        device=device,
        dtype=torch_dtype,
    )


def _trained_examples(train: LabeledData, manifest: Mapping[str, Any]) -> LabeledData:
    """The training data without the examples the run held out of it (``data.held_out_indices``
    of the manifest: a selection's validation split, not trained on, so not part of n) when
    ``train`` is the whole file the run split; else ``train`` as it is."""
    data = manifest.get("data") if isinstance(manifest.get("data"), Mapping) else {}
    held, n_train = data.get("held_out_indices"), data.get("n_train")
    if not held or not isinstance(n_train, int) or len(train) != n_train + len(held):
        return train
    kept = torch.ones(len(train), dtype=torch.bool)
    kept[torch.tensor(held, dtype=torch.long)] = False
    return train.subset(kept.nonzero().flatten())


def _has_config(directory: Path | None) -> bool:
    return directory is not None and (directory / "config.json").is_file()


def _load_state(
    checkpoint: Checkpoint,
    reference_spec: str,
    hf_directory: Path,
    *,
    spec: str,
    model_kwargs: dict[str, Any],
    dtype: torch.dtype,
    layers: tuple[str, ...],
    head_reference: str,
    trust: bool,
) -> LoadedModel:
    """The model built from its spec, the checkpoint's tensors loaded into it by name
    (:func:`~hessfine.analysis.checkpoints.align`; a DCP checkpoint's read for the model) and
    paired with the reference's; fused expert parameters are aligned whole, then split into
    their selected layers."""
    module = build_model(spec, model_kwargs, hf_directory=hf_directory)
    module.to(dtype=dtype)
    reference = load_reference(reference_spec, module, trust=trust)
    checkpoint = apply_adapter(checkpoint, reference)
    fused = fused_experts(module)
    selected = select_layers(module, list(layers or checkpoint.layers or ()), fused_parts(fused))
    owners = fused_owners(fused)
    whole = list(dict.fromkeys(owners.get(name, name) for name in selected))
    alignment = align(
        module,
        checkpoint,
        reference,
        layers=whole,
        head_reference=load_head_reference(head_reference, trust=trust, model=module),
    )
    if not fused:
        return LoadedModel(module, (), selected, alignment, checkpoint, reference)
    config = getattr(module, "config", None)
    return LoadedModel(
        module,
        fused,
        selected,
        split_alignment(alignment, fused, selected),
        checkpoint,
        reference,
        experts=getattr(config, "_experts_implementation", None),
        notes=(EXPERTS_NOTE,),
    )


def check_forward(inputs: MeasurementInputs, data: LabeledData) -> int:
    """The number of logits per prediction, once the model has accepted the first examples of
    ``data``, given logits of the task's shape twice alike (deterministic) and the labels of the
    training and evaluation data fit them (:func:`hessfine.analysis.tasks.check_task_labels`);
    else an :class:`InputError`."""
    fmodel, params = inputs.fmodel, inputs.params
    x, _ = next(
        iter(data.batches(min(4, len(data)), limit=4, dtype=inputs.dtype, device=inputs.device))
    )
    try:
        with torch.no_grad(), differentiable():
            logits = fmodel.logits(params, x)
            check_deterministic(fmodel, params, x)
    except NondeterministicModelError as err:
        raise InputError(f"--model {inputs.model_spec}: {err}") from None
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        shape = (
            tuple(x.shape) if isinstance(x, Tensor) else {k: tuple(v.shape) for k, v in x.items()}
        )
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"--data {data.name}: the model rejects inputs of shape {shape} ({first}); "
            "give data shaped for the model (e.g. --image-size, --max-length) or the matching --model"
        ) from None
    task, sequence = inputs.task.task, fmodel.loss.sequence
    if logits.dim() != (3 if sequence else 2):
        wanted = "(batch, length, vocabulary)" if sequence else "(batch, outputs)"
        other = (
            "classification, regression or multi-label"
            if sequence
            else "token-classification, causal-lm or seq2seq-lm"
        )
        raise InputError(
            f"--model {inputs.model_spec}: --task {task} expects {wanted} logits, got shape "
            f"{tuple(logits.shape)}; pass --task {other} for this model"
        )
    check_task_labels(inputs.train, task, logits.shape, option="--data")
    if inputs.eval is not None:
        check_task_labels(inputs.eval, task, logits.shape, option="--eval-data")
    return logits.shape[-1]


def unused_layers(
    fmodel: FunctionalModel, params: Mapping[str, Tensor], layers: list[str], x, y: Tensor
) -> list[str]:
    """The ``layers`` the loss on (x, y) does not depend on: one forward and backward pass.

    E.g. the auxiliary classifiers of torchvision's GoogLeNet and Inception v3, which only
    training mode uses. Their Hessian blocks are zero (autograd gives them no gradient at all).
    """
    weights = {name: params[name].detach().requires_grad_(True) for name in layers}
    with torch.enable_grad(), differentiable():
        loss = fmodel.losses({**params, **weights}, x, y).sum()
        if not loss.requires_grad:
            return list(layers)
        grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
    return [name for name, g in zip(layers, grads, strict=True) if g is None]


def _from_manifest(
    manifest: Mapping[str, Any], key: str, base: Path, *, key2: str | None = None
) -> str | None:
    """A path-like manifest entry, resolved against the manifest's directory."""
    value = manifest.get(key)
    if key2 is not None:
        value = value.get(key2) if isinstance(value, dict) else None
    if not isinstance(value, str) or not value:
        return None
    if ":" in value and not Path(value).exists() and not (base / value).exists():
        return value
    candidate = Path(value)
    return str(candidate if candidate.is_absolute() else (base / candidate))
