"""Mixture-of-experts layers that transformers 5 holds fused, as one layer per expert matrix
(docs/inputs.md, "Default layers").

transformers 5 keeps the experts of a mixture-of-experts block in 3-D parameters of one module:
Mixtral's and Qwen2-MoE's ``mlp.experts`` hold ``gate_up_proj`` of shape (E, 2I, H) — expert e's
gate projection in rows 0..I−1 of slice e, its up projection in rows I..2I−1 — and ``down_proj``
of shape (E, H, I), while their checkpoints store each expert's ``gate_proj``, ``up_proj`` and
``down_proj`` (Mixtral: ``w1``, ``w3``, ``w2``) as Linear weights of their own. Each expert's
matrices are measured as layers of their own, named after the fused parameter with the expert's
index: ``…experts.gate_proj.3``, ``…experts.up_proj.3``, ``…experts.down_proj.3``.

A fused parameter is a 3-D parameter of a module whose ``num_experts`` is its first dimension.
``gate_up_proj`` is split into gate and up as transformers' experts interface lays it out (the
module's ``is_transposed`` and ``is_concatenated``, set by its ``use_experts_implementation``
decorator: rows, or columns of a transposed slice, one half after the other, or interleaved);
every other fused parameter gives one layer per expert. The estimators see the layers through
:class:`~hessfine.bounds.functional.FusedParameter` (the fused tensor rebuilt in the forward
pass); a checkpoint aligned by name holds the fused tensors whole, and :func:`split_alignment`
splits that alignment into the layers.

Example:
    >>> import torch
    >>> class Experts(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.num_experts = 2
    ...         self.gate_up_proj = torch.nn.Parameter(torch.zeros(2, 6, 4))
    ...         self.down_proj = torch.nn.Parameter(torch.zeros(2, 4, 3))
    >>> gate_up, down = fused_experts(torch.nn.ModuleDict({"experts": Experts()}))
    >>> gate_up.names[:2], down.names
    (['experts.gate_proj.0', 'experts.up_proj.0'], ['experts.down_proj.0', 'experts.down_proj.1'])
    >>> gate_up.split(torch.zeros(2, 6, 4))["experts.up_proj.1"].shape
    torch.Size([3, 4])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from hessfine.analysis.checkpoints import Alignment, AlignmentRow
from hessfine.bounds.functional import FusedParameter
from torch import Tensor, nn

GATE_UP = "gate_up_proj"
NOTE = (
    "Fused mixture-of-experts parameters are measured as one layer per expert matrix, named "
    "with the expert's index (…experts.gate_proj.E, …experts.up_proj.E, …experts.down_proj.E)."
)


def fused_experts(model: nn.Module) -> tuple[FusedParameter, ...]:
    """The fused expert parameters of ``model``, split into one layer per expert matrix
    (module docs), in the model's order."""
    found = []
    for module_name, module in model.named_modules():
        count = getattr(module, "num_experts", None)
        prefix = f"{module_name}." if module_name else ""
        for leaf, param in module.named_parameters(recurse=False):
            if param.ndim != 3 or param.shape[0] != count:
                continue
            found.append(_split(module, prefix, leaf, count))
    return tuple(found)


def _split(module: nn.Module, prefix: str, leaf: str, count: int) -> FusedParameter:
    """The layers of the fused parameter ``prefix + leaf`` of ``module`` with ``count`` experts."""
    name = prefix + leaf
    if leaf == GATE_UP and getattr(module, "has_gate", True):
        parts = tuple((f"{prefix}gate_proj.{e}", f"{prefix}up_proj.{e}") for e in range(count))
        return FusedParameter(
            name,
            parts,
            dim=1 if getattr(module, "is_transposed", False) else 0,
            interleaved=not getattr(module, "is_concatenated", True),
        )
    return FusedParameter(name, tuple((f"{name}.{e}",) for e in range(count)))


def fused_parts(fused: tuple[FusedParameter, ...]) -> dict[str, list[str]]:
    """Each fused parameter's name with the names of its layers."""
    return {f.name: f.names for f in fused}


def fused_owners(fused: tuple[FusedParameter, ...]) -> dict[str, str]:
    """The fused parameter that holds each layer of ``fused``."""
    return {name: f.name for f in fused for name in f.names}


def split_alignment(
    alignment: Alignment, fused: tuple[FusedParameter, ...], layers: Sequence[str]
) -> Alignment:
    """``alignment`` of whole fused parameters with each replaced by its ``layers``: their W^(s)
    and v are the slices of the fused parameter's, ‖v‖_F is the slice's, the source its own."""
    owners = fused_owners(fused)
    rows = {row.name: row for row in alignment.rows}
    reference = fused_slices(alignment.reference, fused)
    directions = fused_slices(alignment.directions, fused)
    split_rows = []
    for name in layers:
        if name not in owners:
            split_rows.append(rows[name])
            continue
        direction = directions[name]
        distance = float(torch.linalg.vector_norm(direction, dtype=torch.float64))
        source = rows[owners[name]].source
        shape = tuple(direction.shape)
        split_rows.append(AlignmentRow(name, shape, direction.numel(), source, distance))
    return Alignment(
        params=fused_slices(alignment.params, fused),
        buffers=alignment.buffers,
        layers=list(layers),
        reference={name: reference[name] for name in layers},
        directions={name: directions[name] for name in layers},
        rows=split_rows,
    )


def fused_slices(
    tensors: Mapping[str, Tensor], fused: tuple[FusedParameter, ...]
) -> dict[str, Tensor]:
    """``tensors`` with each fused parameter's tensor replaced by its layers' slices."""
    by_name = {f.name: f for f in fused}
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        out.update(by_name[name].split(tensor) if name in by_name else {name: tensor})
    return out
