"""The Hessian distance measure during Lightning training.

``Trainer(callbacks=[HessianMeasureCallback(data=train_dataset)])`` measures the
``LightningModule`` (its ``forward`` must return the logits) at the end of each validation epoch
(not the sanity check) on fixed, seeded samples of the training and validation data, against the
weights when fitting began (or the ``reference`` given: a module, a state dict or a path), and

- logs ``hessfine/hessian_distance_measure``, ``hessfine/theorem_2_1``, the losses and the
  measured gap (``hessfine/generalization_gap_loss``) and the sums over the layers
  (``hessfine/sum_hessian_quadratic_form``, ``hessfine/sum_distance``, …) with
  ``pl_module.log``, so they reach every logger and ``trainer.callback_metrics``;
- writes ``LOG_DIR/hessfine/step-N/measurement.json`` (``trainer.log_dir``: the logger's
  version directory, or ``default_root_dir`` when there is no logger), with ``step`` and
  ``epoch``; ``hessfine compare LOG_DIR/hessfine`` reads them.

Under distributed training every rank measures its share of the examples and rank 0 writes.
The callback derives from ``lightning.pytorch.Callback``, else from ``pytorch_lightning``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from hessfine.integrations.measuring import TrainingMeasure

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # the older package name
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer
    except ImportError:
        raise ImportError(
            "hessfine.integrations.lightning needs Lightning; pip install 'hessfine[lightning]'"
        ) from None

PREFIX = "hessfine/"
"""The prefix of the logged names (``hessfine/theorem_2_1``, …)."""


class HessianMeasureCallback(Callback):
    """Measure the Hessian quantities and bounds at the end of each validation epoch.

    Args:
        reference: The pretrained weights W^(s) (a module, a state dict of the
            ``LightningModule`` or of its network, or a path); default: the weights when fitting
            begins (a CPU copy of the selected layers).
        data: The training data (a ``Dataset``, a ``DataLoader``, an ``(x, y)`` pair, a
            ``datasets.Dataset`` or a path): a seeded, class-stratified sample of ``samples``
            of its examples (the first ``samples`` of a ``DataLoader``) is measured each time.
        eval_data: The validation data; default: the first ``samples`` examples of the
            trainer's (first) validation ``DataLoader``.
        samples: The size of the two samples.
        estimator: The quadratic-form estimator (``ggn``: the Gauss–Newton form, exact for
            piecewise-linear layers, one forward and a backward pass per class).
        **settings: Other settings of ``hessfine.measure_model`` (``trace``, ``layers``,
            ``dtype``, ``seed``, …).

    Example:
        >>> trainer = L.Trainer(callbacks=[HessianMeasureCallback(data=train)])  # doctest: +SKIP
    """

    def __init__(
        self,
        reference: Any = None,
        *,
        data: Any,
        eval_data: Any = None,
        samples: int = 32,
        estimator: Literal["auto", "positive", "block", "ggn", "reference-code"] = "ggn",
        **settings: Any,
    ) -> None:
        super().__init__()
        self.measuring = TrainingMeasure(
            reference, data, eval_data, samples, {"estimator": estimator, **settings}
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fix the samples and the reference (the weights as fitting begins).

        Args:
            trainer: The trainer.
            pl_module: The module trained.
        """
        if not self.measuring.prepared:
            self.measuring.prepare(pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Measure the module, log the values and write ``measurement.json``.

        Args:
            trainer: The trainer.
            pl_module: The module trained.
        """
        if trainer.sanity_checking:
            return
        if self.measuring.eval_data is None:
            self.measuring.sample_eval(_first_loader(trainer.val_dataloaders), pl_module)
        step = trainer.global_step
        training = {"tool": "lightning", "step": step, "epoch": trainer.current_epoch}
        out = Path(trainer.log_dir or trainer.default_root_dir) / "hessfine" / f"step-{step}"
        result = self.measuring.measure(pl_module, training=training, directory=out)
        for name, value in result.scalars().items():
            pl_module.log(PREFIX + name, value)


def _first_loader(loaders: Any) -> Any:
    """The first of the trainer's validation data loaders (one, a list or a dict of them)."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, list | tuple):
        return loaders[0] if loaders else None
    return loaders


__all__ = ["HessianMeasureCallback"]
