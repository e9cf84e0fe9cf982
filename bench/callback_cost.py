"""What ``HessianMeasureCallback`` costs against the evaluation it rides on (Trainer, CPU).

Trains a random BERT classifier (hidden 256, 4 layers, 4 heads, intermediate 1024, vocabulary
2000, sequences of 128 tokens, 2 labels) for a few steps with an evaluation of ``--eval``
examples every ``--eval-steps`` steps and the callback, once per requested configuration
(estimator and sample size), and reports per evaluation the Trainer's ``eval_runtime``, the
measurement's own time (``provenance.timings.total_s`` of each ``measurement.json``) and their
ratio. The callback's samples are drawn once, when training begins, and not counted here.

    nice -n 10 python bench/callback_cost.py --threads 1 --configs ggn:32 ggn:64 block:32 \
        --out callback_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch


def _data(n: int, length: int, vocab: int, seed: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    labels = (ids[:, 0] % 2).tolist()
    return Dataset.from_dict({"input_ids": ids.tolist(), "label": labels})


def run(estimator: str, samples: int, *, eval_examples: int, eval_steps: int, steps: int) -> dict:
    """One training run with the callback; the per-evaluation timings."""
    from hessfine.integrations.transformers import HessianMeasureCallback
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    config = BertConfig(
        vocab_size=2000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=128,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    train, val = _data(512, 128, 2000, 0), _data(eval_examples, 128, 2000, 1)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out,
            max_steps=steps,
            eval_strategy="steps",
            eval_steps=eval_steps,
            per_device_train_batch_size=16,
            per_device_eval_batch_size=32,
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            save_strategy="no",
        )
        callback = HessianMeasureCallback(data=train, samples=samples, estimator=estimator)
        trainer = Trainer(model, args, train_dataset=train, eval_dataset=val, callbacks=[callback])
        trainer.train()
        evaluations = [e["eval_runtime"] for e in trainer.state.log_history if "eval_runtime" in e]
        files = sorted(Path(out, "hessfine").rglob("measurement.json"))
        measured = [json.loads(f.read_text())["provenance"]["timings"]["total_s"] for f in files]
    ratios = [m / e for m, e in zip(measured, evaluations, strict=True)]
    return {
        "estimator": estimator,
        "samples": samples,
        "eval_examples": eval_examples,
        "eval_runtime_s": evaluations,
        "measure_s": measured,
        "median_ratio": statistics.median(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["ggn:32"], metavar="ESTIMATOR:SAMPLES")
    parser.add_argument("--eval", type=int, default=1024, help="evaluation examples")
    parser.add_argument("--eval-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for config in args.configs:
        estimator, samples = config.split(":")
        result = run(
            estimator,
            int(samples),
            eval_examples=args.eval,
            eval_steps=args.eval_steps,
            steps=args.steps,
        )
        results.append(result)
        print(json.dumps(result))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
