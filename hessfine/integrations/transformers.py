"""The Hessian distance measure during ``transformers.Trainer`` training.

``Trainer(..., callbacks=[HessianMeasureCallback(data=train_dataset)])`` measures the model at
each evaluation (or every N steps) on fixed, seeded samples of the training and evaluation
data, against the weights when training began (a PeftModel: against its base, v_i = ΔW_i), and

- writes ``OUTPUT_DIR/hessfine/step-N/measurement.json`` (with ``step``, ``epoch`` and the
  Trainer's logged losses under ``training``), which ``hessfine compare OUTPUT_DIR/hessfine``
  reads;
- adds ``hessfine_hessian_distance_measure``, ``hessfine_theorem_2_1``, the losses and the
  measured gap (``hessfine_generalization_gap_loss``) and the sums over the layers
  (``hessfine_sum_hessian_quadratic_form``, ``hessfine_sum_distance``, …) to the log of that
  step: the evaluation's metrics (what ``trainer.evaluate()`` returns, so
  ``metric_for_best_model`` may name one), its entry of ``trainer.state.log_history``, and the
  ``logs`` that every callback after this one receives in ``on_log``.

The Trainer calls the ``report_to`` integrations (TensorBoard, W&B, …) before the callbacks
passed to it, and no hook runs between an evaluation and its log, so those integrations get the
values only when they come after this callback: pass ``report_to="none"`` and
``callbacks=[HessianMeasureCallback(...), TensorBoardCallback()]``.

Under distributed training every rank measures its share of the examples (the training's process
group) and rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from hessfine.analysis.sources.trainer import logged_near
from hessfine.integrations.measuring import TrainingMeasure
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

PREFIX = "hessfine_"
"""The prefix of the logged names (``hessfine_theorem_2_1``, …)."""


class HessianMeasureCallback(TrainerCallback):
    """Measure the Hessian quantities and bounds at each evaluation of a ``Trainer``.

    The hooks are the Trainer's (``TrainerCallback``); their arguments are the Trainer's.

    Args:
        reference: The pretrained weights W^(s) (a module, a state dict or a path); default: the
            weights when training begins (a CPU copy of the selected layers), a PeftModel's base.
        data: The training data (a ``datasets.Dataset``, a ``Dataset``, a ``DataLoader``, an
            ``(x, y)`` pair or a path): a seeded, class-stratified sample of ``samples`` of its
            examples (the first ``samples`` of a ``DataLoader``) is measured at every step.
        eval_data: The evaluation data; default: the first ``samples`` examples of the Trainer's
            evaluation ``DataLoader``, at its first evaluation.
        samples: The size of the two samples (the Hessian examples and the losses).
        every: ``"evaluate"`` (at each evaluation) or a number of steps N (every N steps,
            also forcing a training log at those steps).
        estimator: The quadratic-form estimator; ``ggn`` (the Gauss–Newton form, exact for
            piecewise-linear layers) costs one forward and a backward pass per class.
        **settings: Other settings of ``hessfine.measure_model`` (``trace``, ``layers``,
            ``dtype``, ``seed``, …).

    Example:
        >>> trainer = Trainer(model, args, train_dataset=train, eval_dataset=val,  # doctest: +SKIP
        ...                   callbacks=[HessianMeasureCallback(data=train)])
    """

    def __init__(
        self,
        reference: Any = None,
        *,
        data: Any,
        eval_data: Any = None,
        samples: int = 32,
        every: Literal["evaluate"] | int = "evaluate",
        estimator: Literal["auto", "positive", "block", "ggn", "reference-code"] = "ggn",
        **settings: Any,
    ) -> None:
        if every != "evaluate" and (isinstance(every, bool) or not isinstance(every, int)):
            raise TypeError(f"every: expected 'evaluate' or a number of steps, got {every!r}")
        if isinstance(every, int) and every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.measuring = TrainingMeasure(
            reference, data, eval_data, samples, {"estimator": estimator, **settings}
        )
        self.every = every
        self._evaluating = False
        self._due = False
        self._last_step: int | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Fix the samples and the reference (the weights as training begins).

        Args:
            args: The Trainer's arguments.
            state: Its state.
            control: Its control flags.
            model: The model trained.
            **kwargs: The Trainer's other objects.
        """
        if model is not None and not self.measuring.prepared:
            self.measuring.prepare(model)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """With ``every=N``, ask for a log at every N-th step (it carries the measure)."""
        if self.every != "evaluate" and state.global_step % self.every == 0:
            self._due = True
            control.should_log = True

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Note that an evaluation (or a prediction) runs: the next log is its metrics."""
        self._evaluating = True

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """The evaluation (or prediction) is over: its log, if any, was measured."""
        self._evaluating = False

    on_predict = on_evaluate

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        model: nn.Module | None = None,
        eval_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        """Measure at an evaluation's log (or a due step's) and add the values to it.

        Args:
            args: The Trainer's arguments.
            state: Its state (``log_history[-1]`` is this log).
            control: Its control flags.
            logs: The values being logged; the measure's are added.
            model: The model trained.
            eval_dataloader: The Trainer's evaluation data, sampled at the first evaluation.
            **kwargs: The Trainer's other objects.
        """
        wanted = self._evaluating if self.every == "evaluate" else self._due
        step = state.global_step
        if not wanted or model is None or logs is None or step == self._last_step:
            return
        self._evaluating = self._due = False
        self._last_step = step
        if self.measuring.eval_data is None:
            self.measuring.sample_eval(eval_dataloader, model)
        training = {
            "tool": "transformers.Trainer",
            "step": step,
            "epoch": state.epoch,
            "logged": logged_near(state.log_history, step),
        }
        out = Path(args.output_dir) / "hessfine" / f"step-{step}"
        result = self.measuring.measure(model, training=training, directory=out)
        values = {PREFIX + name: value for name, value in result.scalars().items()}
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == step:
            state.log_history[-1].update(values)
