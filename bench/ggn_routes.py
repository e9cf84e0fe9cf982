"""Exact Gauss–Newton forms v_iᵀ G_i(x) v_i of every Linear/Conv layer: shared passes against one JVP per layer.

For each architecture (random initialisation, ``--examples`` inputs, a random direction v_i of
relative size 1e-2 per weight), times

* the shared route, :func:`hessfine.bounds.operators.layer_io.layer_io_ggn_forms`: one forward
  pass recording every layer's input and output, one backward pass per class, and per layer its
  output with weight v_i (issue 10, item 7);
* the previous route, :func:`hessfine.bounds.operators.gauss_newton.ggn_forms` once per layer
  (one JVP each, the primal forward pass repeated for every layer);

and checks that they agree (largest relative difference of the per-example values over layers).
"forward units" are the time over one no-grad forward pass of the batch. The BERT case is a
BERT-base-sized random ``BertForSequenceClassification`` (2 labels) on right-padded sequences.

    nice -n 5 python bench/ggn_routes.py --threads 1 --out ggn_routes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import torch
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.operators.gauss_newton import ggn_forms
from hessfine.bounds.operators.layer_io import layer_io_ggn_forms
from hessfine.bounds.safe_autodiff import differentiable

VISION = ["resnet18", "vgg11", "mobilenet_v3_small", "efficientnet_b0", "densenet121"]


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def vision_case(name: str, examples: int, size: int):
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(num_classes=10).eval()
    x = torch.randn(examples, 3, size, size)
    return net, x, torch.randint(0, 10, (examples,))


def bert_case(examples: int, length: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    net = BertForSequenceClassification(BertConfig(num_labels=2)).eval()
    ids = torch.randint(1000, 20000, (examples, length))
    lengths = torch.linspace(length // 2, length, examples).long()
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    x = {"input_ids": ids * mask, "attention_mask": mask}
    return net, x, torch.randint(0, 2, (examples,))


def run(name: str, net, x, y) -> dict:
    fm, params = FunctionalModel.from_module(net)
    layers = [n for n, p in params.items() if p.dim() > 1]
    g = torch.Generator().manual_seed(1)
    v = {
        n: 1e-2
        * params[n].detach().norm()
        / params[n].numel() ** 0.5
        * torch.randn(params[n].shape, generator=g)
        for n in layers
    }
    with torch.no_grad(), differentiable():
        fm.logits(params, x)
        _, forward = _timed(lambda: fm.logits(params, x))
    with differentiable():
        shared, t_shared = _timed(lambda: layer_io_ggn_forms(fm, params, v, x, y))
        names = list(shared)
        loop, t_loop = _timed(lambda: {n: ggn_forms(fm, params, n, v[n], x, y) for n in names})
    diff = max(
        float((shared[n] - loop[n]).abs().max() / loop[n].abs().max().clamp_min(1e-30))
        for n in names
    )
    row = {
        "case": name,
        "layers": len(layers),
        "shared_layers": len(names),
        "forward_s": forward,
        "shared_s": t_shared,
        "jvp_loop_s": t_loop,
        "speed_up": t_loop / t_shared,
        "shared_units_per_layer": t_shared / forward / len(names),
        "jvp_units_per_layer": t_loop / forward / len(names),
        "max_rel_diff": diff,
    }
    print(
        f"  {name}: {len(names)}/{len(layers)} layers, shared {t_shared:.2f} s, "
        f"JVP loop {t_loop:.2f} s, {row['speed_up']:.1f}×, diff {diff:.1e}",
        file=sys.stderr,
        flush=True,
    )
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| case | layers (shared / all) | forward (s) | shared (s) | one JVP per layer (s) | speed-up "
        "| forward units / layer: shared → JVP | max rel. diff. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['shared_layers']} / {r['layers']} | {r['forward_s']:.3f} "
            f"| {r['shared_s']:.2f} | {r['jvp_loop_s']:.2f} | **{r['speed_up']:.1f}×** "
            f"| {r['shared_units_per_layer']:.2f} → {r['jvp_units_per_layer']:.2f} "
            f"| {r['max_rel_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=8, help="examples per batch (8)")
    parser.add_argument("--size", type=int, default=64, help="image side (64)")
    parser.add_argument("--length", type=int, default=128, help="BERT sequence length (128)")
    parser.add_argument("--cases", nargs="+", default=[*VISION, "bert"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for case in args.cases:
        if case == "bert":
            net, x, y = bert_case(args.examples, args.length)
        else:
            net, x, y = vision_case(case, args.examples, args.size)
        rows.append(run(case, net, x, y))
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"argv": sys.argv[1:], "threads": torch.get_num_threads(), "rows": rows}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
