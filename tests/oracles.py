"""Dense float64 Hessian oracles on tiny networks — the single source of truth for the tests.

Everything here is deliberately naive: loops over examples, full Hessians from
:func:`torch.autograd.functional.hessian`, Jacobians from :func:`torch.autograd.functional.jacobian`
and eigendecompositions from :func:`torch.linalg.eigh`. The estimators in :mod:`bounds` are tested
against these quantities.

Notation (docs/mathematics.md, "Notation and the per-layer quantity"). For one example (x, y) with
loss ℓ(f_W(x), y) (cross-entropy unless an oracle loss — :func:`causal_lm_loss`,
:func:`token_cross_entropy`, :func:`squared_error`, :func:`binary_cross_entropy`,
:func:`consistent_loss`, or :data:`OWN_LOSS`, the model's own ``.loss`` for the example alone — is
passed; inputs are tensors or dicts of tensors, outputs tensors or objects with ``.logits``) and
selected layer i with flattened weight w_i:

* H_i(x) = ∇²_{w_i} ℓ — the i-th diagonal block of the per-example Hessian;
* G_i(x) = J_iᵀ Λ J_i — its Gauss–Newton part, J_i = ∂ logits / ∂ w_i, Λ = ∇²_z ℓ by autograd, or
  the task's Λ written out (:func:`task_curvature`: diag(p) − p pᵀ, p = softmax, per label
  position for token losses; (2/L)·I; diag σ(1 − σ)/L);
* H_i^+ = U max(D, 0) Uᵀ for H_i = U D Uᵀ;
* the Hessian of the mean loss over a batch w.r.t. the concatenation of several layers
  (cross-layer blocks included), used by the authors' reference-code estimator
  (docs/mathematics.md, "What the authors' released code computes").

Example:
    >>> module = tiny_mlp("tanh")
    >>> params = dict(module.named_parameters())
    >>> x, y = tiny_data("mlp_tanh", 4)
    >>> H = dense_block_hessians(module, params, "fc1.weight", x, y)
    >>> H.shape
    torch.Size([4, 30, 30])
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPE = torch.float64
CLASSES = 3


class TinyMLP(nn.Module):
    """5 → Linear 6 → act → Linear 5 → act → Linear 3."""

    def __init__(self, activation: Literal["gelu", "tanh"]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 5)
        self.fc3 = nn.Linear(5, CLASSES)
        self.act = nn.GELU() if activation == "gelu" else nn.Tanh()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class TinyResidualBlock(nn.Module):
    """x + ReLU(BN(Conv(x)))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.relu(self.bn(self.conv(x)))


class TinyCNN(nn.Module):
    """(N,1,6,6) → Conv 3 → BN → ReLU → residual block → MaxPool 2 → Linear(27, 3).

    Piecewise linear after every selected layer, so H_i(x) = G_i(x) exactly
    (docs/mathematics.md, "Computing the quantities fast and exactly").
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.block = TinyResidualBlock(3)
        self.head = nn.Linear(27, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(F.relu(self.bn1(self.conv1(x))))
        return self.head(F.max_pool2d(h, 2).flatten(1))


class TinyAttention(nn.Module):
    """(N,4,6) tokens → LayerNorm → self-attention (2 heads) + residual → mean → LayerNorm → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(6)
        self.attn = nn.MultiheadAttention(6, num_heads=2, batch_first=True)
        self.norm2 = nn.LayerNorm(6)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.norm2(x.mean(dim=1)))


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d | nn.LayerNorm):
                # Non-trivial statistics and affine maps, so normalisation is not the identity.
                m.weight.data = 1.0 + 0.3 * torch.randn_like(m.weight)
                m.bias.data = 0.2 * torch.randn_like(m.bias)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean = 0.3 * torch.randn_like(m.running_mean)
                m.running_var = 0.5 + torch.rand_like(m.running_var)
            if isinstance(m, nn.MultiheadAttention):
                m.in_proj_bias.data = 0.1 * torch.randn_like(m.in_proj_bias)
                m.out_proj.bias.data = 0.1 * torch.randn_like(m.out_proj.bias)
    return module.to(DTYPE).eval()


def tiny_mlp(activation: Literal["gelu", "tanh"] = "gelu", *, seed: int = 0) -> nn.Module:
    """The float64 MLP 5 → 6 → 5 → 3 with ``activation``, random init from ``seed``, eval mode."""
    if activation not in ("gelu", "tanh"):
        raise ValueError(f"activation must be 'gelu' or 'tanh', not {activation!r}")
    return _seeded(lambda: TinyMLP(activation), seed)


def tiny_cnn(*, seed: int = 0) -> nn.Module:
    """The float64 ReLU CNN with eval-mode BatchNorm and a residual block, random init from ``seed``."""
    return _seeded(TinyCNN, seed)


def tiny_attention(*, seed: int = 0) -> nn.Module:
    """The float64 one-block self-attention classifier, random init from ``seed``, eval mode."""
    return _seeded(TinyAttention, seed)


TINY_NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "mlp_gelu": lambda: tiny_mlp("gelu"),
    "mlp_tanh": lambda: tiny_mlp("tanh"),
    "cnn": tiny_cnn,
    "attention": tiny_attention,
}

TINY_LAYERS: dict[str, list[str]] = {
    "mlp_gelu": ["fc1.weight", "fc2.weight", "fc3.weight"],
    "mlp_tanh": ["fc1.weight", "fc2.weight", "fc3.weight"],
    "cnn": ["conv1.weight", "block.conv.weight", "head.weight"],
    "attention": ["attn.in_proj_weight", "attn.out_proj.weight", "head.weight"],
}

_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "mlp": (5,),
    "mlp_gelu": (5,),
    "mlp_tanh": (5,),
    "cnn": (1, 6, 6),
    "attention": (4, 6),
}


def tiny_data(network: str, n: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` float64 standard-normal inputs shaped for ``network`` and int64 labels in [0, 3)."""
    if network not in _INPUT_SHAPES:
        raise ValueError(f"unknown tiny network {network!r}; one of {sorted(_INPUT_SHAPES)}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *_INPUT_SHAPES[network]), generator=g, dtype=DTYPE)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return x, y


def perturbed_reference(
    params: Mapping[str, Tensor], layers: Sequence[str], *, scale: float = 0.3, seed: int = 1
) -> dict[str, Tensor]:
    """A reference parameter dict: W^(s) = W − scale·N(0, 1) on ``layers``, W elsewhere.

    Hence v_i = W_i − W_i^(s) is ``scale`` times a standard normal draw.
    """
    g = torch.Generator().manual_seed(seed)
    out = {k: p.detach().clone() for k, p in params.items()}
    for name in layers:
        p = out[name]
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        out[name] = p - scale * noise
    return out


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Turn off MHA's fused fast path and select the differentiable math SDPA kernel."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


Inputs = Tensor | Mapping[str, Tensor]
#: A loss of a batch of one example: (logits (1, …), labels (1, …)) → scalar.
OracleLoss = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    """Classification cross-entropy of one example (the default oracle loss)."""
    return F.cross_entropy(z, y)


def causal_lm_loss(z: Tensor, y: Tensor) -> Tensor:
    """Mean over label positions of −log softmax(z_t)_{y_{t+1}} (labels −100 skipped), by a loop."""
    return token_cross_entropy(z, y, shift=1)


def token_cross_entropy(z: Tensor, y: Tensor, *, shift: int = 0) -> Tensor:
    """Mean over label positions t of −log softmax(z_t)_{y_{t+shift}} (labels −100 skipped), by a
    loop: token classification and seq2seq LM (``shift`` 0), causal LM (1)."""
    terms = []
    for t in range(z.shape[1] - shift):
        label = int(y[0, t + shift])
        if label != -100:
            terms.append(-torch.log_softmax(z[0, t], dim=-1)[label])
    return torch.stack(terms).mean() if terms else z.sum() * 0.0


def squared_error(z: Tensor, y: Tensor) -> Tensor:
    """(1/L) Σ_l (z_l − y_l)² of one example, by a loop."""
    target = y.reshape(z.shape)
    return sum((z[0, k] - target[0, k]) ** 2 for k in range(z.shape[1])) / z.shape[1]


def binary_cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    """(1/L) Σ_l −[y_l log σ(z_l) + (1 − y_l) log(1 − σ(z_l))] of one example, by a loop."""
    terms = []
    for k in range(z.shape[1]):
        p = torch.sigmoid(z[0, k])
        terms.append(-(y[0, k] * torch.log(p) + (1 - y[0, k]) * torch.log1p(-p)))
    return sum(terms) / z.shape[1]


OWN_LOSS = "the model's own .loss"
"""The oracle loss that runs a Hugging Face model on the example alone with ``labels`` and takes
its ``.loss`` (decoder inputs, when the inputs hold them, left for the model to make)."""


def task_curvature(task: str, z: Tensor, y: Tensor) -> Tensor:
    """The task's Λ = ∇²_z ℓ of one example, written out entry by entry over the flattened logits
    z (1, …): (2/L)·I (regression), diag σ(1 − σ)/L (multi-label), diag p − p pᵀ
    (classification), and for the token tasks (1/m)(diag p_t − p_t p_tᵀ) on the m label
    positions t (causal-lm: position t labelled by y_{t+1})."""
    size = z.numel()
    A = torch.zeros(size, size, dtype=z.dtype)
    if task == "regression":
        for k in range(size):
            A[k, k] = 2.0 / size
        return A
    if task == "multi-label":
        for k in range(size):
            p = torch.sigmoid(z.reshape(-1)[k])
            A[k, k] = p * (1 - p) / size
        return A
    if task == "classification":
        return _softmax_block(z.reshape(-1))
    shift = 1 if task == "causal-lm" else 0
    steps, vocab = z.shape[1], z.shape[2]
    positions = [t for t in range(steps - shift) if int(y[0, t + shift]) != -100]
    for t in positions:
        block = _softmax_block(z[0, t]) / len(positions)
        A[t * vocab : (t + 1) * vocab, t * vocab : (t + 1) * vocab] = block
    return A


def _softmax_block(z: Tensor) -> Tensor:
    """diag p − p pᵀ, entry by entry, p = softmax(z)."""
    p = torch.softmax(z, dim=-1)
    size = z.numel()
    A = torch.zeros(size, size, dtype=z.dtype)
    for a in range(size):
        for b in range(size):
            A[a, b] = (p[a] if a == b else 0.0) - p[a] * p[b]
    return A


def consistent_loss(inverse: Tensor) -> OracleLoss:
    """ℓ̄(z, ỹ) = Σ_j (F⁻¹)[ỹ, j]·CE(z, j) for one example, summed class by class."""

    def loss(z: Tensor, y: Tensor) -> Tensor:
        row = inverse[int(y[0])]
        return sum(row[j] * F.cross_entropy(z, torch.tensor([j])) for j in range(row.numel()))

    return loss


def example(x: Inputs, n: int) -> Inputs:
    """Example ``n`` of a batch (tensor or dict of tensors), with its batch dimension of one."""
    if isinstance(x, Tensor):
        return x[n : n + 1]
    return {k: v[n : n + 1] for k, v in x.items()}


def count(x: Inputs) -> int:
    """Number of examples in a batch of inputs."""
    return x.shape[0] if isinstance(x, Tensor) else next(iter(x.values())).shape[0]


def _logits(module: nn.Module, params: Mapping[str, Tensor], x: Inputs) -> Tensor:
    if isinstance(x, Tensor):
        out = functional_call(module, dict(params), (x,))
    else:
        out = functional_call(module, dict(params), (), dict(x))
    return out if isinstance(out, Tensor) else out.logits


def _example_loss(
    module: nn.Module, params: Mapping[str, Tensor], x: Inputs, y: Tensor, loss: OracleLoss | str
) -> Tensor:
    """ℓ of the one example (x, y): ``loss`` of its logits, or the model's own ``.loss``."""
    if loss == OWN_LOSS:
        inputs = {k: v for k, v in x.items() if k != "decoder_input_ids"}
        return functional_call(module, dict(params), (), {**inputs, "labels": y}).loss
    return loss(_logits(module, params, x), y)


def _with_flat(
    params: Mapping[str, Tensor], layers: Sequence[str], flat: Tensor
) -> dict[str, Tensor]:
    out = {k: p.detach() for k, p in params.items()}
    offset = 0
    for name in layers:
        shape = params[name].shape
        numel = math.prod(shape)
        out[name] = flat[offset : offset + numel].reshape(shape)
        offset += numel
    return out


def _flat(params: Mapping[str, Tensor], layers: Sequence[str]) -> Tensor:
    return torch.cat([params[name].detach().reshape(-1) for name in layers])


def dense_block_hessians(
    module: nn.Module,
    params: Mapping[str, Tensor],
    layer: str,
    x: Inputs,
    y: Tensor,
    loss: OracleLoss | str = cross_entropy,
) -> Tensor:
    """Per-example H_i(x_n) = ∇²_{w_i} ℓ(f(x_n), y_n), shape (N, d, d), d = numel of ``layer``."""
    module.eval()
    w = _flat(params, [layer])
    blocks = []
    with math_attention():
        for n in range(count(x)):
            xn, yn = example(x, n), y[n : n + 1]

            def loss_n(flat: Tensor, xn: Inputs = xn, yn: Tensor = yn) -> Tensor:
                return _example_loss(module, _with_flat(params, [layer], flat), xn, yn, loss)

            blocks.append(torch.autograd.functional.hessian(loss_n, w, vectorize=True))
    return torch.stack(blocks)


def dense_ggn_blocks(
    module: nn.Module,
    params: Mapping[str, Tensor],
    layer: str,
    x: Inputs,
    y: Tensor,
    loss: OracleLoss = cross_entropy,
    curvature: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """Per-example G_i(x_n) = J_nᵀ Λ J_n, shape (N, d, d): Λ = ``curvature(z, y)`` when given
    (e.g. :func:`task_curvature`), else ∇²_z ℓ by dense autograd."""
    module.eval()
    w = _flat(params, [layer])
    blocks = []
    with math_attention():
        for n in range(count(x)):
            xn, yn = example(x, n), y[n : n + 1]

            def logits(flat: Tensor, xn: Inputs = xn) -> Tensor:
                return _logits(module, _with_flat(params, [layer], flat), xn)

            J = torch.autograd.functional.jacobian(logits, w, vectorize=True)
            with torch.no_grad():
                z = logits(w)
            if curvature is not None:
                A = curvature(z, yn)
            else:
                A = torch.autograd.functional.hessian(lambda z, yn=yn: loss(z, yn), z)
            J = J.reshape(z.numel(), -1)
            blocks.append(J.T @ A.reshape(z.numel(), z.numel()) @ J)
    return torch.stack(blocks)


def dense_output_perturbation_derivatives(
    module: nn.Module, layers: Sequence[str], x: Tensor, r: Tensor
) -> tuple[Tensor, Tensor, list[int]]:
    """Gradient and dense Hessian of φ(δ) = rᵀ z(x; δ) in additive perturbations δ_i of the outputs
    of the modules owning ``layers`` (weights called once), at δ = 0, by autograd.functional.

    Returns (gradient, Hessian, sizes) over the concatenation of the δ_i in ``layers`` order.
    """
    modules = dict(module.named_modules())
    owners = [modules[name.rpartition(".")[0]] for name in layers]
    shapes: list[torch.Size] = []

    def record(m, inputs, output):
        shapes.append(output.shape)

    handles = [m.register_forward_hook(record) for m in owners]
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()
    sizes = [math.prod(shape) for shape in shapes]

    def phi(flat: Tensor) -> Tensor:
        parts = list(flat.split(sizes))

        def add(index: int):
            return lambda m, inputs, output: output + parts[index].reshape(shapes[index])

        hooks = [m.register_forward_hook(add(i)) for i, m in enumerate(owners)]
        try:
            return (r * module(x)).sum()
        finally:
            for h in hooks:
                h.remove()

    zero = torch.zeros(sum(sizes), dtype=x.dtype)
    gradient = torch.autograd.functional.jacobian(phi, zero)
    hessian = torch.autograd.functional.hessian(phi, zero)
    return gradient, hessian, sizes


def assert_matches(form: object, values: Tensor) -> None:
    """An estimator's per-layer reduction (max, mean, argmax, count) equals the oracle's values."""
    import pytest

    assert form.max == pytest.approx(float(values.max()), rel=1e-6, abs=1e-12)
    assert form.mean == pytest.approx(float(values.mean()), rel=1e-6, abs=1e-12)
    assert form.argmax == int(values.argmax())
    assert form.count == values.numel()


def positive_part(H: Tensor) -> Tensor:
    """H^+ = U max(D, 0) Uᵀ for symmetric H = U D Uᵀ (batched over leading dimensions)."""
    D, U = torch.linalg.eigh(H)
    return (U * D.clamp(min=0).unsqueeze(-2)) @ U.transpose(-1, -2)


def quadratic_forms(H: Tensor, v: Tensor) -> Tensor:
    """vᵀ H_n v for every n, with ``v`` flattened: shape (N,)."""
    v = v.reshape(-1).to(H.dtype)
    return torch.einsum("i,nij,j->n", v, H, v)


def dense_mean_hessian(
    module: nn.Module,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    x: Inputs,
    y: Tensor,
    loss: OracleLoss | str = cross_entropy,
) -> Tensor:
    """Hessian of the mean loss over the batch w.r.t. the concatenated flattened ``layers``, (D, D).

    Cross-layer blocks are included; the layers are concatenated in the given order.
    """
    module.eval()
    layers = list(layers)
    w = _flat(params, layers)

    def mean_loss(flat: Tensor) -> Tensor:
        weights = _with_flat(params, layers, flat)
        terms = [
            _example_loss(module, weights, example(x, n), y[n : n + 1], loss)
            for n in range(count(x))
        ]
        return torch.stack(terms).mean()

    with math_attention():
        return torch.autograd.functional.hessian(mean_loss, w, vectorize=True)


def diagonal_blocks(
    H: Tensor, params: Mapping[str, Tensor], layers: Sequence[str]
) -> dict[str, Tensor]:
    """The diagonal blocks H_ii of a Hessian over the concatenated ``layers`` (in that order)."""
    out, offset = {}, 0
    for name in layers:
        d = params[name].numel()
        out[name] = H[offset : offset + d, offset : offset + d]
        offset += d
    return out


def dense_batch_mean_hessians(
    module: nn.Module,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    x: Inputs,
    y: Tensor,
    batch_size: int,
    loss: OracleLoss | str = cross_entropy,
) -> list[Tensor]:
    """:func:`dense_mean_hessian` of consecutive batches of ``batch_size`` examples, in order."""
    return [
        dense_mean_hessian(
            module,
            params,
            layers,
            x[s : s + batch_size]
            if isinstance(x, Tensor)
            else {k: v[s : s + batch_size] for k, v in x.items()},
            y[s : s + batch_size],
            loss,
        )
        for s in range(0, count(x), batch_size)
    ]


# ------------------------------------------------------------------ designed per-example Hessians
class DesignedHessians(nn.Module):
    """Logits (wᵀ X_n w, 0) of an input X_n (N, d, d, symmetric), weight w ∈ ℝ^d (zero-initialised).

    With label 1 the cross-entropy is softplus(wᵀ X_n w), whose Hessian in w at w = 0 is
    softplus'(0) · 2 X_n = X_n exactly: the per-example Hessians of ``weight`` are the inputs, so
    an estimator can be run on any spectrum one chooses (a network of one "layer" ``weight``).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        z = torch.einsum("i,nij,j->n", self.weight, x, self.weight)
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def crossing_hessians() -> tuple[Tensor, Tensor]:
    """Two diagonal 48×48 Hessians H_0, H_1 (stacked) and the direction v = 1 (48,) whose adaptive
    positive-part estimates cross, for a pruning rule to get right.

    * H_0: eigenvalues linspace(−1, 1, 48), one per coordinate: v·H_0⁺v = 12.255, approached
      slowly: after 6 Gauss–Radau steps R = 11.90 with error estimate e = |R_6 − R_3| = 1.35.
    * H_1: eigenvalues 2 (×2), 0.5 (×22), −0.5 (×16), −3 (×6), −4 (×2): v·H_1⁺v = 15, the
      maximum, exact after 5 steps (5 distinct eigenvalues). The positive mass at 0.5 next to
      the negative mass at −0.5 is resolved late: at step 4, R = 9.51 and e = 1.57, so
      R + e = 11.08 lies between H_0's R − e = 10.55 and its R + e (and R) after 6 steps.

    A rule that prunes example 1 at step 4 when its R + e is below example 0's R + e (or R),
    instead of R − e, drops the maximiser and reports 11.90 for 15.
    """
    dim = 48
    spectrum = [(2.0, 2), (0.5, 22), (-0.5, 16), (-3.0, 6), (-4.0, 2)]
    late = torch.cat([torch.full((count,), lam, dtype=DTYPE) for lam, count in spectrum])
    slow = torch.linspace(-1.0, 1.0, dim, dtype=DTYPE)
    return torch.stack([torch.diag(slow), torch.diag(late)]), torch.ones(dim, dtype=DTYPE)


# ------------------------------------------------------------------ tiny Hugging Face models
#: Sequence lengths of the tiny text batches: padding differs between examples.
HF_LENGTHS = (6, 4, 2, 5, 3)


def tiny_text_inputs(vocab: int, pad: int, *, seed: int = 0) -> dict[str, Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` for len(HF_LENGTHS) sequences of length 6."""
    g = torch.Generator().manual_seed(seed)
    steps = max(HF_LENGTHS)
    mask = (torch.arange(steps)[None, :] < torch.tensor(HF_LENGTHS)[:, None]).long()
    ids = torch.randint(2, vocab, (len(HF_LENGTHS), steps), generator=g)
    return {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}


def tiny_hf(name: str, *, seed: int = 0) -> tuple[nn.Module, Inputs, Tensor, list[str]]:
    """A float64 random Hugging Face model with a batch and a few small layers to measure.

    ``name``: bert, roberta, distilbert, gpt2 (sequence classification), vit, gpt2-lm (causal
    LM, labels with prompt positions and padding at −100). Returns (model, x, y, layers).
    """
    import transformers as tf

    small = {"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "bert":
            config = tf.BertConfig(hidden_size=4, vocab_size=20, num_labels=3, **small)
            model, pad = tf.BertForSequenceClassification(config), 0
            layers = ["bert.encoder.layer.0.attention.self.query.weight", "classifier.weight"]
        elif name == "roberta":
            config = tf.RobertaConfig(
                hidden_size=4, vocab_size=20, num_labels=3, pad_token_id=1, **small
            )
            model, pad = tf.RobertaForSequenceClassification(config), 1
            layers = [
                "roberta.encoder.layer.0.attention.self.value.weight",
                "classifier.out_proj.weight",
            ]
        elif name == "distilbert":
            config = tf.DistilBertConfig(
                dim=4, n_layers=1, n_heads=2, hidden_dim=8, vocab_size=20, num_labels=3
            )
            model, pad = tf.DistilBertForSequenceClassification(config), 0
            layers = ["distilbert.transformer.layer.0.attention.k_lin.weight", "classifier.weight"]
        elif name in ("gpt2", "gpt2-lm"):
            config = tf.GPT2Config(
                n_embd=4,
                n_layer=1,
                n_head=2,
                n_inner=4,
                vocab_size=20,
                n_positions=16,
                num_labels=3,
                pad_token_id=0,
                bos_token_id=0,
                eos_token_id=0,
            )
            lm = name == "gpt2-lm"
            model = (tf.GPT2LMHeadModel if lm else tf.GPT2ForSequenceClassification)(config)
            pad = 0
            layers = ["transformer.h.0.attn.c_proj.weight"] + (
                ["transformer.h.0.mlp.c_proj.weight"] if lm else ["score.weight"]
            )
        elif name == "vit":
            config = tf.ViTConfig(
                image_size=4, patch_size=2, num_channels=1, hidden_size=4, num_labels=3, **small
            )
            model = tf.ViTForImageClassification(config)
            layers = [
                "vit.embeddings.patch_embeddings.projection.weight",
                "vit.layers.0.attention.q_proj.weight",
                "classifier.weight",
            ]
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(len(HF_LENGTHS), 1, 4, 4, generator=g, dtype=DTYPE)
            y = torch.randint(0, CLASSES, (len(HF_LENGTHS),), generator=g)
            return model.to(DTYPE).eval(), x, y, layers
        else:
            raise ValueError(f"unknown tiny Hugging Face model {name!r}")
    x = tiny_text_inputs(20, pad, seed=seed)
    if name == "gpt2-lm":
        y = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
        y[:, :2] = -100  # prompt positions carry no label
        y[2, 1] = x["input_ids"][2, 1]  # the shortest sequence keeps a single label
    else:
        y = torch.randint(
            0, CLASSES, (len(HF_LENGTHS),), generator=torch.Generator().manual_seed(seed)
        )
    return model.to(DTYPE).eval(), x, y, layers


#: The tiny model of each task of :func:`tiny_task_hf` (seq2seq-lm: also ``bart``).
TASK_MODELS = {
    "token-classification": "bert-token",
    "regression": "bert-regression",
    "multi-label": "bert-multi-label",
    "seq2seq-lm": "bart",
}
#: Label lengths of the tiny seq2seq batches (decoder length 4): −100 after them.
LABEL_LENGTHS = (4, 3, 1, 2, 4)


def tiny_task_hf(name: str) -> tuple[nn.Module, list[str]]:
    """A float64 random Hugging Face model of a task and two small layers to measure.

    ``name``: bert-token (``BertForTokenClassification``, 3 labels), bert-regression (one output,
    ``num_labels`` 1), bert-multi-label (3 labels, ``problem_type`` multi_label_classification),
    t5 and bart (``…ForConditionalGeneration``). BERT and BART are initialised with a larger
    spread than transformers' default, so that the curvature of every layer is well above
    round-off. T5
    computes the variance of its RMS norm in float32 even in a float64 model, so its float64
    derivatives agree to float32 precision only; BART's are float64 throughout.
    """
    import transformers as tf

    small = {"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8}
    small["initializer_range"] = 0.5
    bert = ["bert.encoder.layer.0.attention.self.query.weight", "classifier.weight"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "bert-token":
            config = tf.BertConfig(hidden_size=4, vocab_size=20, num_labels=3, **small)
            model, layers = tf.BertForTokenClassification(config), bert
        elif name in ("bert-regression", "bert-multi-label"):
            regression = name == "bert-regression"
            config = tf.BertConfig(
                hidden_size=4,
                vocab_size=20,
                num_labels=1 if regression else 3,
                problem_type=None if regression else "multi_label_classification",
                **small,
            )
            model, layers = tf.BertForSequenceClassification(config), bert
        elif name == "t5":
            config = tf.T5Config(
                vocab_size=20,
                d_model=4,
                d_kv=2,
                d_ff=8,
                num_layers=1,
                num_heads=2,
                relative_attention_num_buckets=4,
                relative_attention_max_distance=8,
                decoder_start_token_id=0,
            )
            model = tf.T5ForConditionalGeneration(config)
            layers = [
                "encoder.block.0.layer.0.SelfAttention.q.weight",
                "decoder.block.0.layer.1.EncDecAttention.k.weight",
            ]
        elif name == "bart":
            config = tf.BartConfig(
                vocab_size=20,
                d_model=4,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=8,
                decoder_ffn_dim=8,
                max_position_embeddings=16,
                init_std=0.5,
            )
            model = tf.BartForConditionalGeneration(config)
            layers = [
                "model.encoder.layers.0.self_attn.q_proj.weight",
                "model.decoder.layers.0.encoder_attn.k_proj.weight",
            ]
        else:
            raise ValueError(f"unknown tiny task model {name!r}")
    return model.to(DTYPE).eval(), layers


def tiny_task_batch(name: str, model: nn.Module, *, seed: int = 0) -> tuple[Inputs, Tensor]:
    """Padded inputs and labels of len(HF_LENGTHS) examples for a model of :func:`tiny_task_hf`:
    token labels (N, 6) with −100 at padding and position 0; regression targets (N,); 0/1 labels
    (N, 3); seq2seq labels (N, 4) with −100 after LABEL_LENGTHS, and the decoder inputs the
    model makes from them (``decoder_input_ids``)."""
    g = torch.Generator().manual_seed(seed + 100)
    x = tiny_text_inputs(20, model.config.pad_token_id, seed=seed)
    n = len(HF_LENGTHS)
    if name == "bert-token":
        y = torch.randint(0, 3, x["input_ids"].shape, generator=g)
        y = y.masked_fill(x["attention_mask"] == 0, -100)
        y[:, 0] = -100
    elif name == "bert-regression":
        y = torch.randn(n, generator=g, dtype=DTYPE)
    elif name == "bert-multi-label":
        y = torch.randint(0, 2, (n, 3), generator=g).to(DTYPE)
    else:
        y = torch.randint(3, 20, (n, max(LABEL_LENGTHS)), generator=g)
        y = y.masked_fill(torch.arange(y.shape[1]) >= torch.tensor(LABEL_LENGTHS)[:, None], -100)
        x["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=y)
    return x, y
