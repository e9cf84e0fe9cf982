"""Which examples the Hessian maxima see: a seeded, class-stratified sample
(docs/inputs.md, "The Hessian examples").

𝓗_i of Theorem 2.1 (Ju, Li & Zhang, ICML 2022) is a maximum over the data distribution. Taking
the first N examples of a file sorted by class (an ImageFolder is) would cover one or two
classes, so ``hessfine measure`` draws its N examples by stratified sampling without
replacement with proportional allocation (Cochran, *Sampling Techniques*, 1977, §5.5): class c
with n_c of the n examples gets about N·n_c/n of them, rounded by the largest-remainder
(Hamilton) method under the constraint of at least one example per present class whenever
N ≥ the number of present classes. With fewer draws than classes, N distinct classes are drawn
with probability proportional to their size (one example each). Within a class the examples are
a uniform random subset. The chosen indices come back in a random order (so that consecutive
batches, e.g. of the ``reference-code`` estimator, mix the classes, as a shuffled loader does).
Labels that are not one class per example (e.g. token labels of a causal language model) give a
uniform random sample.

Everything is drawn from one ``torch.Generator``, so a seed fixes the sample.

Example:
    >>> import torch
    >>> y = torch.tensor([0] * 90 + [1] * 9 + [2])
    >>> sample = stratified_sample(y, 10, generator=torch.Generator().manual_seed(0))
    >>> sorted(torch.bincount(y[sample.indices], minlength=3).tolist())
    [1, 1, 8]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

SampleOrder = Literal["stratified", "file"]
SAMPLE_ORDERS: tuple[str, ...] = ("stratified", "file")


@dataclass(frozen=True)
class Sample:
    """Indices of the chosen examples (in the order they are used) and examples per class."""

    indices: Tensor
    per_class: dict[int, int] | None

    def to_json(self, order: str, population: int) -> dict:
        """The record kept in ``measurement.json`` (``data.hessian_sample``)."""
        return {
            "order": order,
            "population": population,
            "indices": [int(i) for i in self.indices],
            "per_class": None
            if self.per_class is None
            else {str(c): k for c, k in sorted(self.per_class.items())},
        }


def allocate(sizes: Tensor, count: int, *, generator: torch.Generator) -> Tensor:
    """Examples per stratum: proportional, largest remainder, ≥ 1 per non-empty stratum if possible.

    ``sizes`` are the stratum sizes (int64), ``count`` ≤ their sum. Returns int64 counts with
    ``0 ≤ counts ≤ sizes`` summing to ``count``.
    """
    sizes = sizes.to(torch.int64)
    total = int(sizes.sum())
    if not 0 <= count <= total:
        raise ValueError(f"cannot draw {count} of {total} examples")
    present = sizes > 0
    if count == 0:
        return torch.zeros_like(sizes)
    if count < int(present.sum()):
        chosen = torch.multinomial(sizes.double(), count, replacement=False, generator=generator)
        out = torch.zeros_like(sizes)
        out[chosen] = 1
        return out
    quota = sizes.double() * count / total
    out = torch.minimum(torch.maximum(quota.floor().long(), present.long()), sizes)
    # Hand out (or take back) the difference one example at a time by the largest remainder
    # (a loop over strata, at most one step per stratum).
    while int(out.sum()) != count:
        remainder = quota - out.double()
        if int(out.sum()) < count:
            remainder[out >= sizes] = -torch.inf
            out[int(torch.argmax(remainder))] += 1
        else:
            remainder[out <= present.long()] = torch.inf
            out[int(torch.argmin(remainder))] -= 1
    return out


def stratified_sample(labels: Tensor, count: int, *, generator: torch.Generator) -> Sample:
    """``count`` distinct example indices, class-stratified when ``labels`` is one class each."""
    n = int(labels.shape[0])
    count = min(count, n)
    if labels.ndim != 1 or labels.is_floating_point():
        indices = torch.randperm(n, generator=generator)[:count]
        return Sample(indices, None)
    classes, inverse = torch.unique(labels.cpu(), return_inverse=True)
    sizes = torch.bincount(inverse, minlength=classes.numel())
    counts = allocate(sizes, count, generator=generator)
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    parts = [
        order[start + torch.randperm(size, generator=generator)[:k]]
        for start, size, k in zip(starts.tolist(), sizes.tolist(), counts.tolist(), strict=True)
        if k > 0
    ]
    chosen = torch.cat(parts)
    indices = chosen[torch.randperm(chosen.numel(), generator=generator)]
    per_class = {int(c): int(k) for c, k in zip(classes, counts, strict=True) if int(k) > 0}
    return Sample(indices, per_class)


def file_sample(labels: Tensor, count: int) -> Sample:
    """The first ``count`` examples in file order (``--sample-order file``)."""
    indices = torch.arange(min(count, int(labels.shape[0])))
    per_class = None
    if labels.ndim == 1 and not labels.is_floating_point():
        classes, counts = torch.unique(labels[indices].cpu(), return_counts=True)
        per_class = {int(c): int(k) for c, k in zip(classes, counts, strict=True)}
    return Sample(indices, per_class)
