"""PEFT LoRA adapter directories (docs/inputs.md, "PEFT LoRA adapters"): the fine-tuned weights are
base + ΔW.

``PeftModel.save_pretrained`` writes ``adapter_config.json`` and ``adapter_model.safetensors``
(or ``adapter_model.bin``) with keys ``base_model.model.<module>.lora_A.weight`` /
``.lora_B.weight`` (``.lora_embedding_A`` / ``.lora_embedding_B`` for embeddings) and the full
tensors of ``modules_to_save`` (and trained biases with ``bias="all"``/``"lora_only"``).
For an adapted module with factors A (r × fan-in) and B (fan-out × r), following peft's
``get_delta_weight`` (Hu et al., "LoRA", ICLR 2022; Kalajdzievski, "rsLoRA", 2023):

- scaling s = lora_alpha / r, or lora_alpha / √r with ``use_rslora``; r and lora_alpha per
  module from ``rank_pattern`` / ``alpha_pattern`` (the first key k whose regex
  ``(.*\\.)?(k)$`` matches the module name), else ``r`` / ``lora_alpha``;
- Linear: ΔW = s·B·A, transposed (ΔW = s·(B·A)ᵀ) for a weight stored fan-in × fan-out
  (transformers' ``Conv1D``, ``fan_in_fan_out``; the weight's shape decides when it is not
  square);
- Conv (kernel k): A is a conv r × c_in × k, B a 1×1 conv c_out × r, and
  ΔW[o, i, k] = s·Σ_j B[o, j]·A[j, i, k];
- Embedding: A is r × num_embeddings, B is dim × r, ΔW = s·(B·A)ᵀ.

Merged weights are W = W_base + ΔW after the saved full tensors replace their base tensors (peft's
``merge_and_unload``). ‖ΔW‖_F comes from the factors without forming ΔW:
‖s·B·A‖_F² = s²·tr((BᵀB)(AAᵀ)), r×r matrices. PEFT types other than LoRA, and LoRA variants
whose merged weights are not base + s·B·A (DoRA, LoRA bias, aLoRA, ...) or that change the base
weights at initialisation (PiSSA, OLoRA, CorDA, LoftQ) are refused with one line.

Example:
    >>> import torch
    >>> a, b = torch.ones(1, 3, dtype=torch.float64), torch.full((2, 1), 2.0, dtype=torch.float64)
    >>> f = LoraFactor("fc", "linear", a, b, scale=0.5, transpose=False)
    >>> f.delta((2, 3)).tolist(), round(f.norm(), 6)  # ‖0.5·B·A‖_F = sqrt(6)
    ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], 2.44949)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from hessfine.analysis.errors import InputError
from hessfine.analysis.sources.files import read_file, read_json_object, sha256_of
from torch import Tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_FACTORS = {
    ".lora_A.weight": ("A", "linear"),
    ".lora_B.weight": ("B", "linear"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
}
#: adapter_config.json entries that make the merged weights other than base + s·B·A.
_VARIANTS = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias (lora_bias)",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "trainable_token_indices": "trainable tokens",
    "use_qalora": "QA-LoRA",
    "megatron_config": "Megatron LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")

Kind = Literal["linear", "conv", "embedding"]


@dataclass(frozen=True, eq=False)
class LoraFactor:
    """One adapted module: its LoRA factors A, B (float64), scaling s, and layout."""

    module: str
    kind: Kind
    A: Tensor
    B: Tensor
    scale: float
    transpose: bool

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self, shape: Sequence[int]) -> Tensor:
        """ΔW in float64, shaped like the base weight ``shape`` (module docs)."""
        product = self.B.reshape(-1, self.rank) @ self.A.reshape(self.rank, -1)
        if self.kind == "conv":
            return (self.scale * product).reshape(-1, *self.A.shape[1:])
        if self.kind == "embedding":
            return self.scale * product.T
        square = product.shape[0] == product.shape[1]
        flip = self.transpose if square else tuple(shape) == tuple(product.T.shape)
        return self.scale * (product.T if flip else product)

    def norm(self) -> float:
        """‖ΔW‖_F = |s|·sqrt(tr((BᵀB)(AAᵀ))), from r×r Gram matrices."""
        a = self.A.reshape(self.rank, -1)
        b = self.B.reshape(-1, self.rank)
        trace = float(((b.T @ b) * (a @ a.T)).sum())
        return abs(self.scale) * math.sqrt(max(trace, 0.0))


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A LoRA adapter: factors per adapted module and the saved full tensors."""

    directory: Path
    file: Path
    config: dict[str, Any]
    factors: list[LoraFactor]
    saved: dict[str, Tensor]
    base: Path | None

    def merged(
        self, base: Mapping[str, Tensor], label: str
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, float], list[str]]:
        """``(state, deltas, distances, layers)``: the merged state W = W_base + ΔW, the exact
        float64 changes W − W_base and their Frobenius norms for the adapted weights, and the
        default layers (adapted weights, then ≥2-D weights of ``modules_to_save``)."""
        state = dict(base)
        state.update(self.saved)
        deltas: dict[str, Tensor] = {}
        distances: dict[str, float] = {}
        for factor in self.factors:
            key = f"{factor.module}.weight"
            if key not in base:
                raise InputError(
                    f"{label}: the adapter changes {key!r}, which the base model lacks; pass "
                    "--reference the base model the adapter was trained on"
                )
            weight = state[key]
            delta = factor.delta(weight.shape)
            if tuple(delta.shape) != tuple(weight.shape):
                raise InputError(
                    f"{label}: the {factor.kind} LoRA update of {key!r} has shape "
                    f"{tuple(delta.shape)}, the base weight {tuple(weight.shape)}; pass --reference "
                    "the base model the adapter was trained on (grouped convolutions are not "
                    "supported)"
                )
            total = delta
            if key in self.saved:
                total = delta + (weight.double() - base[key].double())
            state[key] = (weight.double() + delta).to(weight.dtype)
            deltas[key] = total
            distances[key] = (
                factor.norm() if total is delta else float(torch.linalg.vector_norm(total))
            )
        kept = [str(m) for m in self.config.get("modules_to_save") or []]
        extra = [
            key
            for key, tensor in self.saved.items()
            if key.endswith(".weight")
            and tensor.ndim >= 2
            and key not in deltas
            and any(key[: -len(".weight")] == m or key.endswith(f".{m}.weight") for m in kept)
        ]
        return state, deltas, distances, [*deltas, *extra]


def adapter_file(directory: Path) -> Path | None:
    """The adapter weights of a PEFT adapter directory, or ``None``."""
    if not (directory / ADAPTER_CONFIG).is_file():
        return None
    return next((directory / f for f in ADAPTER_FILES if (directory / f).is_file()), None)


def read_adapter(directory: Path, *, trust: bool, label: str) -> tuple[LoraAdapter, str]:
    """The LoRA adapter in ``directory`` and the SHA-256 of its weights and config files."""
    file = adapter_file(directory)
    if file is None:
        raise InputError(
            f"{label} {directory}: no {' or '.join(ADAPTER_FILES)} beside {ADAPTER_CONFIG}; "
            "save the adapter with save_pretrained"
        )
    config = _config(directory / ADAPTER_CONFIG, label)
    tensors = read_file(file, trust=trust, label=label)
    adapter = lora_adapter(config, tensors, directory=directory, file=file, label=label)
    return adapter, sha256_of([file, directory / ADAPTER_CONFIG])


def lora_adapter(
    config: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    *,
    directory: Path,
    file: Path,
    label: str,
) -> LoraAdapter:
    """The LoRA adapter of an ``adapter_config.json`` document and the adapter's tensors (keys as
    ``save_pretrained`` writes them); other PEFT types and variants are refused in one line
    naming ``label`` and ``directory``."""
    config = dict(config)
    where = f"{label} {directory}"
    kind = str(config.get("peft_type", "")).upper()
    if kind != "LORA":
        raise InputError(
            f"{where}: PEFT type {kind or 'unknown'} is not supported (only LoRA is computed "
            "exactly); merge it with peft's merge_and_unload() and measure the merged model"
        )
    for key, name in _VARIANTS.items():
        if config.get(key):
            raise InputError(
                f"{where}: {name} adapters are not supported (their weights are not base + s·B·A); "
                "merge with peft's merge_and_unload() and measure the merged model"
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise InputError(
            f"{where}: init_lora_weights={init!r} changes the base weights; convert the adapter to "
            "plain LoRA (save_pretrained(path_initial_model_for_weight_conversion=...)) or merge it"
        )
    factors, saved = _factors(tensors, config, where)
    return LoraAdapter(directory, file, config, factors, saved, _base(config, directory))


def _config(path: Path, label: str) -> dict[str, Any]:
    return read_json_object(path, name=f"{label} {path}", fix="save the adapter again")


def _pattern(patterns: object, module: str, default: object) -> object:
    """peft's ``get_pattern_key``: the first key k with ``(.*\\.)?(k)$`` matching ``module``."""
    for key, value in (patterns or {}).items() if isinstance(patterns, Mapping) else ():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _factors(
    tensors: Mapping[str, Tensor], config: Mapping[str, Any], where: str
) -> tuple[list[LoraFactor], dict[str, Tensor]]:
    parts: dict[str, dict[str, Any]] = {}
    saved: dict[str, Tensor] = {}
    for raw, tensor in tensors.items():
        key = raw[len(_PREFIX) :] if raw.startswith(_PREFIX) else raw
        suffix = next((s for s in _FACTORS if key.endswith(s)), None)
        if suffix is None:
            if ".lora_" in key:
                raise InputError(
                    f"{where}: adapter tensor {raw!r} belongs to a LoRA variant this tool does not "
                    "compute; merge with peft's merge_and_unload() and measure the merged model"
                )
            saved[key] = tensor
            continue
        which, kind = _FACTORS[suffix]
        entry = parts.setdefault(key[: -len(suffix)], {"kind": kind})
        entry[which] = tensor.double()
    factors = []
    for module, entry in parts.items():
        if "A" not in entry or "B" not in entry:
            raise InputError(f"{where}: module {module!r} has only one LoRA factor; save it again")
        a, b = entry["A"], entry["B"]
        kind: Kind = "conv" if entry["kind"] == "linear" and a.ndim > 2 else entry["kind"]
        rank = int(a.shape[0])
        if b.shape[1] != rank or (kind == "conv" and any(d != 1 for d in b.shape[2:])):
            raise InputError(
                f"{where}: LoRA factors of {module!r} have shapes {tuple(a.shape)} and "
                f"{tuple(b.shape)}, which do not multiply; save the adapter again"
            )
        r = _pattern(config.get("rank_pattern"), module, config.get("r", rank))
        if r != rank:
            raise InputError(
                f"{where}: module {module!r} has rank {rank} but adapter_config.json says r={r}; "
                "save the adapter again"
            )
        alpha = float(_pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        transpose = bool(config.get("fan_in_fan_out")) and kind == "linear"
        factors.append(LoraFactor(module, kind, a, b, scale, transpose))
    if not factors:
        raise InputError(f"{where}: the adapter holds no LoRA factors; save it again")
    return factors, saved


def _base(config: Mapping[str, Any], directory: Path) -> Path | None:
    """``base_model_name_or_path`` when it names a local directory (as given, or relative to
    the adapter directory's parent)."""
    name = config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        return None
    for candidate in (Path(name).expanduser(), directory.parent / name):
        if candidate.is_dir():
            return candidate
    return None
