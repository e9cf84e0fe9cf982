"""Rows of a synthetic ``comparison.csv``, shared by the tests of the studies and the report."""

from __future__ import annotations


def comparison_row(method: str, seed: int, epoch: int, **columns: object) -> dict:
    """One checkpoint row: run (method, radius, noise rate, F source, seed) at ``epoch``.

    The run is told apart by its method, ``radius``, ``noise_rate`` and ``confusion_source``
    columns (when given) and its seed; epoch 10 is its final checkpoint. ``columns`` are the
    measured values and settings.
    """
    parts = (columns.get(k) for k in ("radius", "noise_rate", "confusion_source"))
    run = "-".join(map(str, (method, *parts, seed)))
    return {
        "method": method,
        "seed": seed,
        "epoch": epoch,
        "final_checkpoint": int(epoch == 10),
        "run": run,
        "measurement": f"{run}/{epoch}",
        **columns,
    }
