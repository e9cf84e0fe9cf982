"""The generated pages of docs/ are current, and a stale page is named and rewritten."""

from pathlib import Path

from hessfine.analysis.doc_pages import PAGES, main, stale

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_generated_pages_are_current() -> None:
    assert stale(DOCS) == [], "run: python -m hessfine.analysis.doc_pages"


def test_check_names_a_stale_page_and_writing_fixes_it(tmp_path: Path, capsys) -> None:
    for name in PAGES:
        (tmp_path / name).write_text((DOCS / name).read_text(encoding="utf-8"), encoding="utf-8")
    page = tmp_path / "schema.md"
    page.write_text(page.read_text(encoding="utf-8").replace("field", "entry"), encoding="utf-8")
    assert main(["--check", "--docs", str(tmp_path)]) == 1
    assert str(page) in capsys.readouterr().err
    (tmp_path / "cli.md").unlink()
    assert stale(tmp_path) == [tmp_path / "cli.md", page]
    assert main(["--docs", str(tmp_path)]) == 0
    assert main(["--check", "--docs", str(tmp_path)]) == 0
    assert page.read_text(encoding="utf-8") == (DOCS / "schema.md").read_text(encoding="utf-8")
