"""The pages of ``docs/`` generated from the code they describe, written and checked in one place.

* ``docs/cli.md`` — the command-line reference, from the argparse parsers
  (:mod:`hessfine.analysis.cli_reference`);
* ``docs/schema.md`` — the result files' fields and columns, from
  :mod:`hessfine.analysis.schema`.

From the repository root, ``python -m hessfine.analysis.doc_pages`` rewrites the pages that
changed; ``--check`` writes nothing and exits 1 naming the stale ones (the tests run the same
check, so a change of an option or of a field fails them until the pages are regenerated).

Example:
    >>> sorted(PAGES)
    ['cli.md', 'schema.md']
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hessfine.analysis import cli_reference, schema

PAGES: dict[str, Callable[[], str]] = {
    "cli.md": cli_reference.render,
    "schema.md": schema.render_markdown,
}
"""Page name in ``docs/`` → the function that renders it."""


def stale(directory: Path) -> list[Path]:
    """The pages under ``directory`` whose text is not what the code renders now."""
    out = []
    for name, render in PAGES.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != render():
            out.append(path)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Write the stale pages, or with ``--check`` exit 1 naming them."""
    options = argparse.ArgumentParser(
        prog="python -m hessfine.analysis.doc_pages",
        description="Write the generated pages of docs/ (cli.md, schema.md).",
    )
    options.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 when a page is stale"
    )
    options.add_argument(
        "--docs", type=Path, default=Path("docs"), help="the docs directory (default docs)"
    )
    args = options.parse_args(argv)
    pages = stale(args.docs)
    if args.check:
        for path in pages:
            print(f"{path} is stale; run python -m hessfine.analysis.doc_pages", file=sys.stderr)
        return 1 if pages else 0
    for path in pages:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(PAGES[path.name](), encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
