"""The memory budget of a measurement (``--max-memory``) and the meter that enforces it.

The budget bounds the process's peak memory, model copies and data included: the resident set
(RSS) on the CPU, the peak allocated memory (``torch.cuda.max_memory_allocated``) on CUDA. It is
given as bytes (``6000000000``), a size (``6GiB``, ``500MB``: B, KB, MB, GB, TB in powers of
1000, KiB, MiB, GiB, TiB in powers of 1024) or a fraction of the memory available when the
measurement starts (``0.5``: a number in (0, 1]). Available means, on the CPU, the kernel's
``MemAvailable`` (bounded by a cgroup v2 limit when the process runs under one) plus the
process's own resident set; on CUDA, the device's free memory plus what this process has
allocated. The default is :data:`DEFAULT_FRACTION` of it: half on the CPU (other processes,
the page cache and the model's error keep the rest), 80% on CUDA (the caching allocator's
fragmentation keeps the rest).

:class:`ProcessMeter` is the :class:`hessfine.bounds.linalg.memory.Meter` of the estimators
(:mod:`hessfine.bounds.linalg.memory` sizes their calls from it). On CUDA it measures a call's
peak from the allocator's peak statistics. On the CPU a thread samples the resident set
(``/proc/self/statm``) every millisecond during the call, and the kernel's high-water mark of
the process (``ru_maxrss``, which cannot be reset without also resetting what ``time`` and a
parent process read) gives the exact peak whenever the call set a new one — the calls that
matter, near the budget; before each sampled call freed heap memory is returned to the system
(glibc's ``malloc_trim``), so that the resident set is the memory in use. Both cost time on
small models, so neither is done while it cannot matter: a call starting with its high-water mark
within 1/16 of the headroom above the memory in use is not sampled (its peak is the new mark if
it sets one, else at most the old mark: a bound that overstates its growth, which only makes
later calls smaller), and the headroom is read without a trim while more than a quarter of the
budget is left. Elsewhere (no ``/proc``) nothing is measured and the budget is not enforced
(``measurable``).

Example:
    >>> parse_max_memory("6GiB"), parse_max_memory("500MB"), parse_max_memory("0.5")
    (('bytes', 6442450944), ('bytes', 500000000), ('fraction', 0.5))
    >>> human(6442450944)
    '6.00 GiB'
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import resource
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch
from hessfine.analysis.errors import InputError

T = TypeVar("T")

DEFAULT_FRACTION = {"cpu": 0.5, "cuda": 0.8}
"""The budget when ``--max-memory`` is not given: this fraction of the memory available at start."""

_LOOSE = 0.25
"""While more than this fraction of the budget is left, :meth:`ProcessMeter.headroom` does not
trim the heap first (the untrimmed resident set overstates the memory in use, so the headroom is
understated: safe)."""
_NEAR = 1 / 16
"""A call is measured without the sampling thread when the process's high-water mark lies within
this fraction of the headroom above the memory in use: the mark then bounds the call's peak."""
_SIZE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt]?)(i?)b)?$", re.IGNORECASE)
_PROC = Path("/proc/self")


def parse_max_memory(value: int | float | str) -> tuple[Literal["bytes", "fraction"], float]:
    """``("bytes", n)`` or ``("fraction", f)`` of a ``--max-memory`` value (InputError if bad).

    A plain number in (0, 1] is a fraction of the memory available; a larger one, bytes.
    """
    text = str(value).strip() if not isinstance(value, bool) else ""
    match = _SIZE.match(text)
    if match is None or (match.group(3) and not match.group(2)) or not float(match.group(1)) > 0:
        raise InputError(
            f"--max-memory {value!r} is not a memory size; give bytes, a size such as 6GiB or "
            "500MB, or a fraction such as 0.5 of the memory available"
        )
    number, unit, binary = float(match.group(1)), match.group(2), match.group(3)
    if unit is not None:  # a size with a unit (B, KB, KiB, …)
        power = "kmgt".index(unit.lower()) + 1 if unit else 0
        return "bytes", int(number * (1024 if binary else 1000) ** power)
    if number <= 1:
        return "fraction", number
    return "bytes", int(number)


def human(size: float) -> str:
    """``size`` bytes in the largest binary unit that keeps it ≥ 1 (two decimals)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


@dataclass(frozen=True)
class MemoryBudget:
    """The resolved budget: ``bytes``, and ``given`` as the user wrote it (None: the default)."""

    bytes: int
    given: int | float | str | None
    available: int

    @property
    def option(self) -> str:
        """How the budget reads in messages: the option as given, or the default."""
        if self.given is None:
            return f"the default --max-memory ({human(self.bytes)})"
        return f"--max-memory {self.given} ({human(self.bytes)})"


def resolve_budget(
    given: int | float | str | None, device: torch.device, *, processes: int = 1
) -> MemoryBudget:
    """The budget of ``given`` (None: the default fraction) on ``device``, now; a fraction is of
    the memory available shared by ``processes`` processes."""
    available = available_memory(device) // processes
    if given is None:
        kind, amount = "fraction", DEFAULT_FRACTION["cuda" if device.type == "cuda" else "cpu"]
    else:
        kind, amount = parse_max_memory(given)
    size = int(amount * available) if kind == "fraction" else int(amount)
    return MemoryBudget(size, given, available)


def available_memory(device: torch.device) -> int:
    """Bytes this process could hold on ``device``: free memory plus its own use."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) + torch.cuda.memory_allocated(device)
    free = _meminfo_available()
    limit = _cgroup_room()
    if limit is not None:
        free = limit if free is None else min(free, limit)
    if free is None:
        return 0
    return free + (_rss() or 0)


class ProcessMeter:
    """The :class:`hessfine.bounds.linalg.memory.Meter` of this process under ``budget`` bytes."""

    def __init__(self, budget: int, device: torch.device) -> None:
        self.budget, self.device = budget, device
        self.cuda = device.type == "cuda"
        self.depth = 0
        self.peak = 0

    @property
    def measurable(self) -> bool:
        """Whether this platform lets the meter measure (CUDA, or Linux's ``/proc``)."""
        return self.cuda or _rss() is not None

    def usage(self, *, exact: bool = True) -> int:
        """Memory in use now: allocated on CUDA, the resident set on the CPU (``exact``: after
        returning freed heap memory to the system; else it may count freed memory too, which
        only overstates it)."""
        if self.cuda:
            now = torch.cuda.memory_allocated(self.device)
        else:
            if exact:
                _trim()
            now = _rss() or 0
        self.peak = max(self.peak, now)
        return now

    def headroom(self) -> int:
        """Bytes left under the budget: from the resident set as it is while that leaves more
        than :data:`_LOOSE` of the budget (an understatement, so safe), else after a trim."""
        room = self.budget - self.usage(exact=False)
        if room > _LOOSE * self.budget:
            return room
        return self.budget - self.usage()

    def highest(self) -> int:
        """The largest memory use seen: on the CPU the process's peak resident set so far, on
        CUDA the largest allocated at the meter's readings and in its measured calls."""
        return self.peak if self.cuda else max(self.peak, _max_rss())

    def measure(self, call: Callable[[], T]) -> tuple[T, int | None]:
        """``call()`` and its peak growth above the memory in use before it."""
        if self.depth:
            return call(), None
        self.depth += 1
        try:
            if self.cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
                value = call()
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
            else:
                before = self.usage(exact=False)
                record = _max_rss()
                if record - before <= _NEAR * (self.budget - before):
                    # The call's peak is the new high-water mark if it sets one, else at most
                    # the old one, which is near enough above `before` to serve as its bound.
                    value = call()
                    peak = max(record, _max_rss())
                else:
                    before = self.usage()
                    with _Sampler() as sampler:
                        value = call()
                    peak = sampler.peak
                    if _max_rss() > record:  # a new high-water mark: the kernel's is exact
                        peak = max(peak, _max_rss())
            self.peak = max(self.peak, peak)
            return value, max(peak - before, 0)
        finally:
            self.depth -= 1


class _Sampler:
    """The largest resident set seen by a thread that reads it every millisecond."""

    def __enter__(self) -> _Sampler:
        self.peak = _rss() or 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, _rss() or 0)

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, _rss() or 0)


def _rss() -> int | None:
    """The resident set in bytes (None without ``/proc``)."""
    try:
        return int((_PROC / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _max_rss() -> int:
    """The process's largest resident set so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _meminfo_available() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup v2 memory limit (None: no limit)."""
    try:
        line = Path("/proc/self/cgroup").read_text().strip().splitlines()[0]
        group = Path("/sys/fs/cgroup") / line.split("::", 1)[1].lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((group / "memory.current").read_text())
    except (OSError, ValueError, IndexError):
        return None


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_MALLOC_TRIM = _load_trim()


def _trim() -> None:
    """Return freed heap memory to the system, so the resident set is the memory in use."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
