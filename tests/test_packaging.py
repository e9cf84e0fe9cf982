"""One import name: a regular (non-editable) install adds only ``hessfine`` to site-packages:
the package's own ``__init__`` and integrations (the folder ``hessfine/``) with the four folders
mapped under it.

The wheel is built from a copy of the sources with the environment's setuptools (no build
isolation, so no network), installed with pip into a temporary target, and used from a directory
that holds its own ``analysis/`` and ``figures/`` packages — the layout of many research
repositories, where four generic top-level names would be shadowed (or would shadow).
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hessfine.analysis.model_specs import build_model

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (
    "setup.cfg",
    "pyproject.toml",
    "README.md",
    "hessfine",
    "bounds",
    "analysis",
    "figures",
    "finetune",
)


def _run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, the pip --target directory it was installed into)."""
    pytest.importorskip("wheel", reason="building a wheel without isolation needs 'wheel'")
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check", "-q")
    _run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), ".", cwd=src)
    (wheel,) = (tmp / "dist").glob("hessfine-*.whl")
    target = tmp / "site"
    _run(*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel), cwd=tmp)
    return wheel, target


def test_wheel_has_the_one_top_level_name_hessfine(installed):
    wheel, target = installed
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"hessfine"}
    packages = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert packages - {"bin"} == {"hessfine"}
    assert {"__init__.py", "integrations", "analysis", "bounds", "figures", "finetune"} <= {
        p.name for p in (target / "hessfine").iterdir()
    }
    assert (target / "hessfine" / "integrations" / "transformers.py").is_file()


def test_installed_package_works_next_to_a_users_analysis_and_figures(installed, tmp_path):
    _, target = installed
    for name in ("analysis", "figures"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'user {name}'\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    script = target / "bin" / "hessfine"  # the console script, run in the same interpreter
    check = (
        "import runpy, sys\n"
        "import analysis, figures, hessfine.analysis.measure as m, hessfine.figures.tables as t\n"
        "from hessfine.analysis.model_specs import build_model\n"
        "assert analysis.OWNER == 'user analysis' and figures.OWNER == 'user figures'\n"
        f"assert m.__file__.startswith({str(target)!r}), m.__file__\n"
        f"assert t.__file__.startswith({str(target)!r}), t.__file__\n"
        "import hessfine\n"
        f"assert hessfine.__file__.startswith({str(target)!r}), hessfine.__file__\n"
        "assert hessfine.measure_model.__module__ == 'hessfine.analysis.python_api'\n"
        "print(type(build_model('finetune.models:digits_cnn', {})).__module__)\n"
        f"sys.argv = ['hessfine', 'measure', '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    assert stop.code in (0, None), stop.code\n"
    )
    out = _run(sys.executable, "-c", check, cwd=tmp_path, env=env).stdout
    assert out.splitlines()[0] == "hessfine.finetune.digit_networks"
    assert "--sample-order" in out


def test_legacy_manifest_spec_still_builds():
    """Run manifests written before the rename name ``finetune.models:digits_cnn``."""
    net = build_model("finetune.models:digits_cnn", {"num_classes": 4})
    assert type(net).__module__ == "hessfine.finetune.digit_networks"
