"""The retained-graph routes of Linear-like layers (transposed JVPs, output-space Hessian forms
and per-example products) against dense float64 Hessians and Gauss–Newton blocks, on the tiny
networks, tiny Hugging Face models and a tiny GPT-2-shaped language model with a LoRA change."""

import pytest
import torch
from hessfine.bounds.estimators.quadratic_forms import quadratic_forms
from hessfine.bounds.functional import CausalLMLoss, FunctionalModel
from hessfine.bounds.operators import output_graph as output_graph_module
from hessfine.bounds.operators.output_graph import (
    OutputPairHVP,
    output_block_forms,
    transposed_ggn_forms,
)
from hessfine.bounds.safe_autodiff import differentiable
from torch import nn

from tests.cases import tiny_case
from tests.oracles import (
    DTYPE,
    causal_lm_loss,
    cross_entropy,
    dense_block_hessians,
    dense_ggn_blocks,
    positive_part,
    tiny_hf,
    tiny_text_inputs,
)
from tests.oracles import quadratic_forms as dense_forms

N = 7


@pytest.mark.parametrize(
    ("route", "oracle"),
    [(transposed_ggn_forms, dense_ggn_blocks), (output_block_forms, dense_block_hessians)],
    ids=["transposed-ggn", "output-block"],
)
@pytest.mark.parametrize("network", ["mlp_gelu", "cnn", "attention"])
def test_routes_match_the_dense_blocks(network, route, oracle):
    # Gauss–Newton forms against the dense G_i, exact blocks against the dense H_i
    module, fm, params, v, x, y = tiny_case(network, N)
    with differentiable():
        forms = route(fm, params, v, x, y)
    # MultiheadAttention uses in_proj_weight and out_proj.weight functionally: not recorded
    assert sorted(forms) == sorted(n for n in v if not n.startswith("attn."))
    for name, values in forms.items():
        dense = dense_forms(oracle(module, params, name, x, y), v[name])
        torch.testing.assert_close(values, dense, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["gpt2-lm", "gpt2", "bert"])
def test_hugging_face_models_with_padding(name):
    # GPT-2's Conv1D projections; the language model's head route (u at the head's input, the
    # vocabulary tangent formed a few examples at a time) against the dense blocks
    module, x, y, layers = tiny_hf(name)
    lm = name == "gpt2-lm"
    fm, params = FunctionalModel.from_module(module, loss=CausalLMLoss() if lm else None)
    loss = causal_lm_loss if lm else cross_entropy
    g = torch.Generator().manual_seed(1)
    v = {n: 0.3 * torch.randn(params[n].shape, generator=g, dtype=DTYPE) for n in layers}
    with differentiable():
        ggn = transposed_ggn_forms(fm, params, v, x, y)
        block = output_block_forms(fm, params, v, x, y)
    assert sorted(ggn) == sorted(block) == sorted(layers)
    for layer in layers:
        G = dense_ggn_blocks(module, params, layer, x, y, loss)
        H = dense_block_hessians(module, params, layer, x, y, loss)
        torch.testing.assert_close(ggn[layer], dense_forms(G, v[layer]), rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(block[layer], dense_forms(H, v[layer]), rtol=1e-9, atol=1e-14)


def test_language_model_head_route_in_small_chunks(monkeypatch):
    # one example per chunk of the vocabulary tangent: the same values as one chunk
    module, x, y, layers = tiny_hf("gpt2-lm")
    fm, params = FunctionalModel.from_module(module, loss=CausalLMLoss())
    v = {n: torch.randn_like(params[n]) for n in layers}
    calls = []
    original = output_graph_module._head_curvatures

    def counted(fmodel, z, tangents, weight, y):
        calls.append(sorted(tangents))
        return original(fmodel, z, tangents, weight, y)

    monkeypatch.setattr(output_graph_module, "_head_curvatures", counted)
    with differentiable():
        whole = transposed_ggn_forms(fm, params, v, x, y)
        monkeypatch.setattr(output_graph_module, "_CURVATURE_CHUNK", 1)
        split = transposed_ggn_forms(fm, params, v, x, y)
    assert calls == [sorted(layers)] * 2  # the head route was taken, for both layers, both times
    for layer in layers:
        torch.testing.assert_close(split[layer], whole[layer], rtol=1e-12, atol=1e-15)


class Headed(nn.Module):
    """A classifier whose output embedding is its Linear head (the head route for (B, C)
    logits and a loss that is not a token loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.lm_head = nn.Linear(8, 5, bias=False)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, x):
        return self.lm_head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("chunk", [2**25, 1])
def test_head_route_of_a_classifier_in_chunks_of_examples(chunk, monkeypatch):
    monkeypatch.setattr(output_graph_module, "_CURVATURE_CHUNK", chunk)
    torch.manual_seed(0)
    module = Headed().double().eval()
    fm, params = FunctionalModel.from_module(module)
    x, y = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 5, (5,))
    v = {"body.weight": torch.randn_like(params["body.weight"])}
    with differentiable():
        forms = transposed_ggn_forms(fm, params, v, x, y)
    dense = dense_forms(dense_ggn_blocks(module, params, "body.weight", x, y), v["body.weight"])
    torch.testing.assert_close(forms["body.weight"], dense, rtol=1e-10, atol=1e-14)


class Tied(nn.Module):
    """A Linear used twice in a row: first-order routes count both calls; the second-derivative
    routes leave it (the second call's input depends on the weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_a_layer_called_twice_is_left_to_the_general_routes():
    torch.manual_seed(0)
    module = Tied().double().eval()
    fm, params = FunctionalModel.from_module(module)
    x, y = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,))
    v = {n: torch.randn_like(params[n]) for n in ("inner.weight", "head.weight")}
    with differentiable():
        ggn = transposed_ggn_forms(fm, params, v, x, y)
        block = output_block_forms(fm, params, v, x, y)
        pairs = OutputPairHVP(fm, params, x, y)
        members = [torch.tensor([0, 2]), torch.tensor([1])]
        blocks = [torch.randn(2, 16, dtype=DTYPE), torch.randn(1, 12, dtype=DTYPE)]
        images = pairs(list(v), blocks, members)
    assert sorted(ggn) == ["head.weight", "inner.weight"]
    assert sorted(block) == ["head.weight"]
    assert images[0] is None and not pairs.supports("inner.weight")
    for name in ggn:
        dense = dense_forms(dense_ggn_blocks(module, params, name, x, y), v[name])
        torch.testing.assert_close(ggn[name], dense, rtol=1e-10, atol=1e-14)
    H = dense_block_hessians(module, params, "head.weight", x, y)
    torch.testing.assert_close(block["head.weight"], dense_forms(H, v["head.weight"]))
    torch.testing.assert_close(images[1], (H[1] @ blocks[1][0])[None], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("network", ["mlp_gelu", "attention"])
def test_pair_products_and_the_rebuild_on_the_running_examples(network):
    # each layer its own examples; then a call on fewer than half of them rebuilds the graph on
    # those: H_ii(x_b) u_p throughout
    module, fm, params, v, x, y = tiny_case(network, N)
    names = [n for n in v if not n.startswith("attn.")]
    g = torch.Generator().manual_seed(0)
    with differentiable():
        pairs = OutputPairHVP(fm, params, x, y)
        for members in (
            [torch.tensor(m) for m in ([0, 3, 6], [1, 2, 3, 5], [6])][: len(names)],
            [torch.tensor([4])] * len(names),
        ):
            blocks = [
                torch.randn(m.numel(), v[n].numel(), generator=g, dtype=DTYPE)
                for n, m in zip(names, members, strict=True)
            ]
            images = pairs(names, blocks, members)
            assert pairs.examples is not None
            assert pairs.examples.tolist() == sorted({int(b) for m in members for b in m})
            for name, m, u, image in zip(names, members, blocks, images, strict=True):
                H = dense_block_hessians(module, params, name, x, y)[m]
                torch.testing.assert_close(image, (H @ u[..., None])[..., 0], rtol=1e-9, atol=1e-12)


def tiny_gpt2_lora():
    """A float64 random 2-layer GPT-2 language model (vocabulary 23) with a rank-2 LoRA change
    ΔW = s·(B A)ᵀ of its two c_attn projections (Conv1D, fan_in_fan_out), padded sequences with
    prompts of 2 tokens masked: (module, x, y, directions)."""
    import transformers as tf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = tf.GPT2Config(
            n_embd=6, n_layer=2, n_head=2, n_inner=8, vocab_size=23, n_positions=16,
            pad_token_id=0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        module = tf.GPT2LMHeadModel(config).to(DTYPE).eval()
        g = torch.Generator().manual_seed(2)
        directions = {}
        for layer in range(2):
            name = f"transformer.h.{layer}.attn.c_attn.weight"
            a = torch.randn(2, 6, generator=g, dtype=DTYPE)
            b = torch.randn(18, 2, generator=g, dtype=DTYPE)
            directions[name] = (2.0 / 2) * (b @ a).T  # s = α / r with α = 2, r = 2
    lengths = torch.tensor([6, 5, 4])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 23, (3, 6), generator=torch.Generator().manual_seed(3)) * mask
    y = ids.masked_fill(mask == 0, -100)
    y[:, :2] = -100
    return module, {"input_ids": ids, "attention_mask": mask}, y, directions


def test_gpt2_lora_every_estimator_against_the_dense_hessian():
    module, x, y, v = tiny_gpt2_lora()
    fm, params = FunctionalModel.from_module(module, loss=CausalLMLoss())
    steps = max(t.numel() for t in v.values())  # the Krylov spaces are exhausted: exact
    batches = [({k: t[:2] for k, t in x.items()}, y[:2]), ({k: t[2:] for k, t in x.items()}, y[2:])]
    results = {
        estimator: quadratic_forms(
            fm, params, v, batches, estimator=estimator, lanczos_steps=steps, positive_rtol=0.0
        )
        for estimator in ("ggn", "block", "auto")
    }
    for name in v:
        H = dense_block_hessians(module, params, name, x, y, causal_lm_loss)
        G = dense_ggn_blocks(module, params, name, x, y, causal_lm_loss)
        expected = {
            "ggn": dense_forms(G, v[name]),
            "block": dense_forms(H, v[name]),
            "auto": dense_forms(positive_part(H), v[name]),
        }
        assert results["ggn"][name].diagnostics["ggn_products"] == "transposed-vjp"
        assert results["block"][name].diagnostics["hvp_products"] == "output-graph"
        assert results["auto"][name].route == "lanczos"
        for estimator, values in expected.items():
            form = results[estimator][name]
            assert form.max == pytest.approx(float(values.max()), rel=1e-8)
            assert form.mean == pytest.approx(float(values.mean()), rel=1e-8)
            assert form.argmax == int(values.argmax())


def gpt2_short_sequences():
    """A float64 random GPT-2 classifier of width 8 on padded sequences of at most 6 tokens, so
    that the inputs of its Conv1D projections span fewer directions than their width."""
    import transformers as tf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = tf.GPT2Config(
            n_embd=8, n_layer=1, n_head=2, n_inner=8, vocab_size=20, n_positions=16,
            num_labels=3, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        module = tf.GPT2ForSequenceClassification(config).to(DTYPE).eval()
    x = tiny_text_inputs(20, 0)
    y = torch.randint(0, 3, (x["input_ids"].shape[0],), generator=torch.Generator().manual_seed(1))
    return module, x, y, ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_proj.weight"]


@pytest.mark.parametrize("network", ["mlp_gelu", "attention", "gpt2"])
def test_input_span_starts_keep_every_form_with_a_zero_at_zero(network):
    # Linear (one input row; tokens) and Conv1D weights: the removed part of v lies in the null
    # space of every example's H_ii, so the positive part, the form and |H| are unchanged, and
    # something was removed (the inputs span fewer directions than the layer's width)
    if network == "gpt2":
        module, x, y, names = gpt2_short_sequences()
        fm, params = FunctionalModel.from_module(module)
        g = torch.Generator().manual_seed(2)
        v = {n: torch.randn(params[n].shape, generator=g, dtype=DTYPE) for n in names}
    else:
        module, fm, params, v, x, y = tiny_case(network, N)
        v = {n: t for n, t in v.items() if not n.startswith("attn.")}
    with differentiable():
        count = y.shape[0]
        blocks = {n: t.reshape(1, -1).expand(count, -1) for n, t in v.items()}
        starts = OutputPairHVP(fm, params, x, y).input_span_starts(blocks)
    assert sorted(starts) == sorted(v)
    for name, start in starts.items():
        H = dense_block_hessians(module, params, name, x, y)
        flat = v[name].reshape(1, -1).expand_as(start)
        assert bool((start.norm(dim=1) < 0.99 * flat.norm(dim=1)).all())
        removed = (H @ (flat - start)[..., None])[..., 0]
        assert float(removed.abs().max()) < 1e-10 * float(H.abs().max() * flat.abs().max())
        lam, vectors = torch.linalg.eigh(H)
        absolute = vectors @ torch.diag_embed(lam.abs()) @ vectors.transpose(1, 2)
        for matrix in (H, positive_part(H), absolute):
            torch.testing.assert_close(
                torch.einsum("ni,nij,nj->n", start, matrix, start),
                dense_forms(matrix, v[name]),
                rtol=1e-9,
                atol=1e-14,
            )
