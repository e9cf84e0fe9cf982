"""Cost of ``hessfine measure`` on real-size transformers, in forward units per layer (CPU).

Builds, with random initialisation and locally (no downloads), one of

* ``gpt2-lora``: GPT-2-small (``GPT2Config()``: 12 layers, hidden 768, vocabulary 50,257) as a
  causal LM with a LoRA adapter (peft, r = 8, α = 16, on the 12 ``c_attn`` projections,
  ``fan_in_fan_out``; B drawn 0.02·N(0, 1) so that ΔW = s·B·A ≠ 0): 12 measured layers;
* ``bert``: BERT-base (``BertConfig()``, 2 labels) for sequence classification, full fine-tune
  (every weight moved by 1e-3·N(0, 1)): 74 measured layers;
* ``vit``: ViT-B/16 at 224² (``ViTConfig()``, 10 labels), full fine-tune as for BERT;
* ``gpt2-medium-lora``: GPT-2-medium (24 layers, hidden 1024) with the same LoRA: 24 layers;
* ``llama-lora``: a LLaMA-shaped causal LM (``--llama-size``: ``1b`` hidden 2048 × 16 layers,
  ``3b`` 3200 × 26, ``7b`` the Llama-2-7B shape 4096 × 32; vocabulary 32,000) with LoRA r = 8 on
  ``q_proj`` and ``v_proj``: 2 layers per block;

saves the reference and the fine-tuned checkpoint (``save_pretrained``) and the data: token
sequences of lengths 96–128, right-padded to 128, with labels −100 on padding and (causal LM)
on the first 16 tokens of each; random images for the ViT. It then runs ``hessfine measure``
through the command line, one subprocess per estimator, and reports

    forward units per layer = wall time of the command
                              ÷ time of one no-grad forward of the same batch
                              ÷ number of measured layers,

the forward timed in a subprocess of its own with the same threads right before and right after
the command (their mean is the unit), and the command's peak resident memory (``ru_maxrss`` of
the child). ``--layers`` measures a subset of the layers; the run of all layers is then
extrapolated from the measured per-layer cost of the quadratic forms (phase timings of
``measurement.json``) and reported as such. ``--profile`` writes a cProfile of the command.
``--device cuda`` measures on the GPU (the unit forward then runs there too, synchronised);
``--tiny`` shrinks every configuration to a few small layers, to check the script on the CPU.

    OMP_NUM_THREADS=1 python bench/transformers_cost.py --model gpt2-lora --estimators ggn \
        --samples 16 --threads 1 --out gpt2_ggn.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = ("gpt2-lora", "bert", "vit", "gpt2-medium-lora", "llama-lora")
LLAMA_SIZES = {"1b": (2048, 16, 5632), "3b": (3200, 26, 8640), "7b": (4096, 32, 11008)}
"""hidden size, blocks and MLP width of the LLaMA shapes (``--llama-size``)."""
TINY = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000}
"""GPT-2 configuration fields of ``--tiny`` (the other models are shrunk to match)."""
LENGTH, SHORTEST, PROMPT = 128, 96, 16


def build(
    model: str, root: Path, examples: int, *, llama_size: str = "1b", tiny: bool = False
) -> dict:
    """Checkpoints and data of ``model`` under ``root`` (kept when already there)."""
    done = root / "built.json"
    if done.is_file() and json.loads(done.read_text()).get("examples", 0) >= examples:
        return json.loads(done.read_text())
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if model in ("gpt2-lora", "gpt2-medium-lora", "llama-lora"):
        info = _causal_lora(root, model, examples, g, llama_size=llama_size, tiny=tiny)
    else:
        info = _full_finetune(root, model, examples, g, tiny=tiny)
    info["examples"] = examples
    done.write_text(json.dumps(info))
    return info


def _padded_tokens(examples: int, vocab: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    lengths = torch.randint(SHORTEST, LENGTH + 1, (examples,), generator=g)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    ids = torch.randint(0, vocab, (examples, LENGTH), generator=g) * mask
    return ids, mask


def _causal_lm(model: str, llama_size: str, tiny: bool) -> tuple[torch.nn.Module, dict]:
    """The base causal LM of ``model`` (random weights) and its LoRA configuration's fields."""
    if model == "llama-lora":
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, blocks, width = (64, 2, 128) if tiny else LLAMA_SIZES[llama_size]
        config = LlamaConfig(
            hidden_size=hidden,
            num_hidden_layers=blocks,
            intermediate_size=width,
            num_attention_heads=max(hidden // 128, 4),
            num_key_value_heads=max(hidden // 128, 4),
            vocab_size=1000 if tiny else 32000,
            max_position_embeddings=512,
        )
        return LlamaForCausalLM(config), {"target_modules": ["q_proj", "v_proj"]}
    from transformers import GPT2Config, GPT2LMHeadModel

    fields = {"n_embd": 1024, "n_layer": 24, "n_head": 16} if model == "gpt2-medium-lora" else {}
    config = GPT2Config(**(TINY if tiny else fields))
    return GPT2LMHeadModel(config), {"target_modules": ["c_attn"], "fan_in_fan_out": True}


def _causal_lora(
    root: Path, model: str, examples: int, g: torch.Generator, *, llama_size: str, tiny: bool
) -> dict:
    from peft import LoraConfig, get_peft_model

    base, lora = _causal_lm(model, llama_size, tiny)
    base.eval().save_pretrained(root / "base")
    tuned = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, **lora))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    tuned.save_pretrained(root / "tuned")
    ids, mask = _padded_tokens(examples, base.config.vocab_size, g)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :PROMPT] = -100
    x = {"input_ids": ids, "attention_mask": mask}
    torch.save({"x": x, "y": labels}, root / "train.pt")
    layers = sum(1 for name, _ in tuned.named_parameters() if "lora_A" in name)
    return {"args": ["--model", "hf", "--task", "causal-lm"], "layers": layers}


def _full_finetune(root: Path, kind: str, examples: int, g: torch.Generator, *, tiny: bool) -> dict:
    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    small |= {"intermediate_size": 128}
    if kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(num_labels=2, **(small | {"vocab_size": 1000} if tiny else {}))
        model = BertForSequenceClassification(config).eval()
        ids, mask = _padded_tokens(examples, model.config.vocab_size, g)
        data = {"x": {"input_ids": ids, "attention_mask": mask}}
        data["y"] = torch.randint(0, 2, (examples,), generator=g)
        layers = 74
    else:
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(num_labels=10, **(small if tiny else {}))
        model = ViTForImageClassification(config).eval()
        data = {"x": torch.randn(examples, 3, 224, 224, generator=g)}
        data["y"] = torch.randint(0, 10, (examples,), generator=g)
        layers = 74  # the patch embedding, 12 × 6 encoder weights, the classifier
    if tiny:
        layers = 0  # no extrapolation
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "tuned")
    torch.save(data, root / "train.pt")
    return {"args": ["--model", "hf"], "layers": layers}


def forward_seconds(
    root: Path, samples: int, threads: int, repeats: int, device: str = "cpu"
) -> tuple[float, float]:
    """Medians of the wall and CPU seconds of ``repeats`` timed no-grad forwards of the first
    ``samples`` examples (after one untimed) on ``device``, the fine-tuned model loaded as
    ``hessfine measure`` loads it (on CUDA each forward is synchronised)."""
    from hessfine.analysis.model_specs import build_model

    torch.set_num_threads(threads)
    tuned = root / "tuned"
    if (tuned / "adapter_config.json").is_file():
        from peft import PeftModel

        module = build_model("hf", hf_directory=root / "base")
        module = PeftModel.from_pretrained(module, tuned).merge_and_unload()
    else:
        module = build_model("hf", hf_directory=tuned)
    module.eval().to(device)
    data = torch.load(root / "train.pt")
    x = data["x"]
    x = (
        x[:samples].to(device)
        if isinstance(x, torch.Tensor)
        else {k: v[:samples].to(device) for k, v in x.items()}
    )
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    times, cpu = [], []
    with torch.no_grad():
        for _ in range(repeats + 1):
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            module(**x) if isinstance(x, dict) else module(x)
            sync()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return sorted(times[1:])[len(times[1:]) // 2], sorted(cpu[1:])[len(cpu[1:]) // 2]


def _child(args: list[str], profile: Path | None) -> tuple[float, float, float, int]:
    """Run ``args`` (a command line of this script) as a child: wall seconds, CPU seconds, peak
    RSS GiB, exit code."""
    prefix = [sys.executable]
    if profile is not None:
        prefix += ["-m", "cProfile", "-o", str(profile)]
    start = time.perf_counter()
    process = subprocess.Popen([*prefix, __file__, *args])
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 2**20, process.returncode


def _forward_child(root: Path, samples: int, threads: int, device: str) -> tuple[float, float]:
    """Wall and CPU seconds of one no-grad forward, timed in a child process."""
    result = root / f"forward_{os.getpid()}.json"
    result.unlink(missing_ok=True)
    args = ["_forward", str(root), str(samples), str(threads), str(result), device]
    _child(args, None)
    timed = json.loads(result.read_text())
    return timed["forward_s"], timed["forward_cpu_s"]


def data_file(root: Path, samples: int) -> Path:
    """The first ``samples`` examples as a data file of their own, so that the training split
    (whose loss the command also computes) is the Hessian sample."""
    path = root / f"train_{samples}.pt"
    if not path.is_file():
        data = torch.load(root / "train.pt")
        x = data["x"]
        x = x[:samples] if isinstance(x, torch.Tensor) else {k: v[:samples] for k, v in x.items()}
        torch.save({"x": x, "y": data["y"][:samples]}, path)
    return path


def run(options: argparse.Namespace, root: Path, info: dict, estimator: str) -> dict:
    """One ``hessfine measure`` command between two timed forwards."""
    out = root / f"out_{estimator}_{os.getpid()}"
    data = data_file(root, options.samples)
    args = ["measure", str(root / "tuned"), "--reference", str(root / "base"), *info["args"]]
    args += ["--data", str(data), "--out", str(out), "--estimator", estimator]
    args += ["--samples", str(options.samples), "--quiet", "--threads", str(options.threads)]
    args += ["--sample-order", "file", "--device", options.device]
    if options.batch_size:
        args += ["--batch-size", str(options.batch_size)]
    if options.layers:
        args += ["--layers", *options.layers]
    args += options.extra
    before, before_cpu = _forward_child(root, options.samples, options.threads, options.device)
    profile = root / f"profile_{estimator}.prof" if options.profile else None
    wall, cpu, rss, code = _child(["_cli", *args], profile)
    after, after_cpu = _forward_child(root, options.samples, options.threads, options.device)
    unit, unit_cpu = (before + after) / 2, (before_cpu + after_cpu) / 2
    row: dict = {
        "model": options.model,
        "estimator": estimator,
        "command": "hessfine " + " ".join(args),
        "exit": code,
        "samples": options.samples,
        "threads": options.threads,
        "device": options.device,
        "forward_s": [before, after],
        "forward_cpu_s": [before_cpu, after_cpu],
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_gib": rss,
        "load_average": os.getloadavg(),
    }
    result = out / "measurement.json"
    if code != 0 or not result.is_file():
        return row
    measurement = json.loads(result.read_text())
    layers = measurement["layers"]
    timings = measurement["provenance"]["timings"]
    row["layers"] = len(layers)
    row["forward_units_per_layer"] = wall / unit / len(layers)
    row["cpu_forward_units_per_layer"] = cpu / unit_cpu / len(layers)
    row["timings"] = timings
    row["routes"] = sorted({layer["method"] for layer in layers})
    row["values"] = {layer["name"]: layer["quadratic_form"]["max"] for layer in layers}
    row["notes"] = measurement.get("notes", [])
    row["diagnostics"] = {layer["name"]: layer["diagnostics"] for layer in layers}
    total = info.get("layers")
    if total and total != len(layers):
        per_layer = timings["quadratic_forms_s"] / len(layers)
        extrapolated = wall + per_layer * (total - len(layers))
        row["extrapolated_all_layers"] = {
            "layers": total,
            "wall_s": extrapolated,
            "forward_units_per_layer": extrapolated / unit / total,
            "cpu_forward_units_per_layer": cpu * extrapolated / wall / unit_cpu / total,
            "how": "measured wall time + (quadratic-form seconds per measured layer) × "
            "(unmeasured layers); CPU seconds scaled by the same factor",
        }
    if options.profile:
        row["profile"] = str(profile)
    return row


def arguments(doc: str, estimators: list[str], samples: int, out: str) -> argparse.ArgumentParser:
    """The options this script shares with ``bench/precision.py``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="gpt2-lora")
    parser.add_argument("--estimators", nargs="*", default=estimators)
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--examples", type=int, default=64, help="examples written to the data")
    parser.add_argument("--layers", nargs="*", default=[], help="--layers globs (a subset)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the measure and the unit)")
    parser.add_argument("--llama-size", choices=sorted(LLAMA_SIZES), default="1b")
    parser.add_argument("--tiny", action="store_true", help="tiny configurations (a dry run)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/hessfine_transformers_bench"))
    parser.add_argument(
        "--extra", nargs=argparse.REMAINDER, default=[], help="more options of hessfine measure"
    )
    parser.add_argument("--out", type=Path, default=Path(out))
    return parser


def built(options: argparse.Namespace) -> tuple[Path, dict]:
    """The folder of the model the options name, built there if needed, and its facts."""
    name = options.model + ("-" + options.llama_size if options.model == "llama-lora" else "")
    root = options.root / (name + ("-tiny" if options.tiny else ""))
    facts = build(
        options.model, root, options.examples, llama_size=options.llama_size, tiny=options.tiny
    )
    return root, facts


def cli() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_cli":
        from hessfine.analysis.cli import main

        sys.exit(main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "_forward":
        root, samples, threads, result, device = sys.argv[2:7]
        wall, cpu = forward_seconds(Path(root), int(samples), int(threads), 3, device)
        Path(result).write_text(json.dumps({"forward_s": wall, "forward_cpu_s": cpu}))
        return
    parser = arguments(__doc__, ["ggn", "block", "auto"], 16, "transformers_cost.json")
    parser.add_argument("--batch-size", type=int, default=0, help="--batch-size (default: its)")
    parser.add_argument("--profile", action="store_true", help="cProfile the command")
    options = parser.parse_args()
    root, info = built(options)
    report = json.loads(options.out.read_text()) if options.out.is_file() else {"runs": []}
    for estimator in options.estimators:
        row = run(options, root, info, estimator)
        report["runs"].append(row)
        options.out.write_text(json.dumps(report, indent=2))
        brief = {k: row.get(k) for k in ("model", "estimator", "exit", "wall_s", "peak_rss_gib")}
        brief["forward_units_per_layer"] = row.get("forward_units_per_layer")
        brief["cpu_forward_units_per_layer"] = row.get("cpu_forward_units_per_layer")
        brief["forward_s"] = row["forward_s"]
        print(json.dumps(brief), flush=True)


if __name__ == "__main__":
    cli()
