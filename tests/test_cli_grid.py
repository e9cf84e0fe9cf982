"""`hessfine measure` over a grid of unusual-but-valid inputs: exit 0 and finite, schema-valid
results; and every inadmissible option value: exit 2 with one line (issue 9, item 1).

The valid grid (zero layers, layers unused in eval mode, tied weights, half-precision
checkpoints, one example, one class, ``--samples`` beyond the data, every estimator and the
optional phases) is explored with hypothesis, derandomized and small, with the named corner cases
pinned as explicit examples.
"""

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hessfine.analysis.cli import main
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from tests.test_measure import assert_schema

SPEC = "tests.test_cli_grid:grid_net"


class GridNet(nn.Module):
    """5 → fc1 → tanh → fc2 → tanh [→ fc3, tied to fc2 → tanh] → head 3.

    ``aux``: an extra classifier used only in training mode (as GoogLeNet's aux heads).
    """

    def __init__(self, *, aux: bool = False, tied: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.tied = tied
        if tied:
            self.fc3 = nn.Linear(6, 6)
            self.fc3.weight = self.fc2.weight
        self.aux = nn.Linear(6, 3) if aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(x))))
        if self.tied:
            h = torch.tanh(self.fc3(h))
        out = self.head(h)
        if self.training and self.aux is not None:
            out = out + self.aux(h)
        return out


def grid_net(aux: bool = False, tied: bool = False) -> nn.Module:
    """The seeded :class:`GridNet` (the fine-tuned values come from the checkpoint)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GridNet(aux=aux, tied=tied).eval()


def _write_case(tmp: Path, case: dict) -> list[str]:
    """Checkpoints and data for ``case``; returns the ``hessfine measure`` arguments."""
    kwargs = {"aux": case["aux"], "tied": case["tied"]}
    module = grid_net(**kwargs)
    g = torch.Generator().manual_seed(1)
    reference = {k: v.detach().clone() for k, v in module.state_dict().items()}
    finetuned = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in reference.items()}
    if case["tied"]:
        finetuned["fc3.weight"] = finetuned["fc2.weight"]
    if case["zero"] in ("head", "new-head"):  # a zero-initialised head
        finetuned["head.weight"] = torch.zeros_like(finetuned["head.weight"])
        finetuned["head.bias"] = torch.zeros_like(finetuned["head.bias"])
    if case["zero"] == "new-head":  # and absent from the reference: measured from zero
        del reference["head.weight"], reference["head.bias"]
    if case["zero"] == "unchanged":  # v_i = 0 on every layer but fc1
        finetuned.update({k: v for k, v in reference.items() if not k.startswith("fc1")})
    dtype = torch.float16 if case["half"] else torch.float32
    for name, state in (("ft", finetuned), ("ref", reference)):
        save_file(
            {k: v.to(dtype).clone().contiguous() for k, v in state.items()},
            str(tmp / f"{name}.safetensors"),
        )
    x = torch.randn(case["n"], 5, generator=g)
    y = (
        torch.ones(case["n"], dtype=torch.long)
        if case["one_class"]
        else torch.arange(case["n"]) % 3
    )
    torch.save({"x": x, "y": y}, tmp / "train.pt")
    args = [
        "measure",
        str(tmp / "ft.safetensors"),
        "--reference",
        str(tmp / "ref.safetensors"),
        "--model",
        SPEC,
    ]
    args += ["--model-kwargs", json.dumps(kwargs), "--data", str(tmp / "train.pt")]
    args += ["--out", str(tmp / "out"), "--quiet", "--estimator", case["estimator"]]
    args += ["--samples", str(case["samples"]), "--sample-order", case["order"]]
    args += ["--batch-size", "3", "--lanczos-steps", "4", *case["layers"], *case["extra"]]
    return args


EXTRAS = [
    [],
    ["--trace", "--trace-probes", "3"],
    ["--eigen", "2", "--density"],
    ["--noise-sigma", "0.01", "--noise-draws", "2", "--noise-relative"],
    ["--certificate", "--epsilon", "0.1"],
]

CASES = st.fixed_dictionaries(
    {
        "estimator": st.sampled_from(["auto", "block", "positive", "ggn", "reference-code"]),
        "aux": st.booleans(),
        "tied": st.booleans(),
        "zero": st.sampled_from(["none", "head", "new-head", "unchanged"]),
        "half": st.booleans(),
        "n": st.sampled_from([1, 2, 9]),
        "one_class": st.booleans(),
        "samples": st.sampled_from([1, 4, 50]),
        "order": st.sampled_from(["stratified", "file"]),
        "extra": st.sampled_from(EXTRAS),
        "layers": st.sampled_from([[], ["--layers", "fc1.*", "head.*"], ["--layers", "*.bias"]]),
    }
).filter(lambda case: "--certificate" not in case["extra"] or case["n"] >= 8)

BASE = {
    "estimator": "auto",
    "aux": False,
    "tied": False,
    "zero": "none",
    "half": False,
    "n": 9,
    "one_class": False,
    "samples": 4,
    "order": "stratified",
    "extra": [],
    "layers": [],
}


def _numbers(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _numbers(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _numbers(value, f"{path}[{i}]")
    elif isinstance(node, float | int) and not isinstance(node, bool):
        yield path, node


@settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure prints its case at once
)
@given(case=CASES)
@example(case={**BASE, "aux": True, "estimator": "auto", "extra": EXTRAS[1]})
@example(case={**BASE, "aux": True, "estimator": "ggn", "extra": EXTRAS[2]})
@example(case={**BASE, "aux": True, "estimator": "block", "extra": EXTRAS[3]})
@example(case={**BASE, "zero": "head", "extra": EXTRAS[4]})
@example(case={**BASE, "zero": "new-head", "estimator": "positive"})
@example(case={**BASE, "zero": "unchanged", "estimator": "block", "extra": EXTRAS[4]})
@example(case={**BASE, "tied": True, "estimator": "positive", "extra": EXTRAS[1]})
@example(case={**BASE, "half": True, "estimator": "reference-code"})
@example(case={**BASE, "n": 1, "samples": 50, "extra": EXTRAS[2]})
@example(case={**BASE, "one_class": True, "order": "stratified", "samples": 4})
@example(case={**BASE, "layers": ["--layers", "*.bias"], "extra": EXTRAS[4]})
def test_every_valid_input_gives_a_finite_schema_valid_result(case):
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        code = main(_write_case(tmp, case))
        assert code == 0, case
        text = (tmp / "out" / "measurement.json").read_text()
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the result"))
    assert_schema(result)
    for path, value in _numbers(result):
        assert math.isfinite(value), path
    n_used = min(case["samples"], case["n"])
    assert result["data"]["n_hessian_samples"] == n_used
    sample = result["data"]["hessian_sample"]
    if sample["indices"] is None:
        assert n_used == case["n"] and sample["order"] == "file"
    else:
        assert len(set(sample["indices"])) == n_used
        if case["order"] == "file":
            assert sample["indices"] == list(range(n_used))
        elif not case["one_class"] and n_used >= 3:  # every class present gets an example
            assert len(sample["per_class"]) == min(3, case["n"])
    aux_selected = case["aux"] and "fc1.*" not in case["layers"]
    assert bool(result["unused_layers"]) == aux_selected
    assert all(name.startswith("aux.") for name in result["unused_layers"])
    for layer in result["layers"]:
        for key in ("max", "mean"):
            assert isinstance(layer["quadratic_form"][key], float)
        if layer["name"].startswith("aux."):
            assert layer["method"] == "unused" and layer["quadratic_form"]["max"] == 0.0
    bounds = result["bounds"]
    for key in ("hessian_distance_measure", "theorem_2_1"):
        assert isinstance(bounds[key], float) and math.isfinite(bounds[key]), key
    if "--certificate" in case["extra"]:
        assert 0.0 <= bounds["pac_bayes_certificate"]["bound"] <= 1.0
    assert any("not over the data distribution" in note for note in result["notes"])


INADMISSIBLE = [
    (["--noise-sigma", "inf"], "--noise-sigma"),
    (["--noise-sigma", "nan"], "--noise-sigma"),
    (["--noise-sigma", "0"], "--noise-sigma"),
    (["--noise-sigma", "1e300"], "--noise-sigma"),  # overflows float32
    (["--epsilon", "inf"], "--epsilon"),
    (["--epsilon", "nan"], "--epsilon"),
    (["--epsilon", "-0.5"], "--epsilon"),
    (["--loss-bound", "inf"], "--loss-bound"),
    (["--loss-bound", "0"], "--loss-bound"),
    (["--n-train", "0"], "--n-train"),
    (["--lanczos-steps", "0"], "--lanczos-steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--trace-probes", "1"], "--trace-probes"),
    (["--noise-draws", "1"], "--noise-draws"),
    (["--eigen", "-1"], "--eigen"),
    (["--image-size", "0"], "--image-size"),
    (["--seed", str(2**64)], "--seed"),
    (["--samples", "0"], "--samples"),
    (["--sample-order", "random"], "--sample-order"),
    (["--certificate"], "--certificate"),  # 2 training examples < 8
]


@pytest.mark.parametrize(
    ("extra", "named"), INADMISSIBLE, ids=[" ".join(e) for e, _ in INADMISSIBLE]
)
def test_each_inadmissible_option_exits_2_with_one_line(tmp_path, capsys, extra, named):
    args = _write_case(tmp_path, {**BASE, "n": 2, "extra": extra})
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert named in err
    assert not (tmp_path / "out" / "measurement.json").exists()


def test_every_layer_unused_is_an_input_error(tmp_path, capsys):
    args = _write_case(tmp_path, {**BASE, "aux": True})
    assert main([*args, "--layers", "aux.*"]) == 2
    assert "--layers" in capsys.readouterr().err


def test_certificate_is_defined_when_no_quadratic_form_is_positive(tmp_path):
    """``block`` can give 𝓗_i < 0 on every layer; the certificate then takes its curvature from
    the Gauss–Newton forms (PSD) instead of failing."""
    module = grid_net()
    base = {k: v.detach().double() for k, v in module.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    y = torch.arange(9) % 3

    def block_value(v: torch.Tensor) -> float:
        def loss(t: torch.Tensor) -> torch.Tensor:
            params = {**base, "fc1.weight": base["fc1.weight"] + (1 + t) * v}
            logits = torch.func.functional_call(module.double(), params, (x[:1],))
            return nn.functional.cross_entropy(logits, y[:1])

        return float(torch.autograd.functional.hessian(loss, torch.zeros((), dtype=torch.float64)))

    directions = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(200))
    v = next(d for d in directions if block_value(d) < 0)
    save_file(
        {k: t.float().contiguous() for k, t in base.items()}, str(tmp_path / "ref.safetensors")
    )
    finetuned = {**base, "fc1.weight": base["fc1.weight"] + v}
    save_file(
        {k: t.float().contiguous() for k, t in finetuned.items()}, str(tmp_path / "ft.safetensors")
    )
    torch.save({"x": x.float(), "y": y}, tmp_path / "train.pt")
    args = ["measure", str(tmp_path / "ft.safetensors"), "--reference"]
    args += [
        str(tmp_path / "ref.safetensors"),
        "--model",
        SPEC,
        "--data",
        str(tmp_path / "train.pt"),
    ]
    args += ["--out", str(tmp_path / "out"), "--quiet", "--estimator", "block", "--layers"]
    args += ["fc1.weight", "--samples", "1", "--sample-order", "file", "--certificate"]
    args += ["--dtype", "float64"]
    assert main(args) == 0
    result = json.loads((tmp_path / "out" / "measurement.json").read_text())
    assert result["layers"][0]["quadratic_form"]["max"] == pytest.approx(block_value(v), rel=1e-6)
    certificate = result["bounds"]["pac_bayes_certificate"]
    assert certificate["curvature_source"] == "gauss_newton"
    assert 0.0 <= certificate["bound"] <= 1.0
