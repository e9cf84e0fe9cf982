"""Lanczos brackets of the positive part from v_i and from v_i projected on the input span.

On one sequence of the GPT-2-small LoRA model of ``bench/transformers_cost.py`` (built there if
needed) and one ``c_attn`` layer, runs ``--steps`` Lanczos steps of the example's Hessian block
from the LoRA change v_i and from P v_i, its projection on the span of the layer's inputs for
that sequence (:meth:`hessfine.bounds.operators.output_graph.OutputPairHVP.input_span_starts`),
and prints the Gauss–Radau lower bound R_k and the compression upper bound U_k of v_iᵀH_i⁺v_i
after k steps (docs/mathematics.md, "The positive part by Lanczos quadrature"). Both start
vectors give the same value; the projection removes the null-space mass that slows U_k.

    OMP_NUM_THREADS=1 python bench/input_span.py --layer 1 --example 0 --steps 128
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hessfine.bounds.functional import CausalLMLoss
from hessfine.bounds.linalg.lanczos import lanczos
from hessfine.bounds.linalg.positive_quadrature import compression_upper, gauss_radau
from hessfine.bounds.operators.output_graph import OutputPairHVP
from hessfine.bounds.safe_autodiff import differentiable
from transformers_cost import build

CHECKPOINTS = (8, 16, 32, 64, 96, 128, 192, 256, 384, 512)


def model_and_change(root: Path, layer: int):
    """The merged fine-tuned GPT-2 (the saved weights) as a functional model, its parameters and
    v_i of the layer."""
    from hessfine.bounds.functional import FunctionalModel
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(root / "base").eval()
    name = f"transformer.h.{layer}.attn.c_attn.weight"
    before = dict(base.named_parameters())[name].detach().clone()
    tuned = PeftModel.from_pretrained(base, root / "tuned").merge_and_unload()
    fm, params = FunctionalModel.from_module(tuned, loss=CausalLMLoss())
    return fm, params, name, params[name] - before


def brackets(matvec, start: torch.Tensor, steps: int) -> list[tuple[int, float, float]]:
    """(k, R_k, U_k) at the checkpoints up to ``steps`` of one Lanczos run from ``start``."""
    run = lanczos(matvec, start, steps=steps)
    beta = torch.cat([run.beta, run.residual[:, None]], dim=1)
    rows = []
    for k in (k for k in CHECKPOINTS if k <= run.alpha.shape[1]):
        lower = gauss_radau(run.alpha[:, :k], beta[:, :k], run.norms, lambda t: t.clamp(min=0))
        upper = compression_upper(run.alpha[:, :k], beta[:, :k], run.norms)
        rows.append((k, float(lower), float(upper)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--example", type=int, default=0)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--projected-only", action="store_true", help="only the run from P v_i")
    parser.add_argument("--root", type=Path, default=Path("/tmp/hessfine_transformers_bench"))
    options = parser.parse_args()
    torch.set_num_threads(1)
    root = options.root / "gpt2-lora"
    build("gpt2-lora", root, 64)
    fm, params, name, v = model_and_change(root, options.layer)
    data = torch.load(root / "train.pt")
    one = slice(options.example, options.example + 1)
    x, y = {k: t[one] for k, t in data["x"].items()}, data["y"][one]
    with differentiable():
        products = OutputPairHVP(fm, params, x, y)
        whole = v.reshape(1, -1)
        starts = {"P v_i": products.input_span_starts({name: whole})[name]}
        if not options.projected_only:
            starts = {"v_i": whole, **starts}
        member = torch.zeros(1, dtype=torch.long)
        for label, start in starts.items():
            kept = float(start.norm() ** 2 / v.norm() ** 2)
            began = time.perf_counter()
            rows = brackets(lambda q: products([name], [q], [member])[0], start, options.steps)
            print(f"{label}: ‖·‖²/‖v_i‖² = {kept:.4f}, {time.perf_counter() - began:.0f} s")
            for k, lower, upper in rows:
                ratio = upper / lower
                print(f"  k = {k:3d}  R_k = {lower:.5g}  U_k = {upper:.5g}  U_k/R_k = {ratio:.3f}")


if __name__ == "__main__":
    main()
