"""Calls sized to a memory budget from their measured memory growth.

A measurement bounds its peak memory (``--max-memory``; docs/mathematics.md, "The memory
plan"). Work whose memory grows with the number of items per call — examples, or (layer,
example) pairs of a Lanczos run — runs in calls of a size chosen, before and during each stage, from measured calls:

* a :class:`Meter` (given by the caller; :mod:`hessfine.analysis.memory` measures the resident
  set on the CPU and the allocated memory on CUDA) reports the ``headroom`` left under the
  budget and the peak growth of a call above the memory in use before it;
* :class:`CallSize` models the peak growth of one kind of call on k items as a + b·k. Its first
  calls are the probe pass: 1 item (which also pays one-time costs), 1 item and 2 items, and
  g₁, g₂ the growths of the last two give b = max(g₂ − g₁, g₂/4) and a = max(g₂ − 2b, 0)
  (the floor g₂/4 keeps b from vanishing when measurement noise makes g₂ ≈ g₁); every later call
  is measured too and raises b when it grew more than predicted. A call then holds
  k = ⌊(0.9 · headroom − a)/b⌋ items, at least 1 and at most ``cap``. The probe calls are part
  of the work (their values are used), so the probe pass costs nothing but the smaller calls;
* a call that fails with an out-of-memory error (``MemoryError``, or a ``RuntimeError`` saying
  "out of memory", CUDA's included) is rerun with half the items and b is raised to match;
  one that fails, or outgrows the headroom, on one item raises :class:`MemoryBudgetError`;
* a ``steady`` kind of call keeps one size once fitted (it may only shrink, when a call grows
  more than predicted), with its probe pass run apart (:meth:`CallSize.fit`, values discarded):
  equal batches are then split alike, so that a value computed twice (the loss of a split that
  is both the training and the evaluation data) is the same to the last bit;
* :class:`MemoryPlan` holds the call sizes of one stage, one per kind of call (keyed by name),
  and reports the sizes chosen (:meth:`MemoryPlan.sizes`).

Every value computed in chunks is the same as in one call up to round-off (per-example values do
not depend on the other examples of a call, and sums are split exactly), so results do not depend
on the budget. Without a meter (``MemoryPlan()``, the default of the estimators) nothing is
measured: calls hold ``cap`` items (all that are passed when ``cap`` is None), and the estimators
that chunk by themselves fall back to their fixed element counts.

Example:
    >>> plan = MemoryPlan(_ToyMeter(headroom=1000, per_item=100), cap=64)
    >>> calls = plan.calls("toy")
    >>> [stop - start for start, stop in calls.run(lambda start, stop: (start, stop), 40)]
    [1, 1, 2, 4, 8, 9, 9, 6]
    >>> plan.sizes()
    {'toy': 9}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, TypeVar

import torch

T = TypeVar("T")

_SAFETY = 0.9
"""Fraction of the headroom a call is sized to fill (the rest absorbs the model's error)."""
_PROBES = (1, 1, 2)
"""Items of a kind of call's first calls: a warm-up that pays one-time costs, then the fit."""


class Meter(Protocol):
    """What a :class:`CallSize` reads of the process's memory."""

    def headroom(self) -> int:
        """Bytes the process may still grow by before it reaches its budget (may be negative)."""
        ...

    def measure(self, call: Callable[[], T]) -> tuple[T, int | None]:
        """``call()`` and its peak memory growth in bytes above the memory in use before it
        (None when not measured, e.g. inside another measured call)."""
        ...


class MemoryBudgetError(Exception):
    """One item of a call needs more memory than the budget leaves: ``needed`` bytes (None when
    the call ran out of memory) against ``headroom``; ``kind`` names the call."""

    def __init__(self, kind: str, needed: int | None, headroom: int) -> None:
        self.kind, self.needed, self.headroom = kind, needed, headroom
        what = "ran out of memory" if needed is None else f"needs {needed} bytes"
        super().__init__(f"{kind}: one item {what}, {headroom} bytes left under the budget")


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` reports an allocation that failed (CPU or CUDA)."""
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


class CallSize:
    """Items per call of one kind of call, from the measured growth of its calls.

    ``fixed`` and ``per_item`` (bytes) may be known before any call (then no probe pass runs
    and measured calls can only raise ``per_item``); ``cap`` bounds the items of a call;
    ``steady``: once fitted, calls keep the first size chosen, or a smaller one (no ramp).
    """

    def __init__(
        self,
        kind: str,
        meter: Meter | None,
        cap: int | None,
        *,
        fixed: int = 0,
        per_item: float | None = None,
        recorded: bool = True,
        steady: bool = False,
    ) -> None:
        self.kind, self.meter, self.cap = kind, meter, cap
        self.fixed, self.per_item, self.recorded = fixed, per_item, recorded
        self.steady = steady
        self.probed = per_item is None  # else the costs are known: no probe pass, no ramp
        self.growth: list[tuple[int, int]] = []
        self.made = 0
        self.chosen: int | None = None

    def size(self, remaining: int) -> int:
        """The items of the next call, at most ``remaining``."""
        limit = remaining if self.cap is None else min(self.cap, remaining)
        if self.meter is None:
            return max(1, limit)
        if self.per_item is None:
            if self.made < len(_PROBES):
                return max(1, min(limit, _PROBES[self.made]))
            return max(1, limit)  # not measurable (nested calls): one call as without a meter
        fits = math.floor((room(self.meter) - self.fixed) / self.per_item)
        if self.steady and self.chosen is not None:
            fits = min(fits, self.chosen)
        self.chosen = max(1, fits if self.cap is None else min(self.cap, fits))
        if self.probed and not self.steady:  # at most twice the largest call measured
            fits = min(fits, 2 * max(k for k, _ in self.growth))
        return max(1, min(limit, fits))

    def measure(self, items: int, call: Callable[[], T]) -> T:
        """``call()`` on ``items`` items, measured; the model learns from its growth."""
        if self.meter is None:
            return call()
        headroom = self.meter.headroom()
        value, growth = self.meter.measure(call)
        self.made += 1
        if growth is not None:
            if items == 1 and growth > headroom:
                raise MemoryBudgetError(self.kind, growth, headroom)
            self._learn(items, growth)
        return value

    def fit(self, call: Callable[[int], object], n: int) -> None:
        """Run the probe pass of ``call(k)`` (k items, at most ``n``) if not fitted yet."""
        while self.meter is not None and self.per_item is None and self.made < len(_PROBES):
            k = self.size(n)
            self.measure(k, lambda k=k: call(k))

    def run(self, call: Callable[[int, int], T], n: int, *, retry: bool = True) -> list[T]:
        """``call(start, stop)`` over consecutive ranges covering ``range(n)``, sized by
        :meth:`size`; a range that runs out of memory is retried with half the items (unless
        ``retry`` is False: for calls that are not pure, such as ones adding to a sum)."""
        out: list[T] = []
        start, halved = 0, None
        while start < n:
            k = self.size(n - start) if halved is None else halved
            try:
                out.append(self.measure(k, lambda s=start, e=start + k: call(s, e)))
            except (MemoryError, RuntimeError) as err:
                if not (retry and out_of_memory(err)):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                headroom = 0 if self.meter is None else self.meter.headroom()
                if k == 1:
                    raise MemoryBudgetError(self.kind, None, headroom) from None
                halved = k // 2
                if self.per_item is not None:  # k items did not fit: size() stays below k/2
                    self.per_item = max(self.per_item, (headroom - self.fixed) / halved)
                continue
            start, halved = start + k, None
        return out

    def _learn(self, items: int, growth: int) -> None:
        self.growth.append((items, growth))
        if not self.probed:
            if growth > self.fixed + self.per_item * items:
                self.per_item = (growth - self.fixed) / items
            return
        if len(self.growth) < len(_PROBES):
            return
        fit = self.growth[1:]  # the first call pays one-time costs
        k2, g2 = fit[-1]
        other = [(k, g) for k, g in fit[:-1] if k != k2]
        slope = 0.0
        if other:  # the secant through the latest calls of two sizes
            k1, g1 = other[-1]
            slope = (g2 - g1) / (k2 - k1)
        self.per_item = max(slope, g2 / (4 * k2), 1.0)
        self.fixed = max(round(g2 - self.per_item * k2), 0)

    def record(self) -> int | None:
        """The items per call chosen (the largest call made while the model was not fitted)."""
        if self.chosen is not None:
            return self.chosen
        return max((items for items, _ in self.growth), default=None)


class MemoryPlan:
    """The call sizes of one stage, one :class:`CallSize` per kind of call.

    ``meter`` None: no budget (calls of ``cap`` items; see the module docstring). ``cap``: the
    most items a call may hold (``--batch-size``).
    """

    def __init__(self, meter: Meter | None = None, cap: int | None = None) -> None:
        self.meter, self.cap = meter, cap
        self.kinds: dict[str, CallSize] = {}

    @property
    def measured(self) -> bool:
        """Whether calls are sized from measured memory (a meter was given)."""
        return self.meter is not None

    def headroom(self) -> int | None:
        """Bytes left under the budget now (None without a meter)."""
        return None if self.meter is None else self.meter.headroom()

    def room(self) -> float:
        """Bytes a call may grow by now: a fraction (0.9) of the headroom."""
        return math.inf if self.meter is None else room(self.meter)

    def calls(
        self,
        kind: str,
        *,
        fixed: int = 0,
        per_item: float | None = None,
        capped: bool = True,
        recorded: bool = True,
        steady: bool = False,
    ) -> CallSize:
        """The :class:`CallSize` of ``kind`` (created on first use, with the known costs).

        ``capped``: its calls hold at most ``cap`` items (False: items that are not examples);
        ``recorded``: its size is reported by :meth:`sizes` (False: probe calls); ``steady``:
        see :class:`CallSize`.
        """
        if kind not in self.kinds:
            cap = self.cap if capped else None
            self.kinds[kind] = CallSize(
                kind,
                self.meter,
                cap,
                fixed=fixed,
                per_item=per_item,
                recorded=recorded,
                steady=steady,
            )
        return self.kinds[kind]

    def sizes(self) -> dict[str, int]:
        """Items per call chosen for each kind of call: the smallest over its keys
        (``kind:detail`` keys, e.g. one per layer, count as ``kind``)."""
        out: dict[str, int] = {}
        for key, calls in self.kinds.items():
            size = calls.record()
            if size is not None and calls.recorded:
                kind = key.split(":")[0]
                out[kind] = min(out.get(kind, size), size)
        return out


def room(meter: Meter) -> float:
    """Bytes a call may grow by under ``meter`` now: a fraction of its headroom."""
    return _SAFETY * meter.headroom()


class _ToyMeter:
    """A meter for the module's example: each item grows memory by ``per_item`` bytes."""

    def __init__(self, headroom: int, per_item: int) -> None:
        self.room, self.per_item = headroom, per_item

    def headroom(self) -> int:
        return self.room

    def measure(self, call: Callable[[], T]) -> tuple[T, int | None]:
        value = call()
        start, stop = value  # the example's calls return their range
        return value, (stop - start) * self.per_item
