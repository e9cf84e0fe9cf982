"""Raw text and images through the model's own tokenizer or image processor
(hessfine.analysis.sources.processors): measured through the command line, they give the numbers
of the same data processed by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hessfine.analysis.cli import main
from hessfine.analysis.data import Processing, load_data
from hessfine.analysis.errors import InputError
from PIL import Image

WORDS = ["the", "movie", "is", "good", "bad", "a", "plot", "very", "dull", "fun"]
TEXTS = ["the movie is good", "bad", "a very dull plot", "fun", "the plot is very very fun", "dull"]
PAIRS = ["good", "a plot", "bad", "the movie", "fun", "is"]
LABELS = [0, 1, 2, 1, 0, 2]
LETTERS = "abcdefghijklmnopqr"  # with <|endoftext|> and Ġ, the tiny GPT-2's 20 tokens
STORIES = ["abc de", "fgh", "ij kl mno", "pq r", "a"]


def _measure(checkpoint: Path, data: Path, out: Path, *extra: str) -> dict:
    """``hessfine measure`` of a checkpoint against itself on one layer; the result."""
    args = ["measure", checkpoint, "--reference", checkpoint, "--data", data, "--out", out,
            "--estimator", "ggn", "--samples", "4", "--head-reference", "zero", "--quiet",
            *extra]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    return json.loads((out / "measurement.json").read_text())


def _same_numbers(a: dict, b: dict) -> None:
    assert a["loss"] == b["loss"] and a["accuracy"] == b["accuracy"]
    assert [layer["quadratic_form"] for layer in a["layers"]] == [
        layer["quadratic_form"] for layer in b["layers"]
    ]


@pytest.fixture(scope="module")
def bert(tiny_bert, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny BERT with a saved word-piece tokenizer beside it, and the raw-text dataset."""
    from datasets import Dataset
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("raw_text")
    model = root / "bert"
    shutil.copytree(tiny_bert[1], model)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, model_max_length=32)
    tokenizer.save_pretrained(model)
    raw = Dataset.from_dict({"text": TEXTS, "pair": PAIRS, "label": LABELS})
    raw.save_to_disk(root / "raw")
    return model, root / "raw"


def test_raw_text_measures_as_the_same_text_tokenized_by_hand(bert, tmp_path) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    model, raw = bert
    tokens = AutoTokenizer.from_pretrained(model, local_files_only=True)(TEXTS)
    by_hand = {k: tokens[k] for k in ("input_ids", "attention_mask")}
    Dataset.from_dict({**by_hand, "label": LABELS}).save_to_disk(tmp_path / "tokens")
    layer = ("--layers", "classifier.weight")
    text = _measure(model, raw, tmp_path / "text", "--text-column", "text", *layer,
                    "--eval-data", raw)  # fmt: skip
    ids = _measure(model, tmp_path / "tokens", tmp_path / "ids", *layer,
                   "--eval-data", tmp_path / "tokens",
                   "--input-columns", "input_ids", "attention_mask")  # fmt: skip
    _same_numbers(text, ids)
    assert text["data"]["processor"] == {
        "kind": "tokenizer",
        "class": "BertTokenizer",
        "path": str(model),
        "columns": ["text"],
        "max_length": 32,
        "padding_side": "right",
        "pad_token_id": 0,
        "truncated": {"train": 0, "eval": 0},
    }
    assert "processor" not in ids["data"]


def test_pairs_are_truncated_to_max_length_and_keep_their_special_tokens(bert) -> None:
    model, raw = bert
    options = Processing(text_column="text", text_pair_column="pair", max_length=6)
    data = load_data(str(raw), processing=options.searching(model))
    ids, types, mask = (data.x[k] for k in ("input_ids", "token_type_ids", "attention_mask"))
    assert ids.shape == (6, 6) and ids[0, 0] == 2 and ids[0, -1] == 3  # [CLS] … [SEP]
    assert ids[5].tolist() == [2, 13, 3, 7, 3, 0]  # [CLS] dull [SEP] is [SEP] [PAD]
    assert types[5, :5].tolist() == [0, 0, 0, 1, 1] and mask[5].tolist() == [1] * 5 + [0]
    assert data.processor["truncated"] == 3 and data.processor["columns"] == ["text", "pair"]


def test_raw_images_measure_as_the_same_images_processed_by_hand(tmp_path) -> None:
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from transformers import (
        AutoImageProcessor,
        ConvNextConfig,
        ConvNextForImageClassification,
        ViTImageProcessor,
    )

    torch.manual_seed(0)
    config = ConvNextConfig(hidden_sizes=[4, 8], depths=[1, 1], num_stages=2, num_labels=3)
    model = tmp_path / "convnext"
    ConvNextForImageClassification(config).save_pretrained(model)
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(model)
    rng = np.random.default_rng(0)
    shapes = [(10, 12, 3), (9, 9), (16, 8, 3), (7, 11), (12, 12, 3), (8, 8, 3)]  # RGB and grey
    images = [Image.fromarray(rng.integers(0, 256, s, dtype=np.uint8)) for s in shapes]
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=3)})
    Dataset.from_dict({"image": images, "label": LABELS}, features=features).save_to_disk(
        tmp_path / "raw"
    )
    processor = AutoImageProcessor.from_pretrained(model, local_files_only=True)
    pixels = processor(images=[i.convert("RGB") for i in images], return_tensors="pt")
    torch.save({"x": pixels["pixel_values"], "y": torch.tensor(LABELS)}, tmp_path / "pixels.pt")
    raw = _measure(model, tmp_path / "raw", tmp_path / "m_raw", "--image-column", "image")
    by_hand = _measure(model, tmp_path / "pixels.pt", tmp_path / "m_pt")
    _same_numbers(raw, by_hand)
    assert raw["data"]["processor"] == {
        "kind": "image_processor",
        "class": "ViTImageProcessor",
        "path": str(model),
        "columns": ["image"],
    }


def test_finetune_reads_raw_images_with_the_processor_beside_the_reference(tmp_path) -> None:
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from safetensors.torch import save_file
    from transformers import ViTImageProcessor

    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))\n"
    )
    reference = tmp_path / "pretrained"
    reference.mkdir()
    torch.manual_seed(0)
    state = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3)).state_dict()
    save_file(state, str(reference / "net.safetensors"))
    ViTImageProcessor(size={"height": 4, "width": 4}).save_pretrained(reference)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)) for _ in LABELS]
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=3)})
    Dataset.from_dict({"image": images, "label": LABELS}, features=features).save_to_disk(
        tmp_path / "raw"
    )
    args = ["finetune", "--model", f"{tmp_path / 'net.py'}:build", "--reference",
            reference / "net.safetensors", "--data", tmp_path / "raw", "--image-column", "image",
            "--method", "plain", "--epochs", "1", "--out", tmp_path / "run", "--quiet"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    assert (tmp_path / "run" / "hessfine.json").is_file()


def test_causal_lm_labels_are_the_tokens_of_raw_text(tmp_path) -> None:
    from datasets import Dataset
    from transformers import GPT2Tokenizer

    from tests.oracles import tiny_hf

    model = tmp_path / "gpt2"
    tiny_hf("gpt2-lm")[0].float().save_pretrained(model)
    vocab = {c: i for i, c in enumerate(["<|endoftext|>", *LETTERS, "Ġ"])}
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[])  # no pad token: the config's pad_token_id
    tokenizer.save_pretrained(model)
    Dataset.from_dict({"story": STORIES}).save_to_disk(tmp_path / "raw")
    tokenizer.pad_token = tokenizer.eos_token  # id 0, the config's pad_token_id
    tokens = tokenizer(STORIES, padding="longest", return_tensors="pt")
    x = {k: tokens[k] for k in ("input_ids", "attention_mask")}
    torch.save({"x": x}, tmp_path / "tokens.pt")
    lm = ("--task", "causal-lm", "--layers", "transformer.h.0.mlp.c_proj.weight")
    raw = _measure(model, tmp_path / "raw", tmp_path / "m_raw", "--text-column", "story", *lm)
    by_hand = _measure(model, tmp_path / "tokens.pt", tmp_path / "m_pt", *lm)
    _same_numbers(raw, by_hand)
    record = raw["data"]["processor"]
    assert (record["class"], record["pad_token_id"], record["max_length"]) == (
        "GPT2Tokenizer",
        0,
        1024,
    )


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"text_column": "nope"}, "no column 'nope' (columns: text, pair, label)"),
        ({"text_column": "label"}, "column 'label' holds Value('int64'), not text"),
        ({"image_column": "text"}, "not images"),
        ({"text_column": "text", "tokenizer": "."}, "--tokenizer .: no tokenizer_config.json"),
        ({"text_column": "text"}, "no tokenizer given; pass --tokenizer DIR"),
        ({"text_column": "text", "image_column": "x"}, "exclude each other"),
        ({"max_length": 8}, "--max-length apply to raw text; pass --text-column COL"),
        ({"text_column": "text", "max_length": 0}, "--max-length must be a positive integer"),
    ],
)
def test_bad_options_are_one_line(bert, options, needle) -> None:
    with pytest.raises(InputError) as err:
        load_data(str(bert[1]), processing=Processing(**options))
    assert "\n" not in str(err.value) and needle in str(err.value), str(err.value)


def test_measure_without_a_tokenizer_exits_2_naming_the_option(tiny_bert, bert, tmp_path, capsys):
    args = ["measure", tiny_bert[1], "--reference", tiny_bert[1], "--data", bert[1],
            "--text-column", "text", "--out", tmp_path]  # fmt: skip
    assert main([str(a) for a in args]) == 2
    message = capsys.readouterr().err.strip()
    assert (
        "\n" not in message
        and f"no tokenizer saved in {tiny_bert[1]}; pass --tokenizer DIR" in (message)
    )
