"""The GPU measurements of issue 10 in a few minutes: timings and GPU-vs-CPU agreement.

Builds randomly initialised models locally (no downloads) with a perturbed reference and random
data, then measures them with :func:`hessfine.analysis.measure.measure`:

* ResNet-50 (10 classes) at 224×224, 64 examples: every estimator and the traces;
* ViT-B/16 and BERT-base, 16 examples: ``auto`` on a few layers of the last block and the head;
* agreement: each model's first measurement (without traces, 8 Lanczos steps) on 4 examples on
  the GPU and on the CPU (float32 both), the largest relative difference of the per-layer maxima.

A short table is printed last. ``--dry`` (or ``GPU_CHECK_DRY=1``) runs every step on the CPU with
tiny sizes (ResNet-18 at 32×32, 4 examples, a narrow BERT), to check the script itself.

Run: ``python bench/gpu_check.py --work /tmp/gpu_check [--dry]`` (bench/gpu_check.sh does the
install and ``pytest -m gpu`` first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from hessfine.analysis.measure import MeasureSettings, measure
from safetensors.torch import save_file


def _save_pair(module: torch.nn.Module, folder: Path) -> tuple[Path, Path]:
    """ft.safetensors (the module) and ref.safetensors (W − 0.01·N(0, 1) on ≥2-D weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    reference = {
        k: (v - 0.01 * torch.randn(v.shape, generator=g)).contiguous()
        if v.is_floating_point() and v.dim() >= 2
        else v
        for k, v in state.items()
    }
    save_file(state, str(folder / "ft.safetensors"))
    save_file(reference, str(folder / "ref.safetensors"))
    return folder / "ft.safetensors", folder / "ref.safetensors"


def _images(folder: Path, n: int, size: int) -> Path:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 3, size, size, generator=g)
    torch.save({"x": x, "y": torch.randint(0, 10, (n,), generator=g)}, folder / "data.pt")
    return folder / "data.pt"


def _tokens(folder: Path, n: int, length: int, vocab: int) -> Path:
    g = torch.Generator().manual_seed(3)
    x = {
        "input_ids": torch.randint(0, vocab, (n, length), generator=g),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
    }
    torch.save({"x": x, "y": torch.randint(0, 2, (n,), generator=g)}, folder / "data.pt")
    return folder / "data.pt"


def _cases(work: Path, dry: bool) -> list[dict]:
    """Each case: model inputs, how many examples, and the measurements to make."""
    import torchvision

    cases = []
    depth, size, n = (18, 32, 4) if dry else (50, 224, 64)
    resnet = getattr(torchvision.models, f"resnet{depth}")(num_classes=10)
    ft, ref = _save_pair(resnet, work / "resnet")
    cases.append(
        {
            "name": f"ResNet-{depth} {size}px",
            "model": f"torchvision:resnet{depth}",
            "kwargs": {"num_classes": 10},
            "ft": ft,
            "ref": ref,
            "data": _images(work / "resnet", n, size),
            "n": n,
            "runs": [
                {"estimator": "auto", "trace": True, "trace_probes": 20},
                {"estimator": "block"},
                {"estimator": "ggn"},
                {"estimator": "positive", "layers": ("layer4.1.conv*.weight",)},
                {"estimator": "reference-code"},
            ],
        }
    )
    vit_size, n_vit, steps = (32, 2, 4) if dry else (224, 16, 32)
    vit = torchvision.models.vit_b_16(num_classes=10, image_size=vit_size)
    ft, ref = _save_pair(vit, work / "vit")
    cases.append(
        {
            "name": "ViT-B/16",
            "model": "torchvision:vit_b_16",
            "kwargs": {"num_classes": 10, "image_size": vit_size},
            "ft": ft,
            "ref": ref,
            "data": _images(work / "vit", n_vit, vit_size),
            "n": n_vit,
            "runs": [
                {
                    "estimator": "auto",
                    "lanczos_steps": steps,
                    "layers": ("encoder.layers.encoder_layer_11.mlp.*.weight", "heads.head.weight"),
                }
            ],
        }
    )
    from transformers import BertConfig, BertForSequenceClassification

    config = (
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        if dry
        else BertConfig()
    )
    config.num_labels = 2
    torch.manual_seed(0)
    bert = BertForSequenceClassification(config).eval()
    folder = work / "bert"
    bert.save_pretrained(folder / "ft")
    ref_model = BertForSequenceClassification(config).eval()
    ref_model.load_state_dict(bert.state_dict())
    with torch.no_grad():
        for p in ref_model.parameters():
            if p.dim() >= 2:
                p.sub_(0.01 * torch.randn_like(p))
    ref_model.save_pretrained(folder / "ref")
    last = config.num_hidden_layers - 1
    n_bert = 2 if dry else 16
    cases.append(
        {
            "name": "BERT-base" if not dry else "BERT (narrow)",
            "model": "hf",
            "kwargs": {},
            "ft": folder / "ft",
            "ref": folder / "ref",
            "data": _tokens(folder, n_bert, 8 if dry else 128, config.vocab_size),
            "n": n_bert,
            "runs": [
                {
                    "estimator": "auto",
                    "lanczos_steps": steps,
                    "layers": (f"bert.encoder.layer.{last}.*dense.weight", "classifier.weight"),
                }
            ],
        }
    )
    return cases


def _measure(case: dict, run: dict, device: str, samples: int, out: Path) -> tuple[dict, float]:
    batch = None if run["estimator"] == "reference-code" else 16
    settings = MeasureSettings(samples=samples, batch_size=batch, device=device, **run)
    start = time.perf_counter()
    result = measure(
        case["ft"],
        reference=str(case["ref"]),
        data=str(case["data"]),
        model=case["model"],
        model_kwargs=case["kwargs"],
        out=out,
        settings=settings,
    )
    return result, time.perf_counter() - start


def _relative_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for la, lb in zip(a["layers"], b["layers"], strict=True):
        x, y = la["quadratic_form"]["max"], lb["quadratic_form"]["max"]
        worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-30))
    return worst


def _emit(rows: list[dict], path: Path | None) -> None:
    """Print the newest row; write all rows so far to ``path`` (a run cut short keeps them)."""
    print(json.dumps(rows[-1]), flush=True)
    if path is not None:
        path.write_text(json.dumps(rows, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/hessfine_gpu_check"))
    parser.add_argument("--dry", action="store_true", default=bool(os.environ.get("GPU_CHECK_DRY")))
    parser.add_argument("--agreement-only", action="store_true", help="skip the timed runs")
    parser.add_argument("--rows", type=Path, help="write the rows here as each one finishes")
    args = parser.parse_args()
    device = "cpu" if args.dry else "cuda"
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry (or GPU_CHECK_DRY=1) to check the script")
    rows = []
    for case in _cases(args.work, args.dry):
        for i, run in enumerate([] if args.agreement_only else case["runs"]):
            out = args.work / "out" / case["name"].replace("/", "_") / f"{run['estimator']}_{i}"
            result, seconds = _measure(case, run, device, case["n"], out)
            layers = result["layers"]
            rows.append(
                {
                    "model": case["name"],
                    "estimator": run["estimator"] + (" +trace" if run.get("trace") else ""),
                    "examples": case["n"],
                    "layers": len(layers),
                    "seconds": seconds,
                    "max_H": max(layer["quadratic_form"]["max"] for layer in layers),
                    "gpu_vs_cpu": None,
                }
            )
            _emit(rows, args.rows)
        first = {k: v for k, v in case["runs"][0].items() if not k.startswith("trace")}
        if "lanczos_steps" in first:
            first["lanczos_steps"] = 8  # keeps the CPU side short; both sides run the same
        folder = args.work / "agree" / case["name"].replace("/", "_")
        gpu, _ = _measure(case, first, device, 4, folder / device)
        cpu, _ = _measure(case, first, "cpu", 4, folder / "cpu")
        rows.append(
            {
                "model": case["name"],
                "estimator": first["estimator"] + " (agreement)",
                "examples": 4,
                "layers": len(gpu["layers"]),
                "seconds": math.nan,
                "max_H": max(layer["quadratic_form"]["max"] for layer in gpu["layers"]),
                "gpu_vs_cpu": _relative_difference(gpu, cpu),
            }
        )
        _emit(rows, args.rows)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    print(f"\n{name}, torch {torch.__version__}, float32, TF32 off")
    print(
        f"{'model':<18} {'estimator':<22} {'n':>4} {'layers':>6} {'s':>8} {'max 𝓗':>11} {'rel GPU-CPU':>12}"
    )
    for r in rows:
        agree = "" if r["gpu_vs_cpu"] is None else f"{r['gpu_vs_cpu']:.2e}"
        seconds = "" if math.isnan(r["seconds"]) else f"{r['seconds']:.1f}"
        print(
            f"{r['model']:<18} {r['estimator']:<22} {r['examples']:>4} {r['layers']:>6} "
            f"{seconds:>8} {r['max_H']:>11.4g} {agree:>12}"
        )


if __name__ == "__main__":
    main()
