"""Fixtures shared by several test modules."""

import json
from pathlib import Path

import pytest
import torch


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
