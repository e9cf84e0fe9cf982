"""Mutation testing of the core of ``bounds/``: how many small source changes does the suite catch?

A mutant is the module's source with ONE small AST change (DeMillo, Lipton & Sayward, "Hints on
test data selection", 1978; the operator set of mutmut / PIT, written here from scratch):

* arithmetic ``+ ↔ -``, ``* ↔ /``, ``** → *``, ``// → /`` (also in ``x op= y``);
* comparisons ``< ↔ <=``, ``> ↔ >=``, ``== ↔ !=``, ``is ↔ is not``, ``in ↔ not in``;
* ``and ↔ or``; dropping a unary ``-`` or ``not``;
* numeric constants ``k → k + 1`` (integers), ``c → 2c`` (floats, ``0.0 → 1.0``), ``True ↔ False``;
* ``max ↔ min`` (builtins, methods, ``torch.maximum ↔ torch.minimum``, ``clamp_min ↔ clamp_max``).

Docstrings, other strings, annotations and the bodies of ``raise`` statements are not mutated.
Every mutant runs the module's test selection (``TESTS``) with ``-x`` and a timeout; a mutant is
*killed* when a test fails or times out. Tests run in a snapshot of the repository under a
scratch directory (``--workdir``), so the working tree is never modified. To keep the cost low
the parent process imports torch and scipy once and each mutant runs in a forked child that
re-imports only ``hessfine`` and ``tests``.

Survivors are listed with their line and change; judge each as equivalent (same behaviour for
every input) or as a gap in the tests.

Run (background, niced; a few seconds per mutant)::

    nice -n 10 python bench/mutation.py --sample 320 --seed 0 --out /tmp/mutation.json \
        > /tmp/mutation.log 2>&1 &
    python bench/mutation.py --report /tmp/mutation.json
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# pytest arguments per module: the fast tests that exercise it (fastest first, run with -x).
TESTS: dict[str, list[str]] = {
    "bounds/estimators/quadratic_forms.py": [
        "tests/test_quadratic_forms.py",
        "-k",
        "not half_step and not converges_with",
    ],
    "bounds/linalg/lanczos.py": ["tests/test_lanczos.py"],
    "bounds/linalg/positive_quadrature.py": [
        "tests/test_positive_quadrature.py",
        "tests/test_quadratic_forms.py::test_positive_part_exact_when_steps_reach_dimension",
    ],
    "bounds/estimators/traces.py": ["tests/test_traces.py"],
    "bounds/pac_bayes.py": ["tests/test_pac_bayes.py"],
    "bounds/generalization.py": ["tests/test_generalization.py"],
    "bounds/operators/mean_loss.py": ["tests/test_mean_loss.py"],
    "bounds/operators/per_example.py": ["tests/test_per_example.py"],
    "bounds/operators/retained.py": ["tests/test_retained.py"],
    "bounds/operators/gauss_newton.py": ["tests/test_gauss_newton.py"],
    "bounds/operators/layer_io.py": ["tests/test_layer_io.py"],
    "bounds/operators/certification.py": ["tests/test_certification.py"],
}

_BINOPS = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.Pow: ast.Mult,
    ast.FloorDiv: ast.Div,
}
_CMPOPS = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_NAMES = {
    "max": "min",
    "min": "max",
    "maximum": "minimum",
    "minimum": "maximum",
    "clamp_min": "clamp_max",
    "clamp_max": "clamp_min",
    "amax": "amin",
    "amin": "amax",
}


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int
    line: int
    description: str


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes never mutated: docstrings, annotations, raise statements, f-strings."""
    skip: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.Raise | ast.JoinedStr | ast.Assert):
            mark(node)
        elif isinstance(node, ast.arg):
            mark(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            mark(node.returns)
        elif isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                mark(first)
    return skip


def _sites(tree: ast.AST) -> list[tuple[ast.AST, str, object]]:
    """(node, kind, replacement) for every mutation of ``tree``, in a deterministic order."""
    skip = _skipped_nodes(tree)
    out: list[tuple[ast.AST, str, object]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.BinOp | ast.AugAssign) and type(node.op) in _BINOPS:
            out.append((node, "op", _BINOPS[type(node.op)]))
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _CMPOPS:
                    out.append((node, f"cmp{i}", _CMPOPS[type(op)]))
        elif isinstance(node, ast.BoolOp):
            out.append((node, "bool", ast.Or if isinstance(node.op, ast.And) else ast.And))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.Not):
            out.append((node, "unary", None))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            value = node.value
            if isinstance(value, bool):
                new = not value
            elif isinstance(value, int):
                new = value + 1
            else:
                new = 2.0 * value if value != 0.0 else 1.0
            out.append((node, "const", new))
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in _NAMES:
                out.append((node, "name", _NAMES[func.id]))
            elif isinstance(func, ast.Attribute) and func.attr in _NAMES:
                out.append((node, "attr", _NAMES[func.attr]))
    return out


def _apply(node: ast.AST, kind: str, new: object) -> ast.AST | None:
    """Mutate ``node`` in place; return a replacement node for unary removal."""
    if kind == "op":
        node.op = new()
    elif kind.startswith("cmp"):
        node.ops[int(kind[3:])] = new()
    elif kind == "bool":
        node.op = new()
    elif kind == "unary":
        return node.operand
    elif kind == "const":
        node.value = new
    elif kind == "name":
        node.func.id = new
    elif kind == "attr":
        node.func.attr = new
    return None


class _Replace(ast.NodeTransformer):
    def __init__(self, target: ast.AST, replacement: ast.AST) -> None:
        self.target, self.replacement = target, replacement

    def generic_visit(self, node: ast.AST) -> ast.AST:
        if node is self.target:
            return self.replacement
        return super().generic_visit(node)


def mutants_of(module: str, root: Path = ROOT) -> tuple[str, list[Mutant]]:
    source = (root / module).read_text()
    tree = ast.parse(source)
    mutants = []
    for index, (node, kind, new) in enumerate(_sites(tree)):
        before = ast.unparse(node).splitlines()[0][:60]
        clone = copy.deepcopy(tree)
        target = _sites(clone)[index][0]
        replacement = _apply(target, kind, new)
        after = ast.unparse(replacement if replacement is not None else target)
        mutants.append(
            Mutant(module, index, node.lineno, f"{before}  →  {after.splitlines()[0][:60]}")
        )
    return source, mutants


def mutated_source(source: str, index: int) -> str:
    """``source`` with mutation number ``index`` of :func:`_sites` applied."""
    tree = ast.parse(source)
    node, kind, new = _sites(tree)[index]
    replacement = _apply(node, kind, new)
    if replacement is not None:
        tree = _Replace(node, replacement).visit(tree)
    return ast.unparse(ast.fix_missing_locations(tree))


def snapshot(workdir: Path) -> None:
    """A copy of the package (as ``hessfine``), the tests and setup.cfg under ``workdir``."""
    if workdir.exists():
        shutil.rmtree(workdir)
    package = workdir / "src" / "hessfine"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for folder in ("bounds", "analysis", "figures", "finetune"):
        shutil.copytree(
            ROOT / folder, package / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copytree(ROOT / "tests", workdir / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", workdir / "setup.cfg")


def run_tests(workdir: Path, tests: list[str], timeout: float) -> str:
    """'killed', 'survived' or 'timeout' for the mutant currently written under ``workdir``."""
    pid = os.fork()
    if pid == 0:
        os.chdir(workdir)
        sys.path.insert(0, str(workdir / "src"))
        sys.path.insert(0, str(workdir))
        for name in list(sys.modules):
            if name == "hessfine" or name.startswith(("hessfine.", "tests.test_")):
                del sys.modules[name]
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        import pytest

        code = pytest.main([*tests, "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"])
        os._exit(int(code))
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.05)


def report(path: Path) -> None:
    data = json.loads(path.read_text())
    results = data["results"]
    print(f"{len(results)} mutants")
    for module in sorted({r["module"] for r in results}):
        rows = [r for r in results if r["module"] == module]
        killed = sum(r["outcome"] != "survived" for r in rows)
        print(f"  {module}: {killed}/{len(rows)} killed ({100 * killed / len(rows):.1f}%)")
    killed = sum(r["outcome"] != "survived" for r in results)
    print(f"total: {killed}/{len(results)} killed ({100 * killed / max(len(results), 1):.1f}%)")
    print("survivors:")
    for r in results:
        if r["outcome"] == "survived":
            print(f"  {r['module']}:{r['line']} #{r['index']}  {r['description']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="*", default=list(TESTS))
    parser.add_argument("--sample", type=int, default=0, help="mutants to draw (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated module:index to (re)run")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hessfine-mutation"))
    parser.add_argument("--timeout-factor", type=float, default=8.0)
    parser.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="fixed seconds per mutant (default: from baselines)",
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/mutation.json"))
    parser.add_argument("--report", type=Path, help="print the summary of a results file")
    parser.add_argument(
        "--all-tests", action="store_true", help="drop the -k filters (e.g. to re-run survivors)"
    )
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    snapshot(args.workdir)
    # Imported once here and shared by the forked children (none of them imports hessfine).
    sys.path.insert(0, str(args.workdir))
    import pytest  # noqa: F401
    import scipy.optimize  # noqa: F401
    import scipy.stats  # noqa: F401
    import torch

    import tests.oracles  # noqa: F401

    torch.set_num_threads(1)
    # Mutants are made from the snapshot, so edits to the working tree during a run do not leak in.
    package = args.workdir / "src" / "hessfine"
    originals, pool = {}, []
    for module in args.modules:
        originals[module], mutants = mutants_of(module, package)
        pool.extend(mutants)
    if args.only:
        wanted = {tuple(item.rsplit(":", 1)) for item in args.only.split(",")}
        pool = [m for m in pool if (m.module, str(m.index)) in wanted]
    else:
        # A random order, so that a run stopped early is still a uniform sample.
        random.Random(args.seed).shuffle(pool)
        pool = pool[: args.sample or None]
    selections = {module: list(TESTS[module]) for module in TESTS}
    if args.all_tests:
        for chosen in selections.values():
            while "-k" in chosen:
                at = chosen.index("-k")
                del chosen[at : at + 2]
    tests = {
        module: [
            t
            for t in selections[module]
            if not t.startswith("tests/") or (args.workdir / t.split("::")[0]).exists()
        ]
        for module in TESTS
    }
    baseline = {}
    for module in sorted({m.module for m in pool}):
        start = time.monotonic()
        outcome = run_tests(args.workdir, tests[module], timeout=1200)
        baseline[module] = time.monotonic() - start
        if outcome != "survived":
            sys.exit(f"the unmutated tests for {module} fail: fix them first")
        print(f"baseline {module}: {baseline[module]:.1f}s", flush=True)
    results = []
    for i, mutant in enumerate(pool):
        target = package / mutant.module
        original = originals[mutant.module]
        target.write_text(mutated_source(original, mutant.index))
        try:
            timeout = args.timeout or args.timeout_factor * baseline[mutant.module] + 60
            outcome = run_tests(args.workdir, tests[mutant.module], timeout)
        finally:
            target.write_text(original)
        results.append({**asdict(mutant), "outcome": outcome})
        print(f"[{i + 1}/{len(pool)}] {outcome:8s} {mutant}", flush=True)
        args.out.write_text(json.dumps({"baseline_s": baseline, "results": results}, indent=1))
    report(args.out)


if __name__ == "__main__":
    main()
