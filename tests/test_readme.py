"""The README's two set-up commands and CI stay in sync."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", (ROOT / "README.md").read_text())


def test_readme_has_exactly_two_setup_commands():
    demo, tests = readme_commands()
    assert demo.endswith("hessfine demo --quick")
    assert "pip install torch==2.14.1 torchvision==0.29.1" in demo
    assert tests.endswith("python -m pytest") and "'.[test]'" in tests


def test_ci_runs_the_readme_test_command_then_the_memory_tests():
    *_, ci, memory = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci == readme_commands()[1]
    assert memory == "python -m pytest -m memory"
    assert f"`{memory}`" in (ROOT / "README.md").read_text()


def test_readme_picture_exists():
    picture = re.search(r"!\[[^\]]*\]\(([^)]+)\)", (ROOT / "README.md").read_text()).group(1)
    assert (ROOT / picture).stat().st_size > 10_000


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of the README's section ``## {section}``."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_readme_python_api_example_runs():
    (block,) = python_blocks("Python API")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert set(namespace["forms"]) == {"0.weight", "2.weight"}
    assert namespace["forms"]["2.weight"].route == "ggn-certified"


def test_readme_examples_in_python_and_during_training_run(tmp_path, monkeypatch):
    """The notebook, Trainer and Lightning examples, as written (tiny models, a few CPU steps)."""
    monkeypatch.chdir(tmp_path)
    notebook, trainer, lightning = python_blocks("In Python and during training")
    results = []
    for block in (notebook, trainer, lightning):
        namespace: dict = {"__name__": "__readme__"}
        exec(compile(block, "README.md", "exec"), namespace)
        results.append(namespace)
    assert (tmp_path / "hessfine-out" / "notebook" / "measurement.json").is_file()
    assert results[0]["result"].bounds.theorem_2_1 > 0
    history = results[1]["trainer"].state.log_history
    assert [e["step"] for e in history if "hessfine_theorem_2_1" in e] == [10, 20]
    assert len(list((tmp_path / "hessfine-out" / "trainer" / "hessfine").iterdir())) == 2
    assert "hessfine/theorem_2_1" in results[2]["trainer"].callback_metrics
    found = list((tmp_path / "hessfine-out" / "lightning").rglob("measurement.json"))
    assert len(found) == 2
