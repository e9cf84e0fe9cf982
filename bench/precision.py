"""float32 against float64: the per-layer 𝓗_i of ``hessfine measure`` on a real-size transformer.

Runs ``hessfine measure`` on the checkpoints and data of ``bench/transformers_cost.py`` (built
there, or here when missing) twice per estimator, ``--dtype float32`` and ``--dtype float64``,
on the same examples and layers, and reports per layer the relative difference
|𝓗_i(float32) − 𝓗_i(float64)| / |𝓗_i(float64)| of ``quadratic_form.max`` (and of the mean),
with the float64 run's ``max_error_estimate`` beside it (Lanczos routes: how far the value itself
may be from converged, which a precision comparison cannot see).

    OMP_NUM_THREADS=1 python bench/precision.py --model gpt2-lora --samples 4 \
        --estimators ggn block --layers 'transformer.h.0.*' 'transformer.h.11.*' \
        --out precision.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from transformers_cost import arguments, built, data_file


def measure(root: Path, info: dict, options: argparse.Namespace, estimator: str, dtype: str):
    """``quadratic_form`` of each layer from one ``hessfine measure`` run."""
    from hessfine.analysis.cli import main

    out = root / f"precision_{estimator}_{dtype}"
    args = ["measure", str(root / "tuned"), "--reference", str(root / "base"), *info["args"]]
    args += ["--data", str(data_file(root, options.samples)), "--out", str(out)]
    args += ["--estimator", estimator, "--dtype", dtype, "--samples", str(options.samples)]
    args += ["--quiet", "--threads", str(options.threads), "--sample-order", "file"]
    args += ["--device", options.device]
    if options.layers:
        args += ["--layers", *options.layers]
    args += options.extra
    if main(args) != 0:
        raise SystemExit(f"hessfine {' '.join(args)} failed")
    layers = json.loads((out / "measurement.json").read_text())["layers"]
    return "hessfine " + " ".join(args), {layer["name"]: layer for layer in layers}


def cli() -> None:
    options = arguments(__doc__, ["ggn", "block"], 4, "precision.json").parse_args()
    root, info = built(options)
    report = {"runs": []}
    for estimator in options.estimators:
        commands, results = {}, {}
        for dtype in ("float32", "float64"):
            commands[dtype], results[dtype] = measure(root, info, options, estimator, dtype)
        rows = {}
        for name, wide in results["float64"].items():
            narrow = results["float32"][name]["quadratic_form"]
            form = wide["quadratic_form"]
            rows[name] = {
                "float64_max": form["max"],
                "float32_max": narrow["max"],
                "relative_difference_max": abs(narrow["max"] - form["max"]) / abs(form["max"]),
                "relative_difference_mean": abs(narrow["mean"] - form["mean"]) / abs(form["mean"]),
                "argmax_same": narrow["argmax"] == form["argmax"],
                "float64_max_error_estimate": form.get("max_error_estimate"),
                "float32_max_error_estimate": narrow.get("max_error_estimate"),
                "method": wide["method"],
            }
            print(estimator, name, json.dumps(rows[name]), flush=True)
        report["runs"].append(
            {"estimator": estimator, "commands": commands, "layers": rows, "load": os.getloadavg()}
        )
        options.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    cli()
