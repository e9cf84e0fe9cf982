"""Sharded checkpoints of distributed training (docs/inputs.md, "Sharded checkpoints"), measured
through the command line: each equals the measurement of the same weights as a plain state dict.

DCP directories are written with the real ``torch.distributed.checkpoint.save`` on the CPU: in one
process, and in two gloo processes that save DTensors sharded by rows. FSDP and DeepSpeed saves
need a distributed, wrapped model (and DeepSpeed is not installed), so for them the tests write
the exact layout their source writes, as each test's docstring says.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hessfine.analysis.checkpoints import (
    checkpoint_digest,
    find_checkpoints,
    is_run_collection,
    load_checkpoint,
    materialize,
)
from hessfine.analysis.cli import main
from hessfine.analysis.sources.dcp import read_metadata
from safetensors.torch import load_file, save_file
from torch import nn

from tests.oracles import TINY_LAYERS, perturbed_reference, tiny_cnn, tiny_data
from tests.test_distributed import assert_same, run_two_processes

SAME = ("layers", "loss", "accuracy", "generalization_gap", "bounds")


def _cli(*args: object) -> int:
    return main([str(a) for a in args])


def _measure(root: Path, checkpoint: Path, out: Path, *extra: object) -> None:
    """``hessfine measure`` of the tiny CNN against ``root``'s reference and data, in float64."""
    code = _cli("measure", checkpoint, "--reference", root / "ref.safetensors",
                "--model", "tests.oracles:tiny_cnn", "--data", root / "train.pt", "--out", out,
                "--dtype", "float64", "--samples", 4, "--batch-size", 5, "--quiet", *extra)  # fmt: skip
    assert code == 0


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _assert_same_values(expected: dict, found: dict) -> None:
    for key in SAME:
        assert_same(expected[key], found[key], key)


def _fails(capsys, *args: object) -> str:
    """The one line that a failing ``hessfine`` command writes, after it exits 2."""
    assert _cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CNN's state rounded to float32 as ``ft.safetensors`` (the fine-tuned weights), a
    perturbed float64 reference, training data, and the plain file's measurement in ``m/plain``."""
    root = tmp_path_factory.mktemp("cnn")
    module = tiny_cnn()
    state = {k: v.float() if v.is_floating_point() else v for k, v in module.state_dict().items()}
    save_file(state, str(root / "ft.safetensors"))
    params = dict(module.named_parameters())
    reference = {**module.state_dict(), **perturbed_reference(params, TINY_LAYERS["cnn"])}
    save_file(
        {k: v.detach().contiguous() for k, v in reference.items()}, str(root / "ref.safetensors")
    )
    x, y = tiny_data("cnn", 10)
    torch.save({"x": x, "y": y}, root / "train.pt")
    _measure(root, root / "ft.safetensors", root / "m" / "plain")
    return root


def _plain(root: Path) -> dict:
    return _read(root / "m" / "plain" / "measurement.json")


def _optimizer_state(state: dict) -> dict:
    """An SGD-with-momentum ``state_dict()`` for ``state``'s tensors (tensors hessfine must skip)."""
    buffers = {i: {"momentum_buffer": torch.ones_like(v)} for i, v in enumerate(state.values())}
    return {"state": buffers, "param_groups": [{"lr": 0.1, "params": list(buffers)}]}


# --- DCP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["bare", "model"])
def test_dcp_directory_measures_as_the_state_dict(cnn, tmp_path, layout) -> None:
    """``dcp.save`` of the float32 state dict bare, or under ``"model"`` beside an optimizer's
    state as accelerate and the FSDP examples write it, measured in float64."""
    state = load_file(str(cnn / "ft.safetensors"))
    saved = state if layout == "bare" else {"model": state, "optimizer": _optimizer_state(state)}
    dcp.save(saved, checkpoint_id=tmp_path / "step-7", no_dist=True)
    _measure(cnn, tmp_path / "step-7", tmp_path / "m")
    found = _read(tmp_path / "m" / "measurement.json")
    _assert_same_values(_plain(cnn), found)
    assert found["checkpoint"] == str(tmp_path / "step-7") and found["training"] is None
    assert found["provenance"]["checkpoint_sha256"] == checkpoint_digest(tmp_path / "step-7")


def test_dcp_of_a_compiled_and_checkpoint_wrapped_model(cnn, tmp_path) -> None:
    """Keys as a compiled model inside FSDP's wrappers writes them (``_orig_mod.``,
    ``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.`` in the key: the layout of
    ``torch.compile`` and ``torch.distributed.fsdp`` state dicts) are matched without them."""
    state = load_file(str(cnn / "ft.safetensors"))
    wrapped = {
        f"_orig_mod._fsdp_wrapped_module.{k.replace('.', '._checkpoint_wrapped_module.', 1)}": v
        for k, v in state.items()
    }
    dcp.save({"model": wrapped}, checkpoint_id=tmp_path / "step-3", no_dist=True)
    _measure(cnn, tmp_path / "step-3", tmp_path / "m")
    _assert_same_values(_plain(cnn), _read(tmp_path / "m" / "measurement.json"))


def test_only_the_models_tensors_are_read_once_in_its_dtype(cnn, tmp_path, monkeypatch) -> None:
    state = load_file(str(cnn / "ft.safetensors"))
    dcp.save({"model": state, "optimizer": _optimizer_state(state)}, checkpoint_id=tmp_path)
    requested: list[str] = []
    load = dcp.load

    def recording(state_dict, **kwargs):
        requested.extend(state_dict)
        return load(state_dict, **kwargs)

    monkeypatch.setattr(dcp, "load", recording)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.pending is not None and checkpoint.state == {}
    model = tiny_cnn()  # float64
    loaded = materialize(checkpoint, model, strict=True).state
    assert sorted(requested) == sorted(f"model.{k}" for k in model.state_dict())
    for name, tensor in model.state_dict().items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], state[name].to(tensor.dtype)), name


def test_trainer_fsdp_checkpoint(tiny_bert, tmp_path) -> None:
    """A Trainer's ``checkpoint-N/`` under FSDP's sharded state dict, as accelerate's
    ``fsdp_utils.save_fsdp_model`` and ``save_fsdp_optimizer`` write it: ``dist_cp.save(
    state_dict={"model": state_dict}, storage_writer=dist_cp.FileSystemWriter(
    checkpoint-N/pytorch_model_fsdp_0), planner=DefaultSavePlanner())`` with in-memory names,
    ``{"optimizer": ...}`` under ``optimizer_0/``, beside ``trainer_state.json``, the RNG state and
    no ``config.json``: the model comes from the reference's config."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    model, base, _ = tiny_bert
    tuned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    tuned.save_pretrained(tmp_path / "plain")
    checkpoint = tmp_path / "out" / "checkpoint-4"
    for name, key, state in [
        ("pytorch_model_fsdp_0", "model", tuned.state_dict()),
        ("optimizer_0", "optimizer", _optimizer_state(tuned.state_dict())),
    ]:
        dcp.save(
            state_dict={key: state},
            storage_writer=dcp.FileSystemWriter(checkpoint / name),
            planner=DefaultSavePlanner(),
        )
    state = {"global_step": 4, "epoch": 2.0, "log_history": [{"loss": 0.5, "step": 4}]}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    torch.save({"python": [1, 2]}, checkpoint / "rng_state.pth")
    ids = torch.randint(1, 50, (6, 8), generator=generator)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    torch.save({"x": x, "y": torch.arange(6) % 3}, tmp_path / "tokens.pt")
    common = ("--reference", base, "--data", tmp_path / "tokens.pt", "--estimator", "block",
              "--samples", 4, "--dtype", "float64", "--quiet")  # fmt: skip
    assert _cli("measure", tmp_path / "out", "--out", tmp_path / "m", *common) == 0
    assert _cli("measure", tmp_path / "plain", "--out", tmp_path / "mp", *common) == 0
    found = _read(tmp_path / "m" / "checkpoint-4" / "measurement.json")
    _assert_same_values(_read(tmp_path / "mp" / "measurement.json"), found)
    assert (found["model"], found["step"], found["epoch"]) == ("hf", 4, 2.0)
    assert found["training"]["logged"] == {"loss": 0.5, "loss_step": 4}
    assert found["checkpoint"] == str(checkpoint / "pytorch_model_fsdp_0")


def _save_row_shards(argv: list[str]) -> int:
    """One rank's part of ``dcp.save({"model": ...})`` of the state in ``argv[0]`` as DTensors
    sharded by rows over a 2-process CPU mesh (scalars replicated), into ``argv[1]``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (2,))
        state = {
            name: distribute_tensor(tensor, mesh, [Shard(0) if tensor.dim() else Replicate()])
            for name, tensor in load_file(argv[0]).items()
        }
        dcp.save({"model": state}, checkpoint_id=argv[1])
    finally:
        dist.destroy_process_group()
    return 0


def test_dtensors_sharded_over_two_processes(cnn, tmp_path) -> None:
    run_two_processes([str(cnn / "ft.safetensors"), str(tmp_path / "dcp")], _save_row_shards)
    metadata = read_metadata(tmp_path / "dcp", trust=False, label="checkpoint")
    files = {
        i.relative_path for k, i in metadata.storage_data.items() if k.fqn == "model.head.weight"
    }
    assert files == {"__0_0.distcp", "__1_0.distcp"}  # the rows of one tensor, in two shards
    _measure(cnn, tmp_path / "dcp", tmp_path / "m")
    _assert_same_values(_plain(cnn), _read(tmp_path / "m" / "measurement.json"))


# --- Lightning FSDP ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lightning_sharded(cnn, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lightning run whose checkpoints are saved as ``FSDPStrategy(state_dict_type="sharded")``
    saves them (lightning 2.6, ``pytorch/strategies/fsdp.py``, ``save_checkpoint``): the path
    becomes a directory; ``{"model": state_dict, "optimizer_<i>": ...}`` goes through
    ``fabric.strategies.fsdp._distributed_checkpoint_save`` (``dcp.save``) and the rest of the dict
    through ``torch.save`` to ``meta.pt``. The training itself is a plain CPU run of the real
    ``Trainer`` with ``ModelCheckpoint``; ``final.safetensors`` holds its last weights."""
    import lightning as L
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
    from lightning.fabric.utilities.load import _METADATA_FILENAME
    from lightning.pytorch.plugins import CheckpointIO

    class ShardedIO(CheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            path = Path(path)
            if path.is_file():
                path.unlink()
            path.mkdir(parents=True, exist_ok=True)
            converted_state = {"model": checkpoint.pop("state_dict")}
            converted_state.update(
                {
                    f"optimizer_{idx}": optim_state
                    for idx, optim_state in enumerate(checkpoint.pop("optimizer_states", []))
                }
            )
            _distributed_checkpoint_save(converted_state, path)
            torch.save(checkpoint, path / _METADATA_FILENAME)

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            raise NotImplementedError

        def remove_checkpoint(self, path):
            raise NotImplementedError

    class Module(L.LightningModule):
        def __init__(self, lr: float = 0.05):
            super().__init__()
            self.save_hyperparameters()
            self.net = tiny_cnn()

        def training_step(self, batch, index):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    root = tmp_path_factory.mktemp("lightning")
    data = torch.load(cnn / "train.pt")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data["x"], data["y"]), batch_size=5
    )
    module = Module()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        precision="64-true",
        plugins=[ShardedIO()],
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(save_top_k=-1, save_last=True)],
        logger=L.pytorch.loggers.CSVLogger(str(root), name="lightning_logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    final = {k: v.detach().contiguous() for k, v in module.net.state_dict().items()}
    save_file(final, str(root / "final.safetensors"))
    return root


def test_lightning_sharded_run(cnn, lightning_sharded) -> None:
    root = lightning_sharded
    saved = sorted(p.name for p in (root / "lightning_logs").rglob("*.ckpt"))
    assert saved == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "last.ckpt"]
    assert all(p.is_dir() for p in (root / "lightning_logs").rglob("*.ckpt"))
    _measure(cnn, root / "lightning_logs", root / "m")
    found = sorted((root / "m").rglob("measurement.json"))
    assert [p.parent.name for p in found] == ["epoch=0-step=2", "epoch=1-step=4"]  # last: a repeat
    records = [_read(path) for path in found]
    assert [(m["epoch"], m["step"]) for m in records] == [(0, 2), (1, 4)]
    assert records[0]["training"]["hyper_parameters"] == {"lr": 0.05}
    _measure(cnn, root / "final.safetensors", root / "plain")
    _assert_same_values(_read(root / "plain" / "measurement.json"), records[1])


def test_lightning_meta_file_is_not_a_weights_file(cnn, lightning_sharded, capsys) -> None:
    meta = next((lightning_sharded / "lightning_logs").rglob("meta.pt"))
    err = _fails(capsys, "measure", meta, "--reference", cnn / "ref.safetensors",
                 "--model", "tests.oracles:tiny_cnn", "--data", cnn / "train.pt",
                 "--out", lightning_sharded / "bad")  # fmt: skip
    assert "part of the sharded checkpoint" in err and str(meta.parent) in err


# --- DeepSpeed ZeRO ----------------------------------------------------------------------------


def _zero_checkpoint(directory: Path, state: dict, *, step: int, stage: int, **client) -> Path:
    """What ``DeepSpeedEngine.save_checkpoint(directory)`` writes on 2 data-parallel processes
    (deepspeed/runtime/engine.py: ``save_checkpoint``, ``_get_ckpt_name``, ``_save_checkpoint``,
    ``_common_checkpoint_state``, ``_save_zero_checkpoint``, ``_copy_recovery_script``): ``latest``
    naming the tag ``global_stepN``; in it the model states, ``mp_rank_00_model_states.pt`` for
    stages 1–2, one ``zero_pp_rank_R_mp_rank_00_model_states.pt`` per process for stage 3, whose
    ``module`` holds empty placeholders; each process's ``bf16_zero_pp_rank_R_mp_rank_00_optim_
    states.pt``; ``zero_to_fp32.py`` beside the tag. ``state`` is the module's bf16 state dict."""
    tag = directory / f"global_step{step}"
    tag.mkdir(parents=True)
    (directory / "latest").write_text(tag.name)
    (directory / "zero_to_fp32.py").write_text("# DeepSpeed's recovery script\n")
    config = {
        "train_batch_size": 8,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage},
    }
    shapes = OrderedDict((k, v.shape) for k, v in state.items() if v.is_floating_point())
    module = state if stage < 3 else {k: torch.empty(0, dtype=v.dtype) for k, v in state.items()}
    model_states = {
        "module": module,
        "buffer_names": [k for k in state if "running" in k or "num_batches" in k],
        "optimizer": None,
        "param_shapes": [shapes],
        "frozen_param_shapes": OrderedDict(),
        "shared_params": {},
        "frozen_param_fragments": OrderedDict(),
        "lr_scheduler": {"last_batch_iteration": step - 1},
        "data_sampler": None,
        "random_ltd": None,
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": step,
        "global_samples": 8 * step,
        "dp_world_size": 2,
        "mp_world_size": 1,
        "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
        "ds_config": config,
        "ds_version": "0.18.0",
        **client,
    }
    writers = ["mp_rank_00"] if stage < 3 else [f"zero_pp_rank_{r}_mp_rank_00" for r in range(2)]
    for name in writers:
        torch.save(model_states, tag / f"{name}_model_states.pt")
    flat = torch.cat([v.flatten().float() for v in state.values() if v.is_floating_point()])
    for rank, partition in enumerate(flat.chunk(2)):
        optimizer = {"zero_stage": stage, "single_partition_of_fp32_groups": [partition]}
        torch.save({"optimizer_state_dict": optimizer, "ds_config": config, "ds_version": "0.18.0"},
                   tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")  # fmt: skip
    return directory


def _bf16(root: Path) -> dict:
    state = load_file(str(root / "ft.safetensors"))
    return {k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()}


def test_zero_stage_2_checkpoint(cnn, tmp_path) -> None:
    state = _bf16(cnn)
    save_file(state, str(tmp_path / "bf16.safetensors"))
    _measure(cnn, tmp_path / "bf16.safetensors", tmp_path / "plain")
    plain = _read(tmp_path / "plain" / "measurement.json")

    trainer = _zero_checkpoint(tmp_path / "out" / "checkpoint-6", state, step=6, stage=2)
    (trainer / "trainer_state.json").write_text(json.dumps({"global_step": 6, "epoch": 3.0}))
    engine = _zero_checkpoint(tmp_path / "engine", state, step=9, stage=1)
    _measure(cnn, tmp_path / "out", tmp_path / "m")
    _measure(cnn, engine, tmp_path / "e")
    for found, record in [
        (tmp_path / "m" / "checkpoint-6", {"step": 6, "epoch": 3.0}),
        (tmp_path / "e", {"step": 9, "epoch": None}),
    ]:
        measured = _read(found / "measurement.json")
        _assert_same_values(plain, measured)
        assert {k: measured["training"][k] for k in record} == record
    assert measured["checkpoint"] == str(engine / "global_step9" / "mp_rank_00_model_states.pt")
    assert measured["training"]["tool"] == "deepspeed"

    save_file(state, str(trainer / "model.safetensors"))  # the Trainer also saved the model
    assert load_checkpoint(trainer).path == trainer / "model.safetensors"


def test_zero_stage_3_is_refused_naming_the_consolidation(cnn, tmp_path, capsys) -> None:
    directory = _zero_checkpoint(tmp_path / "checkpoint-2", _bf16(cnn), step=2, stage=3)
    err = _fails(capsys, "measure", directory, "--reference", cnn / "ref.safetensors",
                 "--model", "tests.oracles:tiny_cnn", "--data", cnn / "train.pt",
                 "--out", tmp_path / "m")  # fmt: skip
    assert "stage-3" in err and f"python {directory / 'zero_to_fp32.py'} {directory} OUT" in err
    assert not (tmp_path / "m").exists()


class Settings:
    """A pickled object in DeepSpeed's client state: unpickling it could run code."""


def test_zero_pickled_objects_need_trust(cnn, tmp_path, capsys) -> None:
    directory = _zero_checkpoint(tmp_path / "ds", _bf16(cnn), step=1, stage=2, args=Settings())
    common = ("--reference", cnn / "ref.safetensors", "--model", "tests.oracles:tiny_cnn",
              "--data", cnn / "train.pt", "--samples", 2, "--quiet")  # fmt: skip
    err = _fails(capsys, "measure", directory, "--out", tmp_path / "m", *common)
    assert "Settings" in err and "--trust-checkpoint" in err
    assert _cli("measure", directory, "--out", tmp_path / "m", "--trust-checkpoint", *common) == 0


# --- directories of runs, bad input ------------------------------------------------------------


def test_sharded_directories_are_one_checkpoint_each(cnn, tmp_path) -> None:
    state = load_file(str(cnn / "ft.safetensors"))
    runs = tmp_path / "runs"
    dcp.save(state, checkpoint_id=runs / "a" / "step-1", no_dist=True)
    trainer = runs / "b" / "checkpoint-2"
    dcp.save({"model": state}, checkpoint_id=trainer / "pytorch_model_fsdp_0", no_dist=True)
    optimizer = {"optimizer": _optimizer_state(state)}
    dcp.save(optimizer, checkpoint_id=trainer / "optimizer_0", no_dist=True)
    _zero_checkpoint(runs / "c" / "checkpoint-3", _bf16(cnn), step=3, stage=2)
    expected = [runs / "a" / "step-1", trainer, runs / "c" / "checkpoint-3"]
    assert find_checkpoints(runs) == expected
    assert is_run_collection(runs)
    assert not any(is_run_collection(path) for path in expected)
    for path in expected:
        assert checkpoint_digest(path) == load_checkpoint(path).sha256


def test_bad_dcp_directories_are_one_line(cnn, tmp_path, capsys) -> None:
    state = load_file(str(cnn / "ft.safetensors"))
    common = ("--reference", cnn / "ref.safetensors", "--model", "tests.oracles:tiny_cnn",
              "--data", cnn / "train.pt", "--out", tmp_path / "m")  # fmt: skip

    def broken(name: str, saved: dict, **options) -> Path:
        writer = dcp.FileSystemWriter(tmp_path / name, single_file_per_rank=False)
        dcp.save(saved, storage_writer=writer, no_dist=True, **options)
        return tmp_path / name

    missing = broken("missing", {"model": state})
    shards = sorted(missing.glob("*.distcp"))
    shards[1].unlink()
    assert f"shard {shards[1].name} is missing" in _fails(capsys, "measure", missing, *common)

    truncated = broken("truncated", state)
    shard = sorted(truncated.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-8])
    assert "is truncated" in _fails(capsys, "measure", truncated, *common)

    corrupt = broken("corrupt", state)
    shard = sorted(corrupt.glob("*.distcp"))[0]
    shard.write_bytes(bytes(len(shard.read_bytes())))  # the same length, all zeros
    err = _fails(capsys, "measure", corrupt, *common)
    assert "cannot read the distributed checkpoint" in err  # DCP's CheckpointException

    other = broken("other", {"model": nn.Linear(5, 3).state_dict()})
    assert "saved from another model" in _fails(capsys, "measure", other, *common)
    wider = broken("wider", {**state, "head.weight": torch.zeros(4, 27)})
    err = _fails(capsys, "measure", wider, *common)
    assert "'head.weight' has shape (4, 27) but the model's is (3, 27)" in err

    headless = broken("headless", state)
    (headless / ".metadata").unlink()
    assert ".metadata is missing" in _fails(capsys, "measure", headless, *common)

    evil = broken("evil", state)
    marker = tmp_path / "ran"
    (evil / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    err = _fails(capsys, "measure", evil, *common)
    assert "pickled Python objects (posix.system)" in err and "--trust-checkpoint" in err
    assert not marker.exists()


class _Payload:
    """A pickle that would run a shell command when loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
