"""docs/cli.md is the current rendering of the argparse parsers (hessfine.analysis.cli_reference)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from hessfine.analysis.cli import build_parser
from hessfine.analysis.cli_reference import main, render

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "cli.md"
REGENERATE = "docs/cli.md is stale: run python -m hessfine.analysis.cli_reference"


@pytest.fixture(scope="module")
def page() -> str:
    return render()


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_docs_cli_md_is_current(page: str) -> None:
    assert PAGE.read_text(encoding="utf-8") == page, REGENERATE


def test_every_subcommand_and_option_appears(page: str) -> None:
    commands = _commands(build_parser())
    assert set(commands) == {"measure", "finetune", "compare", "figures", "demo", "crosscheck"}
    sections = page.split("\n## ")
    for name, parser in commands.items():
        section = next(s for s in sections if s.startswith(f"hessfine {name}\n"))
        for action in parser._actions:
            for option in action.option_strings:
                assert f"`{option}" in section or f", {option}" in section, (name, option)


def test_rendering_does_not_depend_on_the_terminal(page: str, monkeypatch) -> None:
    for columns in ("40", "300"):
        monkeypatch.setenv("COLUMNS", columns)
        assert render() == page


def test_check_reports_a_stale_page(tmp_path: Path, page: str, capsys) -> None:
    target = tmp_path / "cli.md"
    assert main(["--check", "--output", str(target)]) == 1
    target.write_text(page.replace("measure", "measures", 1), encoding="utf-8")
    assert main(["--check", "--output", str(target)]) == 1
    assert "stale" in capsys.readouterr().err
    assert main(["--output", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == page
    assert main(["--check", "--output", str(target)]) == 0
