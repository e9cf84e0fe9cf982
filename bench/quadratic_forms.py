"""Benchmark of the exact per-example Hessian block quadratic forms
(results in bench/BENCHMARKS.md).

For every selected layer i and every example (x, y) of a batch, the paper's per-layer quantity
needs v_iᵀ H_i(x) v_i, where H_i(x) is layer i's diagonal block of the Hessian of ℓ(f_W(x), y)
and v_i = W_i − W_i^(s) (Ju, Li & Zhang, ICML 2022, Theorem 2.1).

* **baseline** — the straightforward exact method: a Python loop over examples; per example one
  backward pass with ``create_graph=True`` for the gradients of all selected layers, then per
  layer a double-backward Hessian-vector product H_i v_i = ∇_{W_i}(g_i · v_i) and the dot
  product v_i · H_i v_i (Pearlmutter, Neural Computation 1994).
* **ours** — :func:`hessfine.bounds.estimators.quadratic_forms.quadratic_forms` with the
  estimators ``block`` (v_iᵀH_iv_i exactly), ``auto`` (v_iᵀH_i⁺v_i: single-JVP Gauss–Newton on
  layers certified piecewise linear, Lanczos quadrature elsewhere) and ``ggn`` (v_iᵀG_iv_i), all
  batched.

Cases: (a) torchvision ``resnet18(num_classes=10)``, (b) a torchvision ``VisionTransformer``
(image 32, patch 8, 4 layers, 4 heads, width 64, MLP 128, 10 classes); random initialisation,
random 3×32×32 inputs, float32 on the CPU, v_i = 1e-2 · N(0, 1) · mean|W_i|. Reported: wall
times, the speed-up over the baseline, the largest relative difference between ours and the
baseline (on the per-layer max and mean over examples, relative to the layer's largest
|baseline value|; where the estimator's quantity coincides with the raw block), and the cost in
forward-pass units (time / time of one no-grad forward pass of the batch / number of layers).

Two side studies:

* positive-part accuracy against the number of Lanczos steps K (ViT, the attention output
  projections, first examples): |Q_K − v_iᵀH_i⁺v_i| / max_x |v_iᵀH_i⁺v_i| with the exact value
  from the dense per-example block (assembled from Hessian-vector products) and ``eigh``;
* time per Hutchinson probe of :func:`hessfine.bounds.estimators.traces.layer_traces` against
  PyHessian's ``trace`` (both over all selected layers and the whole batch).

* ``--positive-speed``: the positive part v_iᵀH_i⁺v_i on the smooth (uncertified) layers of a
  small GELU ViT (image 32, patch 8, 2 layers, width 32, 4 heads, MLP 64), in the unit of the
  issue: time relative to ``block`` on the same layers and examples (one per-example HVP per
  layer). Before: fixed 32-step Gauss quadrature (the previous ``auto``); after: the adaptive
  Gauss–Radau rule at ``positive_rtol`` 1e-2 and 1e-3; each layer's reported max against the
  converged value (Gauss–Radau, 256 steps, no early stop), and its mean (signed, a lower bound)
  and ``mean_upper`` against the converged mean.

Usage::

    python bench/quadratic_forms.py --case all --samples 64 --threads 2 --out results.json
    python bench/quadratic_forms.py --positive-speed --samples 32 --threads 1 --out positive.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from hessfine.analysis.checkpoints import select_layers
from hessfine.analysis.crosscheck import pyhessian_engine
from hessfine.bounds.estimators.quadratic_forms import quadratic_forms
from hessfine.bounds.estimators.traces import layer_traces
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.linalg.lanczos import lanczos, quadrature
from hessfine.bounds.operators.per_example import per_example_hvp
from hessfine.bounds.safe_autodiff import differentiable
from torch import Tensor, nn
from torch.func import vmap

ESTIMATORS = ("block", "auto", "ggn")
LANCZOS_STEPS = (4, 8, 16, 32, 64)


def build_case(case: str, samples: int, *, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """The randomly initialised float32 network of ``case`` and a random batch of inputs/labels."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if case == "resnet18":
            model = torchvision.models.resnet18(num_classes=10)
        elif case in ("vit", "vit-small"):
            # vit-small: the issue 10 GELU ViT (2 layers, width 32, MLP 64)
            small = case == "vit-small"
            model = torchvision.models.VisionTransformer(
                image_size=32,
                patch_size=8,
                num_layers=2 if small else 4,
                num_heads=4,
                hidden_dim=32 if small else 64,
                mlp_dim=64 if small else 128,
                num_classes=10,
            )
            # torchvision zero-initialises the classifier, which makes every logit constant and
            # every Hessian block of the other layers zero; give it the default Linear init.
            model.heads.head.reset_parameters()
        else:
            raise ValueError(f"unknown case {case!r}; choose resnet18, vit or vit-small")
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(samples, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    return model.eval(), x, y


def random_directions(
    params: Mapping[str, Tensor], layers: Sequence[str], *, scale: float = 1e-2, seed: int = 2
) -> dict[str, Tensor]:
    """v_i = W_i − W_i^(s) for the reference W^(s) = W − scale · N(0, 1) · mean|W_i|."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in layers:
        w = params[name]
        noise = torch.randn(w.shape, generator=g, dtype=w.dtype)
        out[name] = scale * noise * w.abs().mean()
    return out


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def forward_time(fmodel: FunctionalModel, params: Mapping[str, Tensor], x: Tensor) -> float:
    """Median wall time of one no-grad forward pass of the batch (after a warm-up)."""
    times = []
    with torch.no_grad():
        fmodel.logits(params, x)
        for _ in range(5):
            times.append(_timed(lambda: fmodel.logits(params, x))[1])
    return statistics.median(times)


def baseline_forms(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
) -> Tensor:
    """(N, L) values v_iᵀ H_i(x_n) v_i by a loop over examples and double-backward HVPs."""
    names = list(directions)
    weights = [params[name].detach().clone().requires_grad_(True) for name in names]
    full = {**params, **dict(zip(names, weights, strict=True))}
    out = torch.empty(x.shape[0], len(names), dtype=torch.float64)
    with differentiable():
        for n in range(x.shape[0]):
            loss = F.cross_entropy(fmodel.logits(full, x[n : n + 1]), y[n : n + 1])
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            for i, (g, w, name) in enumerate(zip(grads, weights, names, strict=True)):
                v = directions[name]
                (hv,) = torch.autograd.grad((g * v).sum(), w, retain_graph=True)
                out[n, i] = float((hv * v).sum())
    return out


@dataclass(frozen=True)
class EstimatorTiming:
    """Wall time of one estimator on the whole batch and its agreement with the baseline."""

    estimator: str
    seconds: float
    speedup: float
    forward_units_per_layer: float
    compared_layers: int
    max_relative_difference: float | None
    argmax_agreement: float | None
    methods: dict[str, int]


def _agreement(
    forms: Mapping[str, object], base: Tensor, layers: Sequence[str], compared: Sequence[str]
) -> tuple[float, float]:
    """Largest |ours − baseline| / max_n |baseline| (on max and mean) over the ``compared``
    layers, and the fraction of them whose argmax agrees."""
    worst, same = 0.0, 0
    for name in compared:
        column = base[:, layers.index(name)]
        scale = float(column.abs().max().clamp_min(1e-30))
        form = forms[name]
        worst = max(
            worst,
            abs(form.max - float(column.max())) / scale,
            abs(form.mean - float(column.mean())) / scale,
        )
        same += int(form.argmax == int(column.argmax()))
    return worst, same / len(compared)


def run_case(
    case: str,
    samples: int,
    *,
    estimators: Sequence[str] = ESTIMATORS,
    trace_probes: int,
    lanczos_examples: int,
) -> dict:
    """Everything measured on one case; returns a JSON-ready dict."""
    model, x, y = build_case(case, samples)
    layers = select_layers(model, None)
    fmodel, params = FunctionalModel.from_module(model)
    directions = random_directions(params, layers)
    t_forward = forward_time(fmodel, params, x)

    baseline_forms(fmodel, params, directions, x[:1], y[:1])  # warm-up
    base, t_base = _timed(lambda: baseline_forms(fmodel, params, directions, x, y))
    _log(f"  forward {t_forward:.3f} s, baseline {t_base:.2f} s")

    runs = []
    for estimator in estimators:
        quadratic_forms(fmodel, params, directions, [(x[:2], y[:2])], estimator=estimator)
        forms, seconds = _timed(
            lambda e=estimator: quadratic_forms(fmodel, params, directions, [(x, y)], estimator=e)
        )
        _log(f"  {estimator}: {seconds:.2f} s")
        runs.append((estimator, forms, seconds))
    # Layers certified piecewise linear: there H_i = G_i = H_i⁺, so every estimator computes the
    # raw block's value and can be compared with the baseline; `block` is compared everywhere.
    certified = [
        name for name in layers if any(forms[name].route == "ggn-certified" for _, forms, _ in runs)
    ]
    timings = []
    for estimator, forms, seconds in runs:
        compared = layers if estimator == "block" else certified
        methods: dict[str, int] = {}
        for form in forms.values():
            methods[form.route] = methods.get(form.route, 0) + 1
        difference, argmax = _agreement(forms, base, layers, compared) if compared else (None, None)
        timings.append(
            EstimatorTiming(
                estimator=estimator,
                seconds=seconds,
                speedup=t_base / seconds,
                forward_units_per_layer=seconds / t_forward / len(layers),
                compared_layers=len(compared),
                max_relative_difference=difference,
                argmax_agreement=argmax,
                methods=methods,
            )
        )
    result = {
        "case": case,
        "samples": samples,
        "layers": len(layers),
        "weights": sum(params[name].numel() for name in layers),
        "forward_s": t_forward,
        "baseline_s": t_base,
        "baseline_forward_units_per_layer": t_base / t_forward / len(layers),
        "estimators": [asdict(t) for t in timings],
        "trace_cost": trace_cost(model, x, y, layers, probes=trace_probes),
    }
    if case == "vit" and lanczos_examples > 0:
        projections = [name for name in layers if name.endswith("self_attention.out_proj.weight")]
        result["lanczos"] = lanczos_accuracy(
            fmodel,
            params,
            directions,
            x[:lanczos_examples],
            y[:lanczos_examples],
            layers=sorted({projections[0], projections[-1]}, key=projections.index),
        )
    return result


def dense_blocks(
    fmodel: FunctionalModel, params: Mapping[str, Tensor], name: str, x: Tensor, y: Tensor
) -> Tensor:
    """(N, d, d) per-example blocks H_i(x_n), columns from vmapped Hessian-vector products."""
    matvec = per_example_hvp(fmodel, params, name, x, y)
    d, n = params[name].numel(), x.shape[0]
    eye = torch.eye(d, dtype=params[name].dtype)
    columns = []
    with differentiable():
        for start in range(0, d, 256):
            basis = eye[start : start + 256]
            tangents = basis[:, None, :].expand(-1, n, -1)
            columns.append(vmap(matvec)(tangents))  # (c, N, d): column j of every H_n
    H = torch.cat(columns).permute(1, 2, 0)
    return (H + H.transpose(1, 2)) / 2


def lanczos_accuracy(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    layers: Sequence[str],
    steps: Sequence[int] = LANCZOS_STEPS,
) -> list[dict]:
    """Error of the K-step Lanczos quadrature of v_iᵀH_i⁺(x)v_i against dense ``eigh``.

    One Lanczos run of max(steps) steps started from v_i (per example, batched); the K-step
    quadrature uses its leading K×K tridiagonal, which is what a K-step run computes.
    """
    rows = []
    for name in layers:
        v = directions[name].reshape(-1)
        H, t_dense = _timed(lambda name=name: dense_blocks(fmodel, params, name, x, y))
        lam, U = (t.double() for t in torch.linalg.eigh(H))
        _log(f"  dense blocks of {name}: {t_dense:.1f} s (+ eigh)")
        v64 = v.double()
        exact = ((U.transpose(1, 2) @ v64) ** 2 * lam.clamp(min=0)).sum(dim=1)
        raw = torch.einsum("i,nij,j->n", v64, H.double(), v64)
        scale = float(exact.abs().max())
        matvec = per_example_hvp(fmodel, params, name, x, y)
        with differentiable():
            result, seconds = _timed(
                lambda matvec=matvec, v=v: lanczos(
                    matvec, v.reshape(1, -1).expand(x.shape[0], -1).clone(), steps=max(steps)
                )
            )
        for k in steps:
            values = quadrature(result, lambda lam: lam.clamp(min=0.0), k=k).double()
            error = (values - exact).abs() / scale
            rows.append(
                {
                    "layer": name,
                    "numel": v.numel(),
                    "examples": x.shape[0],
                    "steps": k,
                    "max_relative_error": float(error.max()),
                    "mean_relative_error": float(error.mean()),
                    "seconds": seconds * k / max(steps),
                    "dense_seconds": t_dense,
                    "negative_eigenvalue_fraction": float((lam < 0).double().mean()),
                    "truncation_effect": float(((exact - raw).abs() / scale).max()),
                }
            )
    return rows


def trace_cost(
    model: nn.Module, x: Tensor, y: Tensor, layers: Sequence[str], *, probes: int
) -> dict:
    """Seconds per Hutchinson probe: ours (all layers, whole batch) against PyHessian's ``trace``."""
    fmodel, params = FunctionalModel.from_module(model)
    layer_traces(fmodel, params, layers, [(x[:2], y[:2])], probes=2)  # warm-up
    traces, ours = _timed(
        lambda: layer_traces(
            fmodel,
            params,
            layers,
            [(x, y)],
            probes=probes,
            generator=torch.Generator().manual_seed(0),
        )
    )

    def theirs() -> list[float]:
        with pyhessian_engine(model, x, y, layers=layers, seed=0) as engine:
            return engine.trace(maxIter=probes, tol=-math.inf)

    samples, t_theirs = _timed(theirs)
    _log(f"  trace: ours {ours / probes:.3f} s/probe, PyHessian {t_theirs / probes:.3f} s/probe")
    return {
        "probes": probes,
        "ours_s_per_probe": ours / probes,
        "pyhessian_s_per_probe": t_theirs / probes,
        "ours_trace": sum(t.mean for t in traces.values()),
        "pyhessian_trace": statistics.fmean(samples),
    }


def gauss_positive_fixed(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
) -> dict[str, float]:
    """The previous ``auto`` on smooth layers: per layer max_x of K-step Gauss quadrature."""
    out = {}
    with differentiable():
        for name, v in directions.items():
            matvec = per_example_hvp(fmodel, params, name, x, y)
            start = v.reshape(1, -1).expand(x.shape[0], -1).clone()
            result = lanczos(matvec, start, steps=steps)
            out[name] = float(quadrature(result, lambda lam: lam.clamp(min=0.0)).max())
    return out


RUNS = {
    "max 1e-2": ("max", 1e-2, 128, 10),
    "mean 1e-2": ("mean", 1e-2, 128, None),
    "max 1e-3": ("max", 1e-3, 256, 25),
}
"""The adaptive runs of :func:`positive_speed`: target, rtol, step cap, wall-time target (× block;
issue 10 set 10× and 25× for the max; the mean has none)."""


def positive_speed(samples: int, *, reference_steps: int = 256, repeats: int = 3) -> dict:
    """Cost of the positive part relative to ``block`` and its error, per smooth layer.

    ``block`` and the adaptive runs (:data:`RUNS`: target max at rtol 1e-2 and 1e-3, target
    mean at 1e-2) are timed ``repeats`` times, interleaved (block, then each run, block, …), so
    that each ratio is taken within one time window of a shared machine; the reported seconds
    and ratios are medians over the repeats. Errors of the max and of the mean are against a
    reference of ``reference_steps`` steps with no early stop (its own rigorous bracket is
    recorded beside it), and each run's mean interval [mean_lower, mean_upper] relative to it.

    Also records the load average at start and end (the timings are only comparable within a
    run on a shared machine), which source tree of hessfine was measured, and whether the
    wall-time targets are met with every layer's max within rtol of the reference.
    """
    from hessfine import bounds
    from hessfine.bounds.operators.certification import (
        certification_tolerance,
        certify_piecewise_linear,
    )

    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    load_start = os.getloadavg()
    model, x, y = build_case("vit-small", samples)
    fmodel, params = FunctionalModel.from_module(model)
    layers = select_layers(model, None)
    with differentiable():
        residuals = certify_piecewise_linear(fmodel, params, layers, x)
    smooth = [n for n in layers if residuals[n] > certification_tolerance(params[n].dtype)]
    directions = random_directions(params, smooth)
    batches = [(x, y)]

    def forms(**options):
        return quadratic_forms(fmodel, params, directions, batches, **options)

    forms(estimator="block")  # warm-up
    block_times: list[float] = []
    times: dict[str, list[float]] = {label: [] for label in RUNS}
    ratios: dict[str, list[float]] = {label: [] for label in RUNS}
    results = {}
    for repeat in range(repeats):
        t_block = _timed(lambda: forms(estimator="block"))[1]
        block_times.append(t_block)
        _log(f"  [{repeat + 1}/{repeats}] block on {len(smooth)} smooth layers: {t_block:.2f} s")
        for label, (target, rtol, cap, _) in RUNS.items():
            results[label], seconds = _timed(
                lambda target=target, rtol=rtol, cap=cap: forms(
                    estimator="positive",
                    positive_target=target,
                    positive_rtol=rtol,
                    lanczos_steps=cap,
                )
            )
            times[label].append(seconds)
            ratios[label].append(seconds / t_block)
            _log(f"  [{repeat + 1}/{repeats}] {label}: {seconds:.2f} s")
    t_block = statistics.median(block_times)
    before, t_before = _timed(
        lambda: gauss_positive_fixed(fmodel, params, directions, x, y, steps=32)
    )
    _log(f"  before (Gauss, K = 32): {t_before:.1f} s")
    reference, t_reference = _timed(
        lambda: forms(estimator="positive", positive_rtol=0.0, lanczos_steps=reference_steps)
    )
    _log(f"  reference ({reference_steps} steps): {t_reference:.1f} s")
    rows = []
    for name in smooth:
        ref = reference[name]
        exact, mean = ref.max, ref.mean
        row = {
            "layer": name,
            "numel": params[name].numel(),
            "reference_max": exact,
            "reference_max_error_bound": ref.max_error_estimate / abs(exact),
            "reference_mean_width": (ref.mean_upper - ref.mean_lower) / abs(mean),
            "before_rel_error": abs(before[name] - exact) / abs(exact),
        }
        for label in RUNS:
            form, d = results[label][name], results[label][name].diagnostics
            row[f"{label}_rel_error"] = abs(form.max - exact) / abs(exact)
            row[f"{label}_error_bound"] = form.max_error_estimate / abs(exact)
            row[f"{label}_mean_rel_error"] = (form.mean - mean) / abs(mean)
            row[f"{label}_mean_lower_rel"] = form.mean_lower / mean
            row[f"{label}_mean_upper_rel"] = form.mean_upper / mean
            row[f"{label}_steps_mean"] = d["lanczos_steps_mean"]
            row[f"{label}_steps_max"] = d["lanczos_steps_max"]
            row[f"{label}_pruned"] = d["pruned_fraction"]
        rows.append(row)
    after = {}
    for label, (target, rtol, _, limit) in RUNS.items():
        worst = max(row[f"{label}_rel_error"] for row in rows)
        ratio = statistics.median(ratios[label])
        after[label] = {
            "target": target,
            "rtol": rtol,
            "seconds": statistics.median(times[label]),
            "seconds_each": times[label],
            "ratio": ratio,
            "ratio_each": ratios[label],
            "hvp_units": statistics.fmean(row[f"{label}_steps_mean"] for row in rows),
            "sequential_steps": max(row[f"{label}_steps_max"] for row in rows),
            "worst_rel_error": worst,
            "worst_mean_rel_error": max(abs(row[f"{label}_mean_rel_error"]) for row in rows),
            "widest_mean_interval": max(
                row[f"{label}_mean_upper_rel"] - row[f"{label}_mean_lower_rel"] for row in rows
            ),
            "target_ratio": limit,
            "target_met": None if limit is None else ratio <= limit and worst <= rtol,
        }
    return {
        "case": "vit-gelu-2x32",
        "samples": samples,
        "started": started,
        "finished": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "hessfine_source": os.path.dirname(os.path.dirname(bounds.__file__)),
        "retained_graph_products": importlib.util.find_spec("hessfine.bounds.operators.retained")
        is not None,
        "smooth_layers": len(smooth),
        "block_s": t_block,
        "block_s_each": block_times,
        "repeats": repeats,
        "before_s": t_before,
        "before_ratio": t_before / t_block,
        "after": after,
        "reference_s": t_reference,
        "reference_steps": reference_steps,
        "layers": rows,
    }


def positive_markdown(r: dict) -> str:
    """The positive-part study as markdown."""
    after = r["after"]
    load = ", ".join(
        f"{a:.2f}/{b:.2f}"
        for a, b in zip(r["load_average_start"], r["load_average_end"], strict=True)
    )
    lines = [
        f"{r['case']}, {r['samples']} examples, {r['smooth_layers']} smooth layers; "
        f"block {r['block_s']:.2f} s (median of {r['repeats']}, interleaved with the adaptive "
        f"runs; times and ratios below are medians); {r['started']} – {r['finished']}; "
        "load average "
        f"(1/5/15 min, start/end) {load}; hessfine from {r['hessfine_source']} "
        f"(retained-graph products: {r['retained_graph_products']}); reference: "
        f"{r['reference_steps']} steps, no early stop ({r['reference_s']:.1f} s)",
        "",
        "| method | time (s) | time ÷ block | per-example HVPs per layer (block: 1) "
        "| sequential HVP calls | worst layer rel. error of the max | of the mean "
        "| widest mean interval ÷ mean |",
        "|---|---|---|---|---|---|---|---|",
        f"| before: Gauss K = 32 | {r['before_s']:.1f} | {r['before_ratio']:.1f} | 32 "
        f"| {32 * r['smooth_layers']} "
        f"| {max(row['before_rel_error'] for row in r['layers']):.1e} | – | – |",
    ]
    for a in after.values():
        lines.append(
            f"| target {a['target']}, rtol {a['rtol']:g} | {a['seconds']:.2f} | {a['ratio']:.1f} "
            f"| {a['hvp_units']:.1f} | {a['sequential_steps']} | {a['worst_rel_error']:.1e} "
            f"| {a['worst_mean_rel_error']:.1e} | {a['widest_mean_interval']:.3f} |"
        )
    lines.append("")
    for label, a in after.items():
        if a["target_ratio"] is None:
            continue
        verdict = "met" if a["target_met"] else "NOT met"
        lines.append(
            f"Target for {label} (≤ {a['target_ratio']}× block in wall time, every layer's max "
            f"within {a['rtol']:g}): {verdict} ({a['ratio']:.1f}×; each repeat "
            + ", ".join(f"{x:.1f}×" for x in a["ratio_each"])
            + f"; worst {a['worst_rel_error']:.1e})."
        )
    lines += [
        "",
        "| layer | numel | before err | "
        + " | ".join(
            f"{label}: max err / its bound / mean err / [lower, upper] ÷ mean / steps mean / max"
            " / pruned"
            for label in after
        )
        + " | reference: max bound / mean interval ÷ mean |",
        "|---|---|---|" + "---|" * len(after) + "---|",
    ]
    for row in r["layers"]:
        cells = [
            f"{row[f'{t}_rel_error']:.1e} / {row[f'{t}_error_bound']:.1e} / "
            f"{row[f'{t}_mean_rel_error']:+.1e} / [{row[f'{t}_mean_lower_rel']:.3f}, "
            f"{row[f'{t}_mean_upper_rel']:.3f}] / {row[f'{t}_steps_mean']:.1f} / "
            f"{row[f'{t}_steps_max']} / {row[f'{t}_pruned']:.0%}"
            for t in after
        ]
        lines.append(
            f"| {row['layer']} | {row['numel']} | {row['before_rel_error']:.1e} | "
            + " | ".join(cells)
            + f" | {row['reference_max_error_bound']:.1e} / {row['reference_mean_width']:.1e} |"
        )
    return "\n".join(lines)


def markdown(results: Sequence[dict]) -> str:
    """The results as markdown tables."""
    lines = [
        "| case | layers | weights | method | time (s) | speed-up | forward units / layer "
        "| max rel. diff. vs baseline | argmax agreement | routes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['case']} | {r['layers']} | {r['weights']} | baseline (loop + double backward) "
            f"| {r['baseline_s']:.2f} | 1 | {r['baseline_forward_units_per_layer']:.1f} | – | – | – |"
        )
        for e in r["estimators"]:
            diff = (
                "n/a"
                if e["max_relative_difference"] is None
                else f"{e['max_relative_difference']:.1e} ({e['compared_layers']} layers)"
            )
            agree = "n/a" if e["argmax_agreement"] is None else f"{e['argmax_agreement']:.0%}"
            routes = ", ".join(f"{k}×{v}" for k, v in sorted(e["methods"].items()))
            lines.append(
                f"| {r['case']} | {r['layers']} | {r['weights']} | ours `{e['estimator']}` "
                f"| {e['seconds']:.2f} | {e['speedup']:.1f} | {e['forward_units_per_layer']:.1f} "
                f"| {diff} | {agree} | {routes} |"
            )
    lines += [
        "",
        "| case | probes | ours s/probe | PyHessian s/probe | ratio | ours trace | PyHessian trace |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r["trace_cost"]
        lines.append(
            f"| {r['case']} | {t['probes']} | {t['ours_s_per_probe']:.3f} "
            f"| {t['pyhessian_s_per_probe']:.3f} "
            f"| {t['pyhessian_s_per_probe'] / t['ours_s_per_probe']:.2f} "
            f"| {t['ours_trace']:.4g} | {t['pyhessian_trace']:.4g} |"
        )
    studies = [row for r in results for row in r.get("lanczos", [])]
    if studies:
        lines += [
            "",
            "| layer | numel | examples | K | max rel. error | mean rel. error | time (s) "
            "| negative eigenvalues | |H⁺ − H| effect |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in studies:
            lines.append(
                f"| {s['layer']} | {s['numel']} | {s['examples']} | {s['steps']} "
                f"| {s['max_relative_error']:.1e} | {s['mean_relative_error']:.1e} "
                f"| {s['seconds']:.2f} | {s['negative_eigenvalue_fraction']:.0%} "
                f"| {s['truncation_effect']:.1e} |"
            )
    return "\n".join(lines)


def write_json(path: str | None, result: dict) -> None:
    """Write ``result`` with the torch version and thread count to ``path`` (if given)."""
    if path:
        with open(path, "w") as fh:
            meta = {"torch": torch.__version__, "threads": torch.get_num_threads()}
            json.dump({**meta, **result}, fh, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=["resnet18", "vit", "all"], default="all")
    parser.add_argument("--samples", type=int, default=64, help="examples in the batch (64)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--estimators",
        nargs="+",
        choices=ESTIMATORS,
        default=list(ESTIMATORS),
        help="estimators of ours to time (block auto ggn)",
    )
    parser.add_argument("--trace-probes", type=int, default=10, help="probes for trace cost (10)")
    parser.add_argument(
        "--lanczos-examples", type=int, default=8, help="examples of the Lanczos study (8; 0 skips)"
    )
    parser.add_argument(
        "--positive-speed", action="store_true", help="only the positive-part study (small ViT)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed repeats of --positive-speed (3; medians)"
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.positive_speed:
        result = positive_speed(args.samples, repeats=args.repeats)
        write_json(args.out, result)
        print(positive_markdown(result))
        return 0
    cases = ["resnet18", "vit"] if args.case == "all" else [args.case]
    results = []
    for case in cases:
        _log(f"running {case} …")
        results.append(
            run_case(
                case,
                args.samples,
                estimators=args.estimators,
                trace_probes=args.trace_probes,
                lanczos_examples=args.lanczos_examples,
            )
        )
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "samples": args.samples,
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(meta, fh, indent=2)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
