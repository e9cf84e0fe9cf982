"""State dicts of modules wrapped by torch.compile, FSDP and activation checkpointing, measured
through the command line (docs/inputs.md, "Checkpoints").

The wrappers hold the wrapped module under an attribute (``_orig_mod``,
``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``) whose name can stand anywhere in a
key. Each layout is measured and must give the plain state dict's measurement to round-off.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hessfine.analysis.checkpoints import align, select_layers
from hessfine.analysis.cli import main
from hessfine.analysis.errors import InputError
from hessfine.analysis.sources.files import strip_wrappers
from torch import nn

NET = """
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


def build():
    return Net()
"""


def _build(seed: int) -> nn.Module:
    namespace: dict = {}
    exec(NET, namespace)
    torch.manual_seed(seed)
    return namespace["build"]()


def _fsdp_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The names of ``named_parameters()`` under FSDP with ``use_orig_params=True``, every Linear
    its own unit (``ModuleWrapPolicy({nn.Linear})``), and activation checkpointing applied to
    every Linear afterwards (``apply_activation_checkpointing(..., checkpoint_wrapper)``):
    ``_fsdp_wrapped_module.encoder.0._fsdp_wrapped_module._checkpoint_wrapped_module.weight``.

    Written here, not made by FSDP, so that the tests start no process group; the layout is
    what torch 2.14's FSDP gives on the CPU in a gloo group of one process.
    """
    out = {}
    for key, value in state.items():
        module, name = key.rsplit(".", 1)
        wrapped = "_fsdp_wrapped_module._checkpoint_wrapped_module"
        out[f"_fsdp_wrapped_module.{module}.{wrapped}.{name}"] = value
    return out


def _layouts(net: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The fine-tuned ``net``'s weights as each wrapper leaves them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    plain = {k: v.clone() for k, v in net.state_dict().items()}
    layouts = {"plain": plain}
    layouts["compiled"] = dict(torch.compile(net, backend="eager").state_dict())
    encoder = net.encoder
    net.encoder = torch.compile(encoder, backend="eager")
    layouts["compiled_submodule"] = dict(net.state_dict())
    # checkpoint_wrapper's state_dict() removes its name by a hook; named_parameters() (what
    # optimizers, DeepSpeed's consolidated weights and hand-written savers record) keeps it
    net.encoder = checkpoint_wrapper(encoder)
    layouts["checkpoint_wrapper"] = dict(net.named_parameters())
    assert any("._checkpoint_wrapped_module." in k for k in layouts["checkpoint_wrapper"])
    net.encoder = encoder
    layouts["fsdp"] = _fsdp_layout(plain)
    layouts["compiled_ddp"] = {f"_orig_mod.module.{k}": v for k, v in plain.items()}
    layouts["ddp_of_compiled"] = {f"module._orig_mod.{k}": v for k, v in plain.items()}
    assert any(k.startswith("encoder._orig_mod.") for k in layouts["compiled_submodule"])
    assert all(k.startswith("_orig_mod.") for k in layouts["compiled"])
    return {k: {n: t.detach().clone() for n, t in v.items()} for k, v in layouts.items()}


@pytest.fixture(scope="module")
def wrapped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wrapped")
    (root / "net.py").write_text(NET)
    torch.save(_build(0).state_dict(), root / "pretrained.pt")
    torch.save(_layouts(_build(1))["compiled_submodule"], root / "pretrained_compiled.pt")
    for name, state in _layouts(_build(2)).items():
        torch.save(state, root / f"{name}.pt")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    torch.save({"x": x, "y": y}, root / "train.pt")
    return root


def _measure(root: Path, name: str, reference: str = "pretrained.pt", *extra: str) -> dict:
    out = root / "m" / f"{name}-{reference}"
    args = ["measure", root / f"{name}.pt", "--reference", root / reference,
            "--model", f"{root / 'net.py'}:build", "--data", root / "train.pt", "--out", out,
            "--samples", 8, "--dtype", "float64", "--quiet", *extra]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    return json.loads((out / "measurement.json").read_text())


def _assert_same(result: dict, expected: dict) -> None:
    assert [a["name"] for a in result["layers"]] == [b["name"] for b in expected["layers"]]
    for a, b in zip(result["layers"], expected["layers"], strict=True):
        assert a["distance"] == pytest.approx(b["distance"], rel=1e-12)
        assert a["quadratic_form"]["max"] == pytest.approx(b["quadratic_form"]["max"], rel=1e-10)
    assert result["loss"]["train"] == pytest.approx(expected["loss"]["train"], rel=1e-12)
    assert result["bounds"]["theorem_2_1"] == pytest.approx(
        expected["bounds"]["theorem_2_1"], rel=1e-10
    )


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("compiled", "_orig_mod. (torch.compile)"),
        ("compiled_submodule", "_orig_mod. (torch.compile)"),
        ("checkpoint_wrapper", "_checkpoint_wrapped_module. (activation checkpointing)"),
        (
            "fsdp",
            "_fsdp_wrapped_module. (FSDP), _checkpoint_wrapped_module. (activation checkpointing)",
        ),
        ("compiled_ddp", "_orig_mod. (torch.compile)"),
        ("ddp_of_compiled", "_orig_mod. (torch.compile)"),
    ],
)
def test_wrapped_state_dict_measures_as_the_plain_one(wrapped, capsys, name, shown) -> None:
    expected = _measure(wrapped, "plain")
    capsys.readouterr()
    _assert_same(_measure(wrapped, name, "pretrained.pt", "--verbose"), expected)
    table = capsys.readouterr().out
    assert f"checkpoint keys: removed {shown}" in table
    assert "reference keys" not in table


def test_a_compiled_reference_is_unwrapped_too(wrapped, capsys) -> None:
    expected = _measure(wrapped, "plain", "pretrained.pt")
    plain_ref = _measure(wrapped, "plain", "pretrained_compiled.pt", "--verbose")
    table = capsys.readouterr().out
    assert "reference keys: removed _orig_mod. (torch.compile)" in table
    assert "checkpoint keys" not in table
    assert plain_ref["layers"][0]["distance"] != expected["layers"][0]["distance"]
    _assert_same(_measure(wrapped, "compiled_submodule", "pretrained_compiled.pt"), plain_ref)


def test_wrapper_names_are_removed_only_where_the_keys_then_match() -> None:
    net = _build(0)
    plain = net.state_dict()
    alignment = align(net, plain, plain, layers=select_layers(net))
    assert alignment.unwrapped == {}
    assert "removed" not in alignment.format_table()
    # a parameter named like a wrapper is not a wrapper; two keys that would become one are kept
    state = {"a._orig_mod.w": torch.zeros(1), "a.w": torch.ones(1), "_orig_mod": torch.ones(1)}
    assert strip_wrappers(state) == (state, ())
    assert strip_wrappers({"_orig_mod": state["a.w"]}) == ({"_orig_mod": state["a.w"]}, ())
    unwrapped, names = strip_wrappers({"x._fsdp_wrapped_module._orig_mod.w": state["a.w"]})
    assert list(unwrapped) == ["x.w"] and names == ("_orig_mod", "_fsdp_wrapped_module")
    stranger = {f"_orig_mod.other.{k}": v for k, v in plain.items()}
    with pytest.raises(InputError, match="lacks 6 of the model's parameters"):
        align(_build(0), stranger, plain, layers=select_layers(net))
