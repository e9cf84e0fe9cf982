"""The command line's contract: every bad input exits 2 with one line and writes nothing."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hessfine.analysis.cli import main
from safetensors.torch import save_file

from tests.oracles import TINY_LAYERS, perturbed_reference, tiny_cnn, tiny_data

SENTINEL = "pickle-code-ran"


class Payload:
    """Unpickling this runs code (creates a file): it must never happen without trust."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def state_of(module, params=None):
    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    state.update({k: v.detach().clone().contiguous() for k, v in (params or {}).items()})
    return state


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = tiny_cnn()
    params = dict(module.named_parameters())
    save_file(state_of(module), str(tmp_path / "ft.safetensors"))
    save_file(
        state_of(module, perturbed_reference(params, TINY_LAYERS["cnn"])),
        str(tmp_path / "ref.safetensors"),
    )
    x, y = tiny_data("cnn", 6)
    torch.save({"x": x, "y": y}, tmp_path / "train.pt")
    (tmp_path / "factories.py").write_text(
        "from tests.oracles import tiny_cnn\n"
        "def broken():\n    raise RuntimeError('factory exploded')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def argv(tmp, **override):
    base = {
        "checkpoint": str(tmp / "ft.safetensors"),
        "--reference": str(tmp / "ref.safetensors"),
        "--model": "tests.oracles:tiny_cnn",
        "--data": str(tmp / "train.pt"),
        "--out": str(tmp / "out"),
    }
    base.update(override)
    args = ["measure", base.pop("checkpoint")]
    for key, value in base.items():
        if value is None:
            continue
        args += [key, *value] if isinstance(value, list) else [key, value]
    return [*args, "--quiet", "--samples", "4"]


def run_bad(capsys, tmp, args, *expected):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [
        line for line in err.splitlines() if "Warning" not in line and "warnings.warn" not in line
    ]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    assert not (tmp / "out" / "measurement.json").exists()
    return lines[0]


def test_good_input_works(files, capsys):
    assert main(argv(files)) == 0
    assert (files / "out" / "measurement.json").exists()


def test_missing_path(files, capsys):
    run_bad(
        capsys, files, argv(files, checkpoint=str(files / "nope.safetensors")), "nope.safetensors"
    )


def test_corrupt_file(files, capsys):
    (files / "bad.pt").write_bytes(b"this is not a checkpoint")
    run_bad(capsys, files, argv(files, checkpoint=str(files / "bad.pt")), "bad.pt")


def test_truncated_safetensors(files, capsys):
    data = (files / "ft.safetensors").read_bytes()
    (files / "cut.safetensors").write_bytes(data[: len(data) // 2])
    run_bad(
        capsys, files, argv(files, checkpoint=str(files / "cut.safetensors")), "cut.safetensors"
    )


def test_pickled_objects_refused_and_never_run(files, capsys):
    target = files / SENTINEL
    torch.save(
        {"state_dict": {"x": torch.zeros(1)}, "extra": Payload(str(target))}, files / "evil.pt"
    )
    run_bad(capsys, files, argv(files, checkpoint=str(files / "evil.pt")), "--trust-checkpoint")
    assert not target.exists()


def test_non_head_shape_mismatch(files, capsys):
    state = state_of(tiny_cnn())
    state["conv1.weight"] = torch.zeros(3, 1, 5, 5, dtype=torch.float64)
    save_file(state, str(files / "wrong.safetensors"))
    run_bad(capsys, files, argv(files, checkpoint=str(files / "wrong.safetensors")), "conv1.weight")


def test_missing_layer(files, capsys):
    state = state_of(tiny_cnn())
    del state["block.conv.weight"]
    save_file(state, str(files / "missing.safetensors"))
    run_bad(
        capsys,
        files,
        argv(files, checkpoint=str(files / "missing.safetensors")),
        "block.conv.weight",
    )


def test_nan_weights_name_the_layer(files, capsys):
    state = state_of(tiny_cnn())
    state["head.weight"][0, 0] = float("nan")
    save_file(state, str(files / "nan.safetensors"))
    run_bad(capsys, files, argv(files, checkpoint=str(files / "nan.safetensors")), "head.weight")


def test_labels_outside_model_classes(files, capsys):
    x, _ = tiny_data("cnn", 6)
    torch.save({"x": x, "y": torch.tensor([0, 1, 2, 3, 4, 5])}, files / "labels.pt")
    run_bad(capsys, files, argv(files, **{"--data": str(files / "labels.pt")}), "labels")


def test_empty_data(files, capsys):
    torch.save(
        {"x": torch.zeros(0, 1, 6, 6), "y": torch.zeros(0, dtype=torch.long)}, files / "empty.pt"
    )
    run_bad(capsys, files, argv(files, **{"--data": str(files / "empty.pt")}), "empty.pt")


def test_length_mismatch(files, capsys):
    torch.save(
        {"x": torch.zeros(5, 1, 6, 6), "y": torch.zeros(4, dtype=torch.long)}, files / "mismatch.pt"
    )
    run_bad(capsys, files, argv(files, **{"--data": str(files / "mismatch.pt")}), "mismatch.pt")


def test_input_shape_rejected(files, capsys):
    torch.save(
        {"x": torch.zeros(4, 2, 6, 6), "y": torch.zeros(4, dtype=torch.long)}, files / "shape.pt"
    )
    run_bad(capsys, files, argv(files, **{"--data": str(files / "shape.pt")}), "rejects inputs")


def test_empty_directory(files, capsys):
    (files / "emptydir").mkdir()
    run_bad(capsys, files, argv(files, checkpoint=str(files / "emptydir")), "emptydir")


def test_unknown_model_name(files, capsys):
    run_bad(
        capsys,
        files,
        argv(files, **{"--model": "torchvision:resnet_does_not_exist"}),
        "resnet_does_not_exist",
    )


def test_factory_that_raises(files, capsys):
    run_bad(capsys, files, argv(files, **{"--model": "factories:broken"}), "factory exploded")


def test_unknown_option_value(files, capsys):
    run_bad(capsys, files, argv(files, **{"--estimator": "magic"}), "--estimator")


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ("banana", "is not a memory size"),
        ("0", "is not a memory size"),
        ("6GB2", "is not a memory size"),
        ("1KiB", "the model and data take once loaded; raise --max-memory"),
    ],
)
def test_a_bad_memory_budget_is_one_line(files, capsys, budget, expected):
    run_bad(capsys, files, [*argv(files), "--max-memory", budget], "--max-memory", expected)


@pytest.mark.parametrize("samples", ["0", "-3", "many"])
def test_samples_must_be_positive(files, capsys, samples):
    args = argv(files)
    args[args.index("--samples") + 1] = samples
    run_bad(capsys, files, args, "--samples")


def test_malformed_model_kwargs(files, capsys):
    run_bad(capsys, files, argv(files, **{"--model-kwargs": "{num_classes: 3"}), "--model-kwargs")


def test_nondeterministic_model_is_refused(files, capsys):
    (files / "noisy.py").write_text(
        "import torch\nfrom tests.oracles import tiny_cnn\n"
        "class Noisy(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.net = tiny_cnn()\n"
        "    def forward(self, x):\n        return self.net(x) + torch.rand(1, dtype=x.dtype)\n"
        "def build():\n    return Noisy()\n"
    )
    state = {f"net.{k}": v for k, v in state_of(tiny_cnn()).items()}
    save_file(state, str(files / "noisy.safetensors"))
    save_file(state, str(files / "noisy_ref.safetensors"))
    args = argv(
        files,
        checkpoint=str(files / "noisy.safetensors"),
        **{"--model": "noisy:build", "--reference": str(files / "noisy_ref.safetensors")},
    )
    run_bad(capsys, files, args, "not deterministic")


def test_debug_shows_traceback(files, capsys):
    assert main([*argv(files, checkpoint=str(files / "nope.pt")), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_console_script_exit_status(files):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from hessfine.analysis.cli import main; sys.exit(main())",
            *argv(files, checkpoint=str(files / "nope.pt")),
        ],
        capture_output=True,
        text=True,
        cwd=files,
    )
    assert proc.returncode == 2
    assert "nope.pt" in proc.stderr.strip().splitlines()[-1]


def test_every_subcommand_has_help_with_examples(capsys):
    for command in ("measure", "finetune", "compare", "figures", "demo", "crosscheck"):
        with pytest.raises(SystemExit) as stop:
            from hessfine.analysis.cli import build_parser

            build_parser().parse_args([command, "--help"])
        assert stop.value.code == 0
        assert "example" in capsys.readouterr().out.lower(), command


def test_measurement_written_atomically(files, capsys):
    assert main(argv(files)) == 0
    leftovers = [p.name for p in (files / "out").iterdir() if p.name != "measurement.json"]
    assert leftovers == []
    json.loads((files / "out" / "measurement.json").read_text())


def test_threads_option(files, capsys):
    import torch

    run_bad(capsys, files, [*argv(files), "--threads", "0"], "--threads")
    before = torch.get_num_threads()
    try:
        assert main([*argv(files), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_every_subcommand_takes_quiet():
    from hessfine.analysis.cli import build_parser

    parser = build_parser()
    needs = {
        "measure": ["ft.pt", "--out", "o"],
        "finetune": ["--model", "m", "--reference", "r", "--data", "d", "--out", "o"],
        "compare": ["m", "--out", "o"],
        "figures": ["m", "--out", "o"],
        "demo": [],
        "crosscheck": [],
    }
    needs["finetune"] += ["--method", "plain"]
    for command, required in needs.items():
        assert parser.parse_args([command, *required, "--quiet"]).quiet is True, command


def test_repeated_list_options_add_up():
    from hessfine.analysis.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(
        ["measure", "ft.pt", "--out", "o", "--layers", "a", "--layers", "b", "c"]
        + [
            "--noise-sigma",
            "1e-3",
            "--noise-sigma",
            "1e-2",
            "--input-columns",
            "x",
            "--input-columns",
            "y",
        ]
    )
    assert args.layers == ["a", "b", "c"]
    assert args.noise_sigma == [1e-3, 1e-2] and args.input_columns == ["x", "y"]
    compare = parser.parse_args(
        ["compare", "m", "--out", "o", "--format", "png", "--format", "svg"]
    )
    assert compare.formats == ["png", "svg"]
    assert parser.parse_args(["compare", "m", "--out", "o"]).formats is None  # png pdf
    check = parser.parse_args(["crosscheck", "--layers", "a", "--layers", "b"])
    assert check.layers == ["a", "b"]


def test_quiet_compare_prints_nothing(files, capsys):
    assert main(argv(files)) == 0
    capsys.readouterr()
    assert main(["compare", str(files / "out"), "--out", str(files / "cmp"), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert (files / "cmp" / "comparison.csv").is_file()
    assert main(["compare", str(files / "out"), "--out", str(files / "cmp2"), "--no-figures"]) == 0
    assert "measurements" in capsys.readouterr().out


def test_no_exception_text_at_interpreter_exit(tmp_path):
    """A script using the Python API (estimators and measure) exits with a clean stderr."""
    script = tmp_path / "script.py"
    script.write_text(
        "import torch, warnings\n"
        "warnings.filterwarnings('ignore')\n"
        "from hessfine.bounds.functional import FunctionalModel\n"
        "from hessfine.bounds.estimators.quadratic_forms import quadratic_forms\n"
        "from hessfine.bounds.estimators.traces import layer_traces\n"
        "from hessfine.bounds.estimators.spectra import top_eigenvalues\n"
        "from tests.oracles import tiny_attention, tiny_data\n"
        "net = tiny_attention()\n"
        "fm, params = FunctionalModel.from_module(net)\n"
        "names = ['attn.in_proj_weight', 'head.weight']\n"
        "v = {n: 0.1 * torch.randn_like(params[n]) for n in names}\n"
        "batches = [tiny_data('attention', 8)]\n"
        "quadratic_forms(fm, params, v, batches)\n"
        "layer_traces(fm, params, names, batches, probes=4)\n"
        "top_eigenvalues(fm, params, names, batches, k=1)\n"
        "print('done')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "done"
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
