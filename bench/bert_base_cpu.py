"""Time ``hessfine measure`` on a BERT-base-sized random classifier with padded inputs (CPU).

Builds a random ``BertForSequenceClassification`` (hidden 768, 12 layers, 12 heads, intermediate
3072, 2 labels) and a "fine-tuned" copy (every weight moved by 1e-3·N(0, 1)), saved with
``save_pretrained``; writes ``--examples`` right-padded sequences of length ``--length`` (lengths
spread over [length/2, length]); then runs ``hessfine measure --model hf`` as a user would, once
per requested estimator, and reports the wall time, the process CPU time (with one thread, the
figure that other processes on a shared machine do not inflate) and the measurement's own phase
timings.
A coarse profile of where the per-layer time goes comes from timing the primitives on the same
batch: one forward pass, the certification pass (all layers), and per profiled layer one JVP
(``ggn_forms``, the whole ``ggn`` cost of a layer) and one vmapped per-example HVP
(``block_forms_hvp``: the ``block`` cost of an uncertified layer, and the cost of one Lanczos
step of ``auto``).

    nice -n 10 python bench/bert_base_cpu.py --runs block ggn auto --samples 8 \
        --auto-layer bert.encoder.layer.0.attention.self.query.weight --out bert_base.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from hessfine.analysis.cli import main
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.operators.certification import certify_piecewise_linear
from hessfine.bounds.operators.gauss_newton import ggn_forms
from hessfine.bounds.operators.per_example import block_forms_hvp
from hessfine.bounds.safe_autodiff import differentiable


def build(root: Path, examples: int, length: int) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(num_labels=2)  # BERT-base sizes: 768 hidden, 12 layers, 12 heads
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    model.save_pretrained(root / "tuned")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(length // 2, length + 1, (examples,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, config.vocab_size, (examples, length), generator=g) * mask
    labels = torch.randint(0, 2, (examples,), generator=g)
    torch.save({"x": {"input_ids": ids, "attention_mask": mask}, "y": labels}, root / "train.pt")


def run(root: Path, estimator: str, samples: int, layers: list[str], threads: int) -> dict:
    out = root / f"out_{estimator}"
    args = ["measure", str(root / "tuned"), "--reference", str(root / "base"), "--model", "hf"]
    args += ["--data", str(root / "train.pt"), "--out", str(out), "--estimator", estimator]
    args += ["--samples", str(samples), "--batch-size", str(samples), "--quiet"]
    args += ["--threads", str(threads)]
    if layers:
        args += ["--layers", *layers]
    start, cpu = time.perf_counter(), time.process_time()
    code = main(args)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    result = json.loads((out / "measurement.json").read_text())
    return {
        "estimator": estimator,
        "exit": code,
        "wall_s": wall,
        "cpu_s": cpu,
        "layers": len(result["layers"]),
        "routes": sorted({layer["method"] for layer in result["layers"]}),
        "timings": result["provenance"]["timings"],
        "attn_implementation": result["settings"].get("attn_implementation"),
    }


def primitives(root: Path, samples: int, layers: list[str]) -> dict[str, float]:
    """Seconds of each primitive on ``samples`` examples, per layer in ``layers``."""
    from hessfine.analysis.model_specs import build_model

    module = build_model("hf", hf_directory=root / "tuned")
    fm, params = FunctionalModel.from_module(module)
    data = torch.load(root / "train.pt")
    x = {k: v[:samples] for k, v in data["x"].items()}
    y = data["y"][:samples]
    names = [n for n, p in params.items() if p.dim() == 2 and "embeddings" not in n]
    out = {"selected_layers": float(len(names))}

    def timed(key, fn):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        out[key] = time.perf_counter() - start
        out[key.replace("_s", "_cpu_s", 1)] = time.process_time() - cpu
        print(key, round(out[key], 2), "cpu", round(time.process_time() - cpu, 2), flush=True)

    with differentiable():
        with torch.no_grad():
            timed("forward_s", lambda: fm.logits(params, x))
        timed("certification_all_layers_s", lambda: certify_piecewise_linear(fm, params, names, x))
        for layer in layers:
            v = 1e-3 * torch.randn_like(params[layer])
            timed(f"ggn_s[{layer}]", lambda v=v, layer=layer: ggn_forms(fm, params, layer, v, x, y))
            timed(
                f"per_example_hvp_s[{layer}]",
                lambda v=v, layer=layer: block_forms_hvp(fm, params, layer, v, x, y),
            )
    return out


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=["block", "ggn", "auto"])
    parser.add_argument(
        "--profile-layers",
        nargs="*",
        default=[
            "bert.encoder.layer.0.attention.self.query.weight",
            "bert.encoder.layer.11.output.dense.weight",
        ],
        help="layers whose primitives are timed (first and last: the backward depth differs); "
        "none to skip the primitives",
    )
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--auto-layer", default="bert.encoder.layer.0.attention.self.query.weight")
    parser.add_argument("--layers", nargs="*", default=[], help="--layers globs for every run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bert_base.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report: dict = {"samples": args.samples, "length": args.length, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.examples, args.length)
        if args.profile_layers:
            report["primitives"] = primitives(root, args.samples, args.profile_layers)
            args.out.write_text(json.dumps(report, indent=2))
        for estimator in args.runs:
            layers = args.layers or ([args.auto_layer] if estimator in ("auto", "positive") else [])
            report["runs"].append(run(root, estimator, args.samples, layers, args.threads))
            print(json.dumps(report["runs"][-1]), flush=True)
            args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    cli()
