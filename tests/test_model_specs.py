"""Tests for hessfine.analysis.model_specs: every model spec form and every user error."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from hessfine.analysis.errors import InputError
from hessfine.analysis.model_specs import build_model, parse_model_kwargs
from torch import nn


def _assert_one_line(err: pytest.ExceptionInfo[InputError], *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def _float32_eval(model: nn.Module) -> None:
    assert not model.training
    assert all(not m.training for m in model.modules())
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32


@pytest.fixture
def hf_dir(tiny_bert):
    return tiny_bert[1]


def test_parse_model_kwargs() -> None:
    assert parse_model_kwargs('{"num_classes": 10, "x": [1]}') == {"num_classes": 10, "x": [1]}
    assert parse_model_kwargs(None) == {}
    assert parse_model_kwargs("  ") == {}
    with pytest.raises(InputError) as err:
        parse_model_kwargs("{num_classes: 10}")
    _assert_one_line(err, "--model-kwargs", "not valid JSON")
    with pytest.raises(InputError) as err:
        parse_model_kwargs("[1, 2]")
    _assert_one_line(err, "--model-kwargs", "JSON object")


def test_torchvision_model() -> None:
    model = build_model("torchvision:resnet18", {"num_classes": 10})
    assert type(model).__name__ == "ResNet"
    assert model.fc.out_features == 10
    _float32_eval(model)
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_unknown_name_and_download_refused() -> None:
    with pytest.raises(InputError) as err:
        build_model("torchvision:resnet19")
    _assert_one_line(err, "resnet19", "list_models", "resnet18")
    with pytest.raises(InputError) as err:
        build_model("torchvision:resnet18", {"weights": "IMAGENET1K_V1"})
    _assert_one_line(err, "weights", "--model-kwargs")
    with pytest.raises(InputError) as err:
        build_model("torchvision:resnet18", {"no_such_argument": 1})
    _assert_one_line(err, "torchvision:resnet18", "no_such_argument", "--model-kwargs")


def test_timm_model() -> None:
    model = build_model("timm:resnet10t", {"num_classes": 5})
    _float32_eval(model)
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(InputError) as err:
        build_model("timm:not_a_model_xyz")
    _assert_one_line(err, "not_a_model_xyz", "timm.list_models")
    with pytest.raises(InputError) as err:
        build_model("timm:resnet10t", {"pretrained": True})
    _assert_one_line(err, "pretrained")


def test_timm_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(InputError) as err:
        build_model("timm:resnet10t")
    _assert_one_line(err, "pip install 'hessfine[timm]'")


def test_hf_directory(hf_dir) -> None:
    model = build_model(f"hf:{hf_dir}")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config._attn_implementation == "sdpa"  # transformers' default, not forced
    assert (
        build_model(f"hf:{hf_dir}", {"attn_implementation": "eager"}).config._attn_implementation
        == "eager"
    )
    assert model.classifier.out_features == 3
    _float32_eval(model)
    out = model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 3))
    assert out.logits.shape == (1, 3)
    same = build_model("hf", hf_directory=hf_dir)
    assert type(same).__name__ == "BertForSequenceClassification"
    wider = build_model(f"hf:{hf_dir}", {"num_labels": 5})
    assert wider.classifier.out_features == 5


def test_hf_fallback_without_architectures(hf_dir, tmp_path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = build_model(f"hf:{tmp_path}")
    assert type(model).__name__ == "BertForSequenceClassification"


def test_hf_errors(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError) as err:
        build_model("hf")
    _assert_one_line(err, "hf:DIR")
    with pytest.raises(InputError) as err:
        build_model(f"hf:{tmp_path}")
    _assert_one_line(err, "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError) as err:
        build_model(f"hf:{tmp_path}")
    _assert_one_line(err, "config.json")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(InputError) as err:
        build_model(f"hf:{tmp_path}")
    _assert_one_line(err, "pip install 'hessfine[text]'")


FACTORY_FILE = """
import torch
from torch import nn


def make(width=4, classes=3):
    return nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, classes)).double()


def broken():
    raise ValueError("bad width\\nsecond line")


def not_a_module():
    return 42
"""


def test_file_factory(tmp_path) -> None:
    path = tmp_path / "my_models.py"
    path.write_text(FACTORY_FILE)
    model = build_model(f"{path}:make", {"width": 7})
    assert model[0].out_features == 7
    _float32_eval(model)
    with pytest.raises(InputError) as err:
        build_model(f"{path}:broken")
    _assert_one_line(err, f"{path}:broken", "ValueError: bad width second line")
    with pytest.raises(InputError) as err:
        build_model(f"{path}:not_a_module")
    _assert_one_line(err, "int", "nn.Module")
    with pytest.raises(InputError) as err:
        build_model(f"{path}:missing")
    _assert_one_line(err, "'missing'")
    with pytest.raises(InputError) as err:
        build_model(f"{path}:make", {"depth": 3})
    _assert_one_line(err, "depth", "--model-kwargs")
    with pytest.raises(InputError) as err:
        build_model(f"{tmp_path / 'absent.py'}:make")
    _assert_one_line(err, "absent.py", "no such file")
    broken = tmp_path / "broken_syntax.py"
    broken.write_text("def make(:\n")
    with pytest.raises(InputError) as err:
        build_model(f"{broken}:make")
    _assert_one_line(err, "broken_syntax.py", "SyntaxError")


def test_package_module_factory(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("torchvision.models:resnet18", {"num_classes": 3})
    assert model.fc.out_features == 3
    package = tmp_path / "hessfine_test_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(FACTORY_FILE)
    (package / "needs_dep.py").write_text("import hessfine_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("hessfine_test_pkg.nets:make", {"classes": 5})
    assert model[2].out_features == 5
    with pytest.raises(InputError) as err:
        build_model("hessfine_test_pkg.absent:make")
    _assert_one_line(err, "no module named 'hessfine_test_pkg.absent'")
    with pytest.raises(InputError) as err:
        build_model("hessfine_test_pkg.needs_dep:make")
    _assert_one_line(err, "hessfine_no_such_dependency")


def test_module_in_current_directory(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hessfine_cwd_models.py").write_text(FACTORY_FILE)
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    model = build_model("hessfine_cwd_models:make")
    assert model[2].out_features == 3
    assert sys.path == before


@pytest.mark.parametrize("spec", ["resnet18", "torchvision:", "a.py:", "x:1abc"])
def test_malformed_spec(spec: str) -> None:
    with pytest.raises(InputError) as err:
        build_model(spec)
    _assert_one_line(err, "--model", "torchvision:NAME")
