"""What both training callbacks do: fixed samples, a reference, one measurement per step.

:class:`TrainingMeasure` holds a callback's settings and, from the start of training, its fixed
data: a seeded, class-stratified sample of ``samples`` training examples (the first ``samples``
of a ``DataLoader`` or iterable), the same of the evaluation data, and the reference — the one
given, a PeftModel's base, or else a CPU copy of the selected layers' weights when training
begins. Each :meth:`TrainingMeasure.measure` measures the model as it is then with
:func:`hessfine.analysis.python_api.measure_objects` (every example of the samples; n of the
bounds is the size of the whole training data when it is known), as one process of the
training's process group when there is one (every rank computes its share, rank 0 writes),
and writes ``measurement.json`` into the directory given.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from hessfine.analysis.distributed import joined
from hessfine.analysis.errors import InputError
from hessfine.analysis.in_memory_data import sampled_data
from hessfine.analysis.in_memory_inputs import (
    forward_names,
    measured_module,
    model_task,
    pad_token_id,
    selected_weights,
)
from hessfine.analysis.labeled_data import LabeledData
from hessfine.analysis.measurement import Measurement
from hessfine.analysis.python_api import (
    measure_objects,
    measure_settings,
    model_device,
    python_message,
)
from torch import nn


class TrainingMeasure:
    """A training callback's measurements: its settings, fixed samples and reference.

    Args:
        reference: The reference (a module, a state dict or a path); None: a PeftModel's base,
            else the selected weights when training begins.
        data: The training data (any form ``measure_model`` takes).
        eval_data: The evaluation data, or None to take it from the trainer later
            (:meth:`sample_eval`).
        samples: The size of each fixed sample.
        settings: Settings of ``measure_model`` (``samples`` excluded: the samples are measured
            whole).
    """

    def __init__(
        self, reference: Any, data: Any, eval_data: Any, samples: int, settings: dict[str, Any]
    ) -> None:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        if "samples" in settings:
            raise TypeError("samples is the callback's own argument: the size of its samples")
        self.settings = measure_settings(samples="all", **settings)
        self.reference = reference
        self.data = data
        self.eval_data = eval_data
        self.samples = samples
        self.train: LabeledData | None = None
        self.eval: LabeledData | None = None
        self.size: int | None = None
        self.start: Any = None

    @property
    def prepared(self) -> bool:
        """Whether the training sample and the reference are fixed."""
        return self.train is not None

    def prepare(self, model: nn.Module) -> None:
        """Fix the training sample, the evaluation sample (when given) and the reference.

        Args:
            model: The model being trained, as it is when training begins.
        """
        measured = measured_module(model)
        with torch.inference_mode(False):
            self.train, self.size = self._sample(self.data, measured.module, "data")
            if self.eval_data is not None:
                self.eval, _ = self._sample(self.eval_data, measured.module, "eval_data")
            if self.settings.n_train is None and self.size is not None:
                self.settings = replace(self.settings, n_train=self.size)
            self.start = self.reference
            if self.reference is None and measured.peft is None:
                self.start = selected_weights(measured, self.settings.layers)

    def sample_eval(self, data: Any, model: nn.Module) -> None:
        """Fix the evaluation sample from the trainer's evaluation data, once.

        Args:
            data: The trainer's evaluation data (a ``DataLoader``); None leaves no sample.
            model: The model being trained.
        """
        if self.eval is None and data is not None:
            with torch.inference_mode(False):
                self.eval, _ = self._sample(data, measured_module(model).module, "eval_data")

    def measure(
        self, model: nn.Module, *, training: dict[str, Any], directory: Path
    ) -> Measurement:
        """Measure ``model`` now; rank 0 writes ``directory/measurement.json``.

        Args:
            model: The model being trained.
            training: What ``measurement.json → training`` records (tool, step, epoch, ...);
                ``sample`` is added: the training sample's size, the data's size, its order
                (``stratified`` or ``iteration``) and seed.
            directory: Where the result goes.

        Returns:
            The measurement.
        """
        if not self.prepared:
            self.prepare(model)
        measured = measured_module(model)
        context = joined(model_device(self.settings.device, measured.module))
        order = "iteration" if self.train.iterated else "stratified"
        sample = {"examples": len(self.train), "of": self.size, "order": order}
        result = measure_objects(
            measured,
            reference=self.start,
            data=self.train,
            eval_data=self.eval,
            settings=self.settings,
            context=context,
            training={**training, "sample": {**sample, "seed": self.settings.seed}},
        )
        if context.is_writer:
            result.save(directory)
        return result

    def _sample(self, data: Any, module: nn.Module, label: str) -> tuple[LabeledData, int | None]:
        try:
            return sampled_data(
                data,
                self.samples,
                seed=self.settings.seed,
                task=model_task(self.settings.task, module).task,
                label=label,
                pad_token_id=pad_token_id(module),
                input_names=forward_names(module),
            )
        except InputError as err:
            raise ValueError(python_message(err)) from None
