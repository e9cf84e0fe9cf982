"""Renamed modules: the old import paths give the new modules, with a deprecation warning."""

import importlib
import re
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("bounds", "analysis", "figures", "finetune")
_ALIAS = re.compile(r'alias_module\(__name__, "([\w.]+)"\)')


def _moved() -> dict[str, str]:
    """Old module path → new module path, read from the files left at the old paths."""
    found = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            match = _ALIAS.search(path.read_text(encoding="utf-8"))
            if match:
                parts = path.relative_to(ROOT).with_suffix("").parts
                found["hessfine." + ".".join(parts)] = match.group(1)
    return found


MOVED = _moved()


def test_the_renamed_modules_are_found() -> None:
    assert MOVED["hessfine.finetune.models"] == "hessfine.finetune.digit_networks"
    assert MOVED["hessfine.analysis.sources.runs"] == "hessfine.analysis.sources.run_collections"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_the_old_path_gives_the_new_module_and_warns(old: str) -> None:
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
    assert any(old in m and MOVED[old] in m for m in messages), messages
