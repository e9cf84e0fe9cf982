"""Variance of the noise-stability estimator: antithetic pairs vs plain Monte Carlo.

A small CNN is trained for a few epochs on scikit-learn's handwritten digits (so the gradient on
held-out examples is far from zero), and the noise stability
I(σ) = E_U[ℓ̄(W+U)] − ℓ̄(W) of its three weight layers is estimated on held-out examples at equal
numbers of loss evaluations: D antithetic pairs (2D evaluations) against 2D plain draws. The
variance of each estimator is its squared standard error; the table prints both, their ratio,
and the second-order prediction (σ²/2)·Σ_i mean_x Tr[H_i(x)] from exact per-example traces (the
network is piecewise linear after every selected layer, so H_i(x) = G_i(x) almost everywhere and
``gauss_newton_traces`` is exact).

Run:  .venv/bin/python bench/noise_stability.py   (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from hessfine.bounds.estimators.noise_stability import noise_stability, trace_prediction
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.operators.gauss_newton import gauss_newton_traces
from hessfine.bounds.safe_autodiff import differentiable
from sklearn.datasets import load_digits
from torch import nn

LAYERS = ["conv1.weight", "conv2.weight", "fc.weight"]


class DigitsCNN(nn.Module):
    """(N,1,8,8) → Conv 16 → ReLU → Conv 32 → ReLU → MaxPool 2 → Linear(512, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(F.max_pool2d(h, 2).flatten(1))


def digits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200, help="antithetic pairs D (plain: 2D)")
    parser.add_argument("--examples", type=int, default=300, help="held-out examples")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x, y = digits(args.seed)
    x_eval, y_eval = x[-args.examples :], y[-args.examples :]
    model = DigitsCNN()
    start = time.perf_counter()
    train(model, x[: -args.examples], y[: -args.examples], args.epochs, args.seed)
    fm, params = FunctionalModel.from_module(model)
    batches = [(x_eval, y_eval)]
    with torch.no_grad():
        eval_acc = float((fm.logits(params, x_eval).argmax(1) == y_eval).double().mean())
    with differentiable():
        traces = gauss_newton_traces(fm, params, LAYERS, x_eval)
    trace_sum = {name: float(t.mean()) for name, t in traces.items()}

    command = "python " + " ".join(["bench/noise_stability.py", *(argv or sys.argv[1:])])
    print(
        f"Noise stability, antithetic vs plain Monte Carlo at equal loss evaluations "
        f"(`{command}`): DigitsCNN trained {args.epochs} epochs (held-out accuracy "
        f"{eval_acc:.3f}), float32, layers {', '.join(LAYERS)}, {args.examples} held-out "
        f"examples, {args.pairs} pairs vs {2 * args.pairs} plain draws; exact Gauss–Newton "
        f"traces.\n"
    )
    print(
        "| σ | plain mean ± s.e. | antithetic mean ± s.e. | (σ²/2)·Σ mean Tr[H_i] "
        "| var plain | var antithetic | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, sigma in enumerate(args.sigmas):
        anti = noise_stability(
            fm,
            params,
            LAYERS,
            batches,
            sigma=sigma,
            draws=args.pairs,
            generator=torch.Generator().manual_seed(100 + i),
        )
        plain = noise_stability(
            fm,
            params,
            LAYERS,
            batches,
            sigma=sigma,
            draws=2 * args.pairs,
            antithetic=False,
            generator=torch.Generator().manual_seed(200 + i),
        )
        assert anti.evaluations == plain.evaluations
        var_plain, var_anti = plain.stderr**2, anti.stderr**2
        print(
            f"| {sigma:g} | {plain.mean:.3e} ± {plain.stderr:.1e} "
            f"| {anti.mean:.3e} ± {anti.stderr:.1e} | {trace_prediction(sigma, trace_sum):.3e} "
            f"| {var_plain:.2e} | {var_anti:.2e} | {var_plain / var_anti:,.0f}× |"
        )
    print(f"\nTotal time {time.perf_counter() - start:.1f} s.")


if __name__ == "__main__":
    main()
