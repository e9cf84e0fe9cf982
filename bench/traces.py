"""Benchmark of per-layer Hessian traces against PyHessian and curvlinops (issue 10, item 4).

ResNet-18 (torchvision, 10 classes, random initialisation, eval mode), a batch of random
3×32×32 inputs, float32 on the CPU; all selected layers. Timed in one run, in turn:

* **ours, default** — :func:`hessfine.bounds.estimators.traces.layer_traces`: on layers certified
  piecewise linear (all of ResNet-18) the exact mean of the per-example Tr[G_i] (ghost norms),
  standard error 0;
* **ours, output probes** — the same with ``exact_ggn=False``: each probe is one backward pass
  of a Rademacher combination of the loss curvature's factors through a forward pass shared by
  all probes;
* **ours, Hessian probes** — the same with ``output_probes=False``: one double-backward
  Hessian-vector product per probe, the same work as the peers;
* **PyHessian** ``hessian.trace`` and **curvlinops** ``hutchinson_trace`` on the Hessian of the
  same layers (one Hessian-vector product per probe, Rademacher probes);
* **exact per-example Tr[G_i]** —
  :func:`hessfine.bounds.operators.gauss_newton.gauss_newton_traces` on the whole batch (the trace
  corollary's per-example maximum).

"Speed-up at equal standard error" per layer is (t_peer / t_ours) · (s_H / s_out)², where s_H is
the standard error of the weight-space (Hessian) probes (the peers' estimator) and s_out that of
the output probes, both over the same number of probes: the number of probes needed for a given
standard error scales with the variance. Timings on a shared machine: compare within one run.

``--eigen-steps S`` instead times the per-layer top eigenvalue (``--eigen 1``) with S Lanczos
steps per layer: the layers one at a time (before) against all layers in lockstep sharing one
forward/backward graph per step (:func:`hessfine.bounds.estimators.spectra.top_eigenvalues`,
after).

Usage::

    python bench/traces.py --samples 32 --probes 20 --threads 1 --out traces.json
    python bench/traces.py --samples 32 --eigen-steps 10 --threads 1 --out eigen.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from hessfine.analysis.checkpoints import select_layers
from hessfine.analysis.crosscheck import pyhessian_engine
from hessfine.bounds.estimators.spectra import top_eigenvalues
from hessfine.bounds.estimators.traces import layer_traces
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.operators.gauss_newton import gauss_newton_traces
from hessfine.bounds.safe_autodiff import differentiable
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from quadratic_forms import build_case, write_json  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def curvlinops_trace(model: nn.Module, x, y, layers: Sequence[str], probes: int) -> float:
    """curvlinops' Hutchinson trace of the mean-loss Hessian w.r.t. ``layers``."""
    from curvlinops import HessianLinearOperator, hutchinson_trace

    named = dict(model.named_parameters())
    params = [named[name] for name in layers]
    with torch.random.fork_rng(devices=[]), differentiable():
        torch.manual_seed(0)
        op = HessianLinearOperator(
            model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False
        )
        return float(hutchinson_trace(op, probes))


def pyhessian_trace(model: nn.Module, x, y, layers: Sequence[str], probes: int) -> float:
    """PyHessian's Hutchinson trace (``maxIter`` probes, no early stop)."""
    with pyhessian_engine(model, x, y, layers=layers, seed=0) as engine:
        return statistics.fmean(engine.trace(maxIter=probes, tol=-math.inf))


def run(samples: int, probes: int) -> dict:
    model, x, y = build_case("resnet18", samples)
    layers = select_layers(model, None)
    fmodel, params = FunctionalModel.from_module(model)
    batches = [(x, y)]

    def ours(output_probes: bool, exact_ggn: bool = False):
        return layer_traces(
            fmodel,
            params,
            layers,
            batches,
            probes=probes,
            generator=torch.Generator().manual_seed(0),
            output_probes=output_probes,
            exact_ggn=exact_ggn,
        )

    layer_traces(fmodel, params, layers, [(x[:2], y[:2])], probes=2)  # warm-up
    _, t_default = _timed(lambda: ours(True, True))
    _log(f"  ours, default (exact on certified layers): {t_default:.1f} s")
    out_est, t_out = _timed(lambda: ours(True))
    _log(f"  ours, output probes: {t_out:.1f} s")
    py, t_py = _timed(lambda: pyhessian_trace(model, x, y, layers, probes))
    _log(f"  PyHessian: {t_py:.1f} s")
    cl, t_cl = _timed(lambda: curvlinops_trace(model, x, y, layers, probes))
    _log(f"  curvlinops: {t_cl:.1f} s")
    hess_est, t_hess = _timed(lambda: ours(False))
    _log(f"  ours, Hessian probes: {t_hess:.1f} s")
    exact, t_exact = _timed(lambda: gauss_newton_traces(fmodel, params, layers, x))
    _log(f"  exact per-example Tr[G_i]: {t_exact:.1f} s")
    fastest = min(t_py, t_cl)
    variance_ratio = {name: (hess_est[name].stderr / out_est[name].stderr) ** 2 for name in layers}
    rows = [
        {
            "layer": name,
            "exact_mean": float(exact[name].mean()),
            "output_mean": out_est[name].mean,
            "output_stderr": out_est[name].stderr,
            "hessian_mean": hess_est[name].mean,
            "hessian_stderr": hess_est[name].stderr,
            "variance_ratio": variance_ratio[name],
        }
        for name in layers
    ]
    return {
        "case": "resnet18",
        "samples": samples,
        "probes": probes,
        "layers": len(layers),
        "seconds": {
            "ours_default_exact": t_default,
            "ours_output_probes": t_out,
            "ours_hessian_probes": t_hess,
            "pyhessian": t_py,
            "curvlinops": t_cl,
            "exact_per_example_ggn": t_exact,
        },
        "totals": {
            "exact": sum(r["exact_mean"] for r in rows),
            "ours_output_probes": sum(r["output_mean"] for r in rows),
            "ours_hessian_probes": sum(r["hessian_mean"] for r in rows),
            "pyhessian": py,
            "curvlinops": cl,
        },
        "speedup_default_exact": fastest / t_default,
        "speedup_equal_probes": fastest / t_out,
        "speedup_equal_probes_hessian_probes": fastest / t_hess,
        "speedup_equal_stderr_min_layer": fastest / t_out * min(variance_ratio.values()),
        "speedup_equal_stderr_median_layer": fastest
        / t_out
        * statistics.median(variance_ratio.values()),
        "exact_over_output_probes_time": t_exact / t_out,
        "layers_detail": rows,
    }


def eigen_speed(samples: int, steps: int) -> dict:
    """Per-layer top eigenvalue: one layer at a time against all layers in lockstep."""
    model, x, y = build_case("resnet18", samples)
    layers = select_layers(model, None)
    fmodel, params = FunctionalModel.from_module(model)

    def top(names):
        return top_eigenvalues(
            fmodel, params, names, [(x, y)], k=1, steps=steps, generator=torch.Generator()
        )

    top(layers[-1:])  # warm-up
    alone, t_alone = _timed(lambda: {n: top([n])[n] for n in layers})
    _log(f"  one layer at a time: {t_alone:.1f} s")
    together, t_together = _timed(lambda: top(layers))
    _log(f"  lockstep: {t_together:.1f} s")
    worst = max(
        abs(together[n].values[0] - alone[n].values[0]) / abs(alone[n].values[0]) for n in layers
    )
    return {
        "case": "resnet18",
        "samples": samples,
        "steps": steps,
        "layers": len(layers),
        "one_at_a_time_s": t_alone,
        "lockstep_s": t_together,
        "speedup": t_alone / t_together,
        "max_relative_difference": worst,
    }


def markdown(r: dict) -> str:
    s, t = r["seconds"], r["totals"]
    lines = [
        f"ResNet-18, {r['samples']} examples, {r['layers']} layers, {r['probes']} probes",
        "",
        "| method | time (s) | Σ_i trace |",
        "|---|---|---|",
        f"| ours, default: exact on certified layers | {s['ours_default_exact']:.1f} "
        f"| {t['exact']:.4g} |",
        f"| ours, output probes | {s['ours_output_probes']:.1f} | {t['ours_output_probes']:.4g} |",
        f"| ours, Hessian probes | {s['ours_hessian_probes']:.1f} | {t['ours_hessian_probes']:.4g} |",
        f"| PyHessian | {s['pyhessian']:.1f} | {t['pyhessian']:.4g} |",
        f"| curvlinops | {s['curvlinops']:.1f} | {t['curvlinops']:.4g} |",
        f"| exact per-example Tr[G_i] (all examples) | {s['exact_per_example_ggn']:.1f} "
        f"| {t['exact']:.4g} |",
        "",
        f"speed-up of the default (exact, s.e. 0) over the faster peer: "
        f"{r['speedup_default_exact']:.1f}×; output probes at equal probes: "
        f"{r['speedup_equal_probes']:.2f}× "
        f"(Hessian probes: {r['speedup_equal_probes_hessian_probes']:.2f}×); at equal standard "
        f"error: {r['speedup_equal_stderr_min_layer']:.1f}× (worst layer), "
        f"{r['speedup_equal_stderr_median_layer']:.1f}× (median layer); exact per-example "
        f"Tr[G_i] / output-probe Hutchinson time: {r['exact_over_output_probes_time']:.2f}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eigen-steps", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.eigen_steps:
        result = eigen_speed(args.samples, args.eigen_steps)
        write_json(args.out, result)
        print(json.dumps(result, indent=2))
        return 0
    result = run(args.samples, args.probes)
    write_json(args.out, result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
