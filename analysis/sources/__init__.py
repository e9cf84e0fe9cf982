"""Readers for what training tools write, one module per source, behind
:func:`hessfine.analysis.checkpoints.load_checkpoint`.

- :mod:`.files` — single weights files and sharded indices (``.safetensors``, ``torch.save``);
- :mod:`.manifest` — hessfine's own run manifest ``hessfine.json``;
- :mod:`.hf` — Hugging Face ``save_pretrained`` directories;
- :mod:`.trainer` — Hugging Face ``Trainer`` output directories and ``trainer_state.json``;
- :mod:`.peft` — PEFT LoRA adapter directories (base + ΔW);
- :mod:`.lightning` — Lightning ``.ckpt`` files;
- :mod:`.timm_runs` — timm ``train.py`` output directories and ``.pth.tar`` files;
- :mod:`.sharded` — directories of shards from distributed training: :mod:`.dcp`
  (``torch.distributed.checkpoint``: FSDP, accelerate, Lightning's sharded checkpoints) and
  :mod:`.deepspeed` (ZeRO checkpoints);
- :mod:`.run_collections` — directories of runs: every checkpoint below a directory;
- :mod:`.hf_datasets` — Hugging Face ``datasets`` directories as data (read by
  :func:`hessfine.analysis.data.load_data`);
- :mod:`.processors` — their raw text and image columns, made into inputs by the model's own
  tokenizer or image processor.

Layering (data flows one way): ``hessfine.analysis.errors``, ``.sources``, ``.checkpoints``,
``.data`` (with ``.labeled_data`` and ``.digit_sets``), ``.model_specs`` and ``.results`` are the
*loading* layer. They import only each other and ``hessfine.bounds``; ``hessfine.finetune`` and
``hessfine.analysis``'s pipelines (``measure``, ``compare``, ``crosscheck``) import them; the
orchestration on top (``analysis.cli``, ``analysis.demo``, ``finetune.cli``) may import
anything. ``tests/test_layers.py`` checks this, and that no imports form a cycle.
"""
