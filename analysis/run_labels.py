"""Measurements under label noise: the run's clean and noisy labels and the noise matrix F.

A fine-tuning run with label noise (``hessfine finetune --label-noise ...``, or any run directory
whose manifest ``hessfine.json`` has a ``label_noise`` entry) records both label sets in its
``labels.csv`` (columns ``index``, ``clean``, ``noisy``). ``hessfine measure`` then:

* states the generalization gap against the **clean** training labels: the training data's
  labels are replaced by the recorded clean ones (whether the data file holds the clean or the
  noisy labels; it must hold one of the two), so ``loss.train``, ``accuracy.train``, C,
  the Hessian quadratic forms 𝓗_i and Theorem 2.1 are those of the clean-label problem;
* reports the losses on the noisy labels trained on (``loss.train_noisy``,
  ``accuracy.train_noisy``) and, with a noise matrix F, the consistent (backward-corrected) loss
  ℓ̄(z, ỹ) = Σ_j (F⁻¹)[ỹ, j]·ℓ(z, j) on them (``loss.train_consistent``), which is unbiased for the
  clean loss and enters the noisy-label bound.

F (:func:`noise_matrix`) is the matrix the run's consistent loss used (``confusion_used``; source
``dual-t`` when it was estimated by Dual-T, else ``known``), or else the matrix of the noise applied
(``label_noise.confusion_matrix``, source ``known``); without either there is no F (``none``).

Example:
    >>> noise_matrix({"label_noise": None}) is None
    True
    >>> noise_matrix({"confusion_used": {"source": "dual-t", "matrix": [[0.9, 0.1], [0.2, 0.8]]}})
    NoiseMatrix(matrix=[[0.9, 0.1], [0.2, 0.8]], source='dual-t')
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from hessfine.analysis.data import LabeledData
from hessfine.analysis.errors import InputError
from hessfine.bounds.functional import Batch, ConsistentCrossEntropy, FunctionalModel, Inputs
from torch import Tensor

Split = Callable[[Callable[[Inputs, Tensor], Tensor], Inputs, Tensor], list[Tensor]]
"""How a batch's per-example work is split into calls: ``split(compute, x, y)``."""

__all__ = [
    "NoiseMatrix",
    "RunLabels",
    "noise_matrix",
    "noisy_label_statistics",
    "read_run_labels",
]


@dataclass(frozen=True)
class NoiseMatrix:
    """The k×k noise matrix F (F[y, z] = P(observed z | clean y)) and where it comes from."""

    matrix: list[list[float]]
    source: Literal["known", "dual-t"]

    def tensor(self) -> Tensor:
        """F as a float64 tensor."""
        return torch.tensor(self.matrix, dtype=torch.float64)


@dataclass(frozen=True)
class RunLabels:
    """A run's recorded training labels, and which of them the measured data file holds."""

    clean: Tensor
    noisy: Tensor
    path: str
    data_holds: Literal["clean", "noisy"]

    def to_json(self) -> dict[str, Any]:
        """The ``labels`` entry of ``measurement.json``."""
        return {
            "train": "clean",
            "source": self.path,
            "data_file_holds": self.data_holds,
            "noisy_fraction": float((self.clean != self.noisy).double().mean()),
        }


def noise_matrix(manifest: Mapping[str, Any]) -> NoiseMatrix | None:
    """F for the noisy-label bound from a run manifest (module docs), or None."""
    used = manifest.get("confusion_used")
    if isinstance(used, Mapping) and used.get("matrix") is not None:
        source = "dual-t" if used.get("source") == "dual-t" else "known"
        return NoiseMatrix([list(map(float, row)) for row in used["matrix"]], source)
    noise = manifest.get("label_noise")
    if isinstance(noise, Mapping) and noise.get("confusion_matrix") is not None:
        return NoiseMatrix([list(map(float, row)) for row in noise["confusion_matrix"]], "known")
    return None


def read_run_labels(
    manifest: Mapping[str, Any], base: Path, train: LabeledData
) -> RunLabels | None:
    """The run's clean and noisy training labels when the run recorded label noise, else None.

    ``base`` is the run directory (the manifest's ``labels`` file is relative to it). The file
    must list one label pair per training example, and the training data's labels must equal
    the recorded clean or noisy ones; otherwise :class:`InputError` says what does not match.
    """
    if not manifest.get("label_noise") or not manifest.get("labels"):
        return None
    path = base / str(manifest["labels"])
    try:
        with path.open(newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
        clean = torch.tensor([int(row["clean"]) for row in rows], dtype=torch.long)
        noisy = torch.tensor([int(row["noisy"]) for row in rows], dtype=torch.long)
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise InputError(
            f"{path}: the run records label noise but its labels file is unreadable ({err}); "
            "restore labels.csv (index, clean, noisy) from the fine-tuning run"
        ) from None
    given = train.y.long().cpu()
    if len(clean) != len(given):
        raise InputError(
            f"--data {train.name}: {len(given)} examples, but the run's {path.name} records "
            f"{len(clean)} training labels; measure on the data the run was trained on"
        )
    if torch.equal(given, clean):
        holds: Literal["clean", "noisy"] = "clean"
    elif torch.equal(given, noisy):
        holds = "noisy"
    else:
        raise InputError(
            f"--data {train.name}: its labels are neither the clean nor the noisy labels the run "
            f"recorded in {path.name}; measure on the data the run was trained on"
        )
    return RunLabels(clean, noisy, str(path), holds)


def noisy_label_statistics(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    batches: Iterable[Batch],
    consistent: ConsistentCrossEntropy | None,
    *,
    split: Split | None = None,
) -> dict[str, float | None]:
    """Mean cross-entropy and accuracy on noisy labels, and the mean consistent loss.

    ``batches`` yield (inputs, noisy labels); ``consistent`` is ℓ̄ given F⁻¹ (None: no
    consistent loss); ``split(compute, x, y)`` runs ``compute`` on a batch in the calls of a
    memory plan (:meth:`hessfine.analysis.measure._Measurement._forward_chunks`; default: the
    whole batch in one call). Sums are taken in float64, over exact per-example terms.
    """

    def sums(x: Inputs, y: Tensor) -> Tensor:
        logits = fmodel.logits(params, x).double()
        total = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        corrected = consistent(logits, y).sum() if consistent is not None else total.new_zeros(())
        correct = (logits.argmax(-1) == y).sum().double()
        count = torch.tensor(float(y.shape[0]), dtype=torch.float64)
        return torch.stack([total, corrected, correct.to(total.device), count.to(total.device)])

    found = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for x, y in batches:
            for part in split(sums, x, y) if split is not None else [sums(x, y)]:
                found += part.cpu()
    total, corrected, correct, n = found.tolist()
    return {
        "train_noisy": total / n,
        "train_noisy_accuracy": correct / n,
        "train_consistent": None if consistent is None else corrected / n,
    }
