"""Tests for hessfine.analysis.data: digits splits, tensor files, ImageFolder, batching and every error."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hessfine.analysis.data import IMAGENET_MEAN, IMAGENET_STD, LabeledData, check_labels, load_data
from hessfine.analysis.errors import InputError
from PIL import Image
from sklearn.datasets import load_digits


def _assert_one_line(err: pytest.ExceptionInfo[InputError], *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def _rows(data: LabeledData) -> Counter:
    assert isinstance(data.x, torch.Tensor)
    return Counter((x.numpy().tobytes(), int(y)) for x, y in zip(data.x, data.y, strict=True))


# --- digits ----------------------------------------------------------------------------------


def test_digits_splits() -> None:
    train, test, full = (load_data(f"digits:{s}") for s in ("train", "test", "all"))
    assert (len(train), len(test), len(full)) == (1297, 500, 1797)
    bunch = load_digits()
    for data in (train, test, full):
        assert isinstance(data.x, torch.Tensor)
        assert data.x.dtype == torch.float32 and data.y.dtype == torch.int64
        assert data.x.shape == (len(data), 1, 8, 8)
        assert float(data.x.min()) == 0.0 and float(data.x.max()) == 1.0
        assert data.num_classes == 10 and data.dataset is None
    assert torch.equal(full.x.reshape(-1, 64) * 16, torch.from_numpy(bunch.data).float())
    assert torch.equal(full.y, torch.from_numpy(bunch.target))
    assert _rows(train) + _rows(test) == _rows(full)
    overall = Counter(bunch.target.tolist())
    in_test = Counter(test.y.tolist())
    for label, count in overall.items():
        assert abs(in_test[label] - 500 * count / 1797) <= 1
    again = load_data("digits:test")
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)


def test_digits_split_keeps_file_order() -> None:
    full, test = load_data("digits:all"), load_data("digits:test")
    flat = full.x.reshape(len(full), -1)
    positions = [
        int(torch.nonzero((flat == row.reshape(1, -1)).all(dim=1))[0]) for row in test.x[:40]
    ]
    assert positions == sorted(positions)


def test_batches() -> None:
    data = load_data("digits:train")
    sizes, xs, ys = [], [], []
    for x, y in data.batches(64, limit=100, dtype=torch.float64):
        sizes.append(len(y))
        xs.append(x)
        ys.append(y)
        assert x.dtype == torch.float64 and y.dtype == torch.int64
    assert sizes == [64, 36]
    assert torch.equal(torch.cat(xs), data.x[:100].double())
    assert torch.equal(torch.cat(ys), data.y[:100])
    assert sum(len(y) for _, y in data.batches(500, limit=10_000)) == 1297
    assert sum(len(y) for _, y in data.batches(1000)) == 1297
    with pytest.raises(InputError) as err:
        data.batches(0)
    _assert_one_line(err, "--batch-size")
    with pytest.raises(InputError) as err:
        data.batches(8, limit=0)
    _assert_one_line(err, "--samples")


def test_check_labels() -> None:
    data = load_data("digits:test")
    check_labels(data, 10, option="--data")
    with pytest.raises(InputError) as err:
        check_labels(data, 5, option="--eval-data")
    _assert_one_line(err, "--eval-data", "digits:test", "0..9", "5 outputs")


# --- tensor files ----------------------------------------------------------------------------


def test_pt_tensor_and_dict_inputs(tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=generator)
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    torch.save({"x": x, "y": y}, tmp_path / "plain.pt")
    data = load_data(str(tmp_path / "plain.pt"))
    assert torch.equal(data.x, x) and torch.equal(data.y, y)
    assert len(data) == 7 and data.num_classes == 3

    text = {
        "input_ids": torch.randint(0, 50, (7, 5), generator=generator),
        "attention_mask": torch.ones(7, 5, dtype=torch.int64),
    }
    torch.save({"x": text, "y": y.double()}, tmp_path / "text.pt")
    data = load_data(str(tmp_path / "text.pt"))
    assert data.y.dtype == torch.int64 and torch.equal(data.y, y)
    batches = list(data.batches(4, dtype=torch.float64))
    assert [len(b[1]) for b in batches] == [4, 3]
    first = batches[0][0]
    assert isinstance(first, dict) and first.keys() == text.keys()
    assert first["input_ids"].dtype == torch.int64
    assert torch.equal(first["input_ids"], text["input_ids"][:4])

    torch.save({"x": x, "y": y, "meta": argparse.Namespace(a=1)}, tmp_path / "pickled.pt")
    with pytest.raises(InputError) as err:
        load_data(str(tmp_path / "pickled.pt"))
    _assert_one_line(err, "pickled", "--trust-checkpoint")
    assert len(load_data(str(tmp_path / "pickled.pt"), trust=True)) == 7


def test_npz(tmp_path) -> None:
    x = np.arange(24, dtype=np.float64).reshape(6, 4)
    y = np.array([1, 0, 1, 0, 2, 2], dtype=np.int32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_data(str(tmp_path / "d.npz"))
    assert torch.equal(data.x, torch.from_numpy(x))
    assert data.y.dtype == torch.int64 and data.y.tolist() == y.tolist()
    (x1, y1), (x2, y2) = data.batches(3, dtype=torch.float32)
    assert x1.dtype == torch.float32 and torch.equal(torch.cat([x1, x2]).double(), data.x)


# --- ImageFolder -----------------------------------------------------------------------------


def _image_folder(root: Path, colors: dict[str, list[tuple[int, int, int]]]) -> Path:
    for name, palette in colors.items():
        (root / name).mkdir(parents=True)
        for i, color in enumerate(palette):
            Image.new("RGB", (12 + i, 10), color).save(root / name / f"img{i}.png")
    return root


def test_image_folder(tmp_path) -> None:
    colors = {
        "cat": [(255, 0, 0), (0, 255, 0), (0, 0, 255)],
        "dog": [(10, 20, 30), (200, 100, 50), (0, 0, 0)],
    }
    root = _image_folder(tmp_path / "images", colors)
    data = load_data(str(root), image_size=8, resize=9)
    assert data.x is None and data.dataset is not None
    assert data.y.tolist() == [0, 0, 0, 1, 1, 1] and data.num_classes == 2
    batches = list(data.batches(4))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 8, 8), (2, 3, 8, 8)]
    images = torch.cat([x for x, _ in batches])
    palette = [c for name in ("cat", "dog") for c in colors[name]]
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    for image, color in zip(images, palette, strict=True):
        expected = (torch.tensor(color) / 255 - mean) / std
        assert torch.allclose(image, expected[:, None, None].expand(3, 8, 8), atol=1e-5)
    assert torch.equal(torch.cat([y for _, y in batches]), data.y)
    assert [len(y) for _, y in data.batches(2, limit=3)] == [2, 1]


def test_image_folder_errors(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as err:
        load_data(str(tmp_path / "empty"))
    _assert_one_line(err, "ImageFolder", "CLASS")
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    (tmp_path / "no_images" / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(InputError) as err:
        load_data(str(tmp_path / "no_images"))
    _assert_one_line(err, "ImageFolder")
    root = _image_folder(tmp_path / "broken", {"a": [(1, 2, 3)]})
    (root / "a" / "zz_bad.png").write_bytes(b"not a png")
    data = load_data(str(root), image_size=4, resize=4)
    with pytest.raises(InputError) as err:
        list(data.batches(2))
    _assert_one_line(err, "zz_bad.png", "unreadable")


# --- errors ----------------------------------------------------------------------------------


def _save_pt(path: Path, content: object) -> str:
    torch.save(content, path)
    return str(path)


def test_data_errors(tmp_path) -> None:
    x = torch.zeros(4, 2)
    y = torch.tensor([0, 1, 0, 1])
    cases = {
        "no such file": (str(tmp_path / "absent.pt"), ["absent.pt", "digits:train"]),
        "split": ("digits:valid", ["'valid'", "digits:test"]),
        "suffix": (str(tmp_path / "data.csv"), ["unsupported", ".csv"]),
        "empty": (_save_pt(tmp_path / "e.pt", {"x": x[:0], "y": y[:0]}), ["empty"]),
        "length": (_save_pt(tmp_path / "l.pt", {"x": x[:3], "y": y}), ["3 examples", "4"]),
        "dict length": (
            _save_pt(tmp_path / "dl.pt", {"x": {"ids": x, "mask": x[:2]}, "y": y}),
            ["2 examples"],
        ),
        "float labels": (_save_pt(tmp_path / "f.pt", {"x": x, "y": y + 0.5}), ["integer"]),
        "bool labels": (_save_pt(tmp_path / "b.pt", {"x": x, "y": y.bool()}), ["integer"]),
        "2-D labels": (_save_pt(tmp_path / "t.pt", {"x": x, "y": y[:, None]}), ["1-D", "(4, 1)"]),
        "negative": (_save_pt(tmp_path / "n.pt", {"x": x, "y": y - 1}), ["-1"]),
        "not a dict": (_save_pt(tmp_path / "nd.pt", [x, y]), ["'x' and 'y'"]),
        "no y": (_save_pt(tmp_path / "ny.pt", {"x": x}), ["'x' and 'y'"]),
        "x not tensor": (_save_pt(tmp_path / "xl.pt", {"x": [1, 2, 3, 4], "y": y}), ["list"]),
        "empty dict x": (_save_pt(tmp_path / "ed.pt", {"x": {}, "y": y}), ["empty dict"]),
    }
    (tmp_path / "data.csv").write_text("1,2\n")
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02garbage" * 5)
    cases["corrupt pt"] = (str(tmp_path / "corrupt.pt"), ["corrupt"])
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 broken zip")
    cases["corrupt npz"] = (str(tmp_path / "corrupt.npz"), ["corrupt"])
    np.savez(tmp_path / "keys.npz", inputs=np.zeros((2, 2)), labels=np.zeros(2))
    cases["npz keys"] = (str(tmp_path / "keys.npz"), ["inputs, labels"])
    np.savez(tmp_path / "strings.npz", x=np.array(["a", "b"]), y=np.array([0, 1]))
    cases["npz strings"] = (str(tmp_path / "strings.npz"), ["numeric"])
    np.savez(tmp_path / "mismatch.npz", x=np.zeros((3, 2)), y=np.array([0, 1]))
    cases["npz length"] = (str(tmp_path / "mismatch.npz"), ["3 examples", "2"])
    for case, (spec, needles) in cases.items():
        with pytest.raises(InputError) as err:
            load_data(spec, label="--eval-data")
        assert "--eval-data" in str(err.value), case
        _assert_one_line(err, *needles)
