"""Fixtures shared by several test modules."""

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny convolutions run fastest, and steadiest on a shared machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def uci_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 UCI digits as (x: N×1×8×8 in [0, 1], y), in file order."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(bunch.target, dtype=torch.long)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random BertForSequenceClassification saved with save_pretrained.

    Returns (model, single-file directory, sharded directory).
    """
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    config = BertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=50,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = BertForSequenceClassification(config).eval()
    single = tmp_path_factory.mktemp("bert")
    model.save_pretrained(single)
    sharded = tmp_path_factory.mktemp("bert_sharded")
    model.save_pretrained(sharded, max_shard_size="10KB")
    return model, single, sharded


@pytest.fixture(scope="session")
def vit_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ViT image classifier (3 classes, 3×8×8 images) in ``base/``; a LoRA adapter
    on its attention's q_proj and v_proj, by their names in memory, with random factors (so that
    it changes the weights) in ``adapter/`` (its ``base_model_name_or_path`` is ``base/``);
    peft's own merge of the two, in float64, in ``merged/``; 12 images with labels 0–2 in
    ``images.pt``."""
    from peft import LoraConfig, get_peft_model
    from transformers import ViTConfig, ViTForImageClassification

    root = tmp_path_factory.mktemp("vit_lora")
    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_labels=3,
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(root / "base")
    torch.manual_seed(3)
    lora = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    base = ViTForImageClassification.from_pretrained(root / "base", dtype=torch.float64)
    model = get_peft_model(base, lora)
    model.save_pretrained(root / "adapter")
    model.merge_and_unload().save_pretrained(root / "merged")
    g = torch.Generator().manual_seed(0)
    images = {"x": torch.rand(12, 3, 8, 8, generator=g), "y": torch.arange(12) % 3}
    torch.save(images, root / "images.pt")
    return root


@pytest.fixture(autouse=True)
def written_results_follow_the_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every measurement.json and spectrum.json a test writes has exactly the declared fields
    (hessfine.analysis.schema, docs/schema.md): the writer (Measurement.save, which the command
    line, measure_model and the callbacks all use) is checked on every configuration the tests
    measure, not only on the pinned ones."""
    from hessfine.analysis import measurement, schema

    fields = {
        schema.MEASUREMENT: schema.MEASUREMENT_FIELDS,
        schema.SPECTRUM: schema.SPECTRUM_FIELDS,
    }
    write = measurement.write_json_atomic

    def checked(path, data):
        declared = fields.get(Path(path).name)
        if declared is not None:
            document = json.loads(json.dumps(data))
            problems = schema.undeclared(document, declared) + schema.missing(document, declared)
            assert not problems, f"{path} does not follow the schema: {problems}"
        return write(path, data)

    monkeypatch.setattr(measurement, "write_json_atomic", checked)
