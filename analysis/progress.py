"""Progress bars for the long stages of a measurement, in units a user can follow.

Each stage reports in its own unit — layers × batches of the quadratic forms, probe vectors of
the traces, Lanczos steps of the spectra, noise draws, Monte Carlo repetitions, checkpoints —
with tqdm's rate and estimate of the time left. The :mod:`hessfine.bounds` estimators stay free
of I/O: they take an optional ``progress`` callback (called with the units just done), and
:meth:`Progress.stage` hands them a bar's ``update``. Bars are drawn on stderr, only on a
terminal, never under ``--quiet``, and only by rank 0 of a ``torchrun`` job.

Example:
    >>> with Progress(enabled=False).stage("traces", total=100, unit="probe") as update:
    ...     update(1.0)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

from tqdm import tqdm

_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} {unit} [{elapsed}<{remaining}]"


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    """``--quiet``, which every subcommand takes: no progress bars, notes or summaries on
    standard output (errors still go to stderr; a result that is only printed, such as
    ``crosscheck``'s table, is still printed)."""
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars, notes or summaries on standard output (errors still on stderr)",
    )


class Progress:
    """Factory of per-stage bars; ``enabled=False`` (``--quiet``) silences all of them.

    ``file`` is the stream (default: stderr at the time of each stage); ``interval`` the least
    number of seconds between redraws.
    """

    def __init__(
        self, *, enabled: bool, file: IO[str] | None = None, interval: float = 0.1
    ) -> None:
        self.enabled = enabled
        self.file = file
        self.interval = interval

    @contextmanager
    def stage(self, desc: str, *, total: float, unit: str) -> Iterator[Callable[[float], None]]:
        """A bar for one stage; yields its ``update(units_done)`` (a no-op when silent).

        tqdm's ``disable=None`` turns the bar off when the stream is not a terminal.
        """
        if not self.enabled:
            yield _ignore
            return
        bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            leave=False,
            disable=None,
            file=self.file,
            mininterval=self.interval,
            bar_format=_FORMAT,
            dynamic_ncols=True,
        )
        try:
            yield bar.update
        finally:
            bar.close()


def _ignore(_: float) -> None:
    """The update of a silent bar."""
