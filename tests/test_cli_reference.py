"""docs/cli.md is the current rendering of the argparse parsers (hessfine.analysis.cli_reference)."""

from __future__ import annotations

import argparse

import pytest
from hessfine.analysis.cli import build_parser
from hessfine.analysis.cli_reference import render


@pytest.fixture(scope="module")
def page() -> str:
    return render()


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


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
