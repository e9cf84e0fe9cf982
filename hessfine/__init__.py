"""hessfine: Hessian-based generalization analysis of fine-tuned networks (Ju, Li & Zhang, ICML 2022).

The names a user needs, loaded on first use (``import hessfine`` imports nothing else, so
``import hessfine.bounds`` and the command line stay light):

- :func:`measure_model` measures a module in memory against its reference on data in memory,
  :func:`measure` a checkpoint on disk (what ``hessfine measure`` does); both return or write
  the same ``measurement.json`` (:class:`Measurement`, with :class:`MeasuredLayer` and the
  bounds), for the options of :class:`MeasureSettings`;
- :func:`compare` collects measurements into ``comparison.csv``, correlations and figures (what
  ``hessfine compare`` does);
- :mod:`hessfine.integrations` holds the training callbacks (``transformers``' ``Trainer``,
  Lightning).

The mathematics is in :mod:`hessfine.bounds`, everything that touches files in
:mod:`hessfine.analysis`, plots in :mod:`hessfine.figures` and fine-tuning in
:mod:`hessfine.finetune`.

Example:
    >>> import hessfine  # doctest: +SKIP
    >>> result = hessfine.measure_model(tuned, reference=pretrained, data=loader)  # doctest: +SKIP
    >>> result.bounds.theorem_2_1, result.save("out/tuned")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hessfine.analysis.compare import compare
    from hessfine.analysis.measure import MeasureSettings, measure
    from hessfine.analysis.measurement import MeasuredLayer, Measurement
    from hessfine.analysis.python_api import measure_model

_EXPORTS = {
    "measure_model": "hessfine.analysis.python_api",
    "measure": "hessfine.analysis.measure",
    "MeasureSettings": "hessfine.analysis.measure",
    "Measurement": "hessfine.analysis.measurement",
    "MeasuredLayer": "hessfine.analysis.measurement",
    "compare": "hessfine.analysis.compare",
}

__all__ = [
    "MeasureSettings",
    "MeasuredLayer",
    "Measurement",
    "compare",
    "measure",
    "measure_model",
]


def __getattr__(name: str) -> Any:
    """Load an exported name from its module on first use.

    Args:
        name: The attribute asked for.

    Returns:
        The exported object.

    Raises:
        AttributeError: ``name`` is not exported.
    """
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hessfine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names and the exported ones.

    Returns:
        The names, sorted.
    """
    return sorted({*globals(), *__all__})
