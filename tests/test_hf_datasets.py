"""Hugging Face ``datasets`` directories as data (hessfine.analysis.sources.hf_datasets)."""

from __future__ import annotations

import json

import pytest
import torch
from hessfine.analysis.cli import main
from hessfine.analysis.data import load_data
from hessfine.analysis.errors import InputError

ROWS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    from datasets import Dataset, DatasetDict

    root = tmp_path_factory.mktemp("datasets")
    ragged = Dataset.from_dict(
        {
            "input_ids": ROWS,
            "attention_mask": [[1] * len(r) for r in ROWS],
            "label": [0, 1, 2, 1],
            "features": [[0.5, 1.0], [1.5, 2.0], [2.5, 3.0], [3.5, 4.0]],
            "text": ["a", "b", "c", "d"],
        }
    )
    ragged.save_to_disk(root / "ragged")
    ragged.remove_columns("attention_mask").rename_column("label", "labels").save_to_disk(
        root / "no_mask"
    )
    DatasetDict({"train": ragged, "test": ragged.select([0, 1])}).save_to_disk(root / "dict")
    return root


def test_ragged_rows_are_right_padded_with_the_pad_token(saved) -> None:
    data = load_data(str(saved / "ragged"), pad_token_id=3)
    ids, mask = data.x["input_ids"], data.x["attention_mask"]
    assert ids.tolist() == [[5, 6, 7, 8], [9, 10, 3, 3], [11, 12, 13, 3], [14, 3, 3, 3]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]
    assert data.y.tolist() == [0, 1, 2, 1] and data.y.dtype == torch.int64


def test_a_missing_attention_mask_is_made_from_the_lengths(saved) -> None:
    data = load_data(str(saved / "no_mask"), pad_token_id=0)  # label column "labels"
    assert data.x["attention_mask"].sum(1).tolist() == [len(r) for r in ROWS]
    assert data.y.tolist() == [0, 1, 2, 1]


def test_columns_are_chosen_and_one_column_is_a_tensor(saved) -> None:
    data = load_data(str(saved / "ragged"), input_columns=["features"], label_column="label")
    assert torch.equal(data.x, torch.tensor([[0.5, 1.0], [1.5, 2.0], [2.5, 3.0], [3.5, 4.0]]))


def test_a_split_of_a_dataset_dict(saved) -> None:
    data = load_data(f"{saved / 'dict'}:test", pad_token_id=0)
    assert len(data) == 2 and data.x["input_ids"].shape == (2, 4)


@pytest.mark.parametrize(
    ("spec", "options", "needle"),
    [
        ("dict", {}, "splits train, test"),
        ("dict:valid", {}, "splits train, test"),
        ("ragged", {}, "pad_token_id"),
        ("ragged", {"input_columns": ["nope"], "pad_token_id": 0}, "'nope'"),
        ("ragged", {"input_columns": ["text"], "pad_token_id": 0}, "'text'"),
    ],
)
def test_bad_specs_are_one_line(saved, spec, options, needle) -> None:
    with pytest.raises(InputError) as err:
        load_data(str(saved / spec) if ":" not in spec else f"{saved}/{spec}", **options)
    assert "\n" not in str(err.value) and needle in str(err.value)


def test_measure_reads_a_datasets_dir_padded_with_the_config_pad_token(
    saved, tiny_bert, tmp_path
) -> None:
    """The datasets directory gives the same measurement as the padded tensors in a .pt file."""
    _, bert, _ = tiny_bert
    pad = json.loads((bert / "config.json").read_text())["pad_token_id"]
    padded = load_data(str(saved / "ragged"), pad_token_id=pad)
    x = {k: padded.x[k] for k in ("input_ids", "attention_mask")}
    torch.save({"x": x, "y": padded.y}, tmp_path / "padded.pt")
    results = {}
    for name, data in (("ds", saved / "ragged"), ("pt", tmp_path / "padded.pt")):
        args = ["measure", bert, "--reference", bert, "--data", data, "--out", tmp_path / name,
                "--estimator", "ggn", "--samples", 4, "--layers", "classifier.weight",
                "--head-reference", "zero", "--quiet"]  # fmt: skip
        assert main([str(a) for a in args]) == 0
        results[name] = json.loads((tmp_path / name / "measurement.json").read_text())
    assert results["ds"]["loss"] == results["pt"]["loss"]
    assert (
        results["ds"]["layers"][0]["quadratic_form"] == results["pt"]["layers"][0]["quadratic_form"]
    )
