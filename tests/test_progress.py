"""Progress bars: per-stage units with a time estimate on a terminal; silent off it or --quiet."""

import io
import sys

from hessfine.analysis.measure import MeasureSettings, measure
from hessfine.analysis.progress import Progress

from tests.test_gpu_helpers import files  # noqa: F401 — the tiny CNN checkpoint fixture


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_stage_shows_its_units_and_the_time_left():
    screen = Terminal()
    progress = Progress(enabled=True, file=screen, interval=0)
    with progress.stage("traces", total=4, unit="probe") as update:
        for _ in range(8):
            update(0.5)
    text = screen.getvalue()
    assert "traces" in text and "4/4 probe" in text and "<" in text


def test_silent_off_a_terminal_and_when_disabled():
    for progress in (Progress(enabled=True, file=io.StringIO()), Progress(enabled=False)):
        with progress.stage("traces", total=2, unit="probe") as update:
            update(2)
    screen = io.StringIO()
    with Progress(enabled=True, file=screen).stage("x", total=1, unit="probe") as update:
        update(1)
    assert screen.getvalue() == ""


def test_measure_reports_every_long_stage_in_its_units(files, monkeypatch):  # noqa: F811
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    settings = MeasureSettings(
        samples=4, batch_size=2, trace=True, trace_probes=2, eigen=1, noise_sigma=(0.1,),
        noise_draws=2, certificate=True,
    )  # fmt: skip
    options = {
        "reference": str(files / "ref.safetensors"),
        "data": str(files / "train.pt"),
        "model": "tests.oracles:tiny_cnn",
        "settings": settings,
    }
    measure(files / "ft.safetensors", out=files / "loud", quiet=False, **options)
    text = screen.getvalue()
    for stage, unit in [
        ("quadratic forms", "layer·batch"),
        ("trace", "probe"),
        ("positive trace", "layer·batch"),
        ("eigenvalues", "Lanczos step"),
        ("noise", "draw"),
        ("certificate", "repetition"),
        ("train loss", "batch"),
    ]:
        assert f"\r{stage}: " in text and f" {unit} [" in text, stage
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    options["settings"] = MeasureSettings(samples=2, batch_size=2, trace=True, trace_probes=2)
    measure(files / "ft.safetensors", out=files / "quiet", quiet=True, **options)
    assert quiet.getvalue() == ""
