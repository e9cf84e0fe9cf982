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


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == readme_commands()[1]


def test_readme_picture_exists():
    picture = re.search(r"!\[[^\]]*\]\(([^)]+)\)", (ROOT / "README.md").read_text()).group(1)
    assert (ROOT / picture).stat().st_size > 10_000


def test_readme_python_api_example_runs():
    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert set(namespace["forms"]) == {"0.weight", "2.weight"}
    assert namespace["forms"]["2.weight"].route == "ggn-certified"
