"""The result of one measurement as a Python object: :class:`Measurement`.

Every measurement — of files (``hessfine measure``, :func:`hessfine.analysis.measure.measure`)
or of modules in memory (:func:`hessfine.measure_model`, the training callbacks) — ends as a
:class:`Measurement`. It holds the ``measurement.json`` document exactly as it is written
(:meth:`Measurement.to_json`; fields in ``docs/schema.md``) and the spectral density of
``spectrum.json`` when one was asked for; :meth:`Measurement.save` writes both files, atomically.
The per-layer values and the bounds are also typed, frozen attributes (:class:`MeasuredLayer`,
:class:`hessfine.bounds.generalization.Bounds`), :meth:`Measurement.scalars` gives the single numbers a training log
takes (the columns of ``comparison.csv`` of the same names) and :meth:`Measurement.to_frame`
the per-layer table as a pandas ``DataFrame`` (the columns of ``layers.csv``).

Example:
    >>> result = Measurement.from_record(record)  # doctest: +SKIP
    >>> result.bounds.theorem_2_1, [layer.quadratic_form for layer in result.layers]  # doctest: +SKIP
    >>> result.save("out/ft")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hessfine.analysis.results import json_text, write_json_atomic
from hessfine.analysis.schema import KEY_COLUMNS, MEASUREMENT, SPECTRUM
from hessfine.bounds.generalization import Bounds

SCALARS = (
    "hessian_distance_measure",
    "theorem_2_1",
    "trace_corollary",
    "train_loss",
    "eval_loss",
    "generalization_gap_loss",
    "generalization_gap_accuracy",
    "sum_hessian_quadratic_form",
    "sum_sqrt_hessian_quadratic_form",
    "sum_distance",
    "sum_trace_mean",
    "pac_bayes_bound",
)
"""The columns of ``comparison.csv`` that :meth:`Measurement.scalars` gives (those measured)."""


@dataclass(frozen=True)
class MeasuredLayer:
    """One selected layer W_i (``measurement.json → layers[]``).

    Attributes:
        name: The parameter name of W_i.
        shape: Its shape.
        distance: ‖v_i‖_F = ‖W_i − W_i^(s)‖_F.
        quadratic_form: 𝓗_i = max_x v_iᵀ H_i⁺(x) v_i (the estimator's matrix in place of H_i⁺).
        quadratic_form_mean: The mean of the same form over the Hessian examples.
        route: How 𝓗_i was computed (``layers[].method``, e.g. ``ggn-certified``, ``lanczos``).
        reference_source: Where W_i^(s) came from: ``reference``, ``head-zero`` or ``head-file``.
        argmax_index: Index in the data of the example attaining 𝓗_i (None for batches).
        quadratic_form_error: How far the true 𝓗_i may lie from ``quadratic_form``, estimated
            (0 for exact routes; the Lanczos routes' error estimate).
        trace_mean: Tr[H̄_ii] (with ``trace``), else None.
        trace_positive_max: max_x Tr[H_i⁺(x)] (with ``trace``), else None.
        top_eigenvalues: The largest eigenvalues of H̄_ii (with ``eigen``), else None.
    """

    name: str
    shape: tuple[int, ...]
    distance: float
    quadratic_form: float
    quadratic_form_mean: float
    route: str
    reference_source: str
    argmax_index: int | None
    trace_mean: float | None
    trace_positive_max: float | None
    top_eigenvalues: tuple[float, ...] | None
    quadratic_form_error: float = 0.0

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> MeasuredLayer:
        """The layer of one ``layers[]`` entry of ``measurement.json``.

        Args:
            entry: The entry.

        Returns:
            The typed layer.
        """
        form, trace = entry["quadratic_form"], entry.get("trace") or {}
        eigen = entry.get("top_eigenvalues")
        return cls(
            name=entry["name"],
            shape=tuple(entry["shape"]),
            distance=entry["distance"],
            quadratic_form=form["max"],
            quadratic_form_mean=form["mean"],
            route=entry["method"],
            reference_source=entry["reference_source"],
            argmax_index=form.get("argmax_index"),
            trace_mean=trace.get("mean"),
            trace_positive_max=trace.get("positive_max"),
            top_eigenvalues=None if eigen is None else tuple(eigen),
            quadratic_form_error=form.get("max_error_estimate", 0.0),
        )


@dataclass(frozen=True, eq=False)
class Measurement:
    """The result of one measurement (frozen): the document of ``measurement.json`` and its parts.

    Attributes:
        layers: The selected layers, in the model's order.
        bounds: The bounds (:class:`hessfine.bounds.generalization.Bounds`: ``theorem_2_1``,
            ``hessian_distance_measure``, ``trace_corollary``, ``pac_bayes_certificate``, …).
        generalization_gap: The measured gap, evaluation − training loss (None without
            evaluation data).
        document: ``measurement.json`` as JSON text (what :meth:`to_json` parses).
        spectrum: ``spectrum.json`` as JSON text (with ``density``), else None.

    Example:
        >>> import hessfine  # doctest: +SKIP
        >>> result = hessfine.measure_model(net, reference=pretrained, data=(x, y))  # doctest: +SKIP
        >>> result.bounds.hessian_distance_measure, result.layers[0].quadratic_form  # doctest: +SKIP
    """

    layers: tuple[MeasuredLayer, ...]
    bounds: Bounds
    generalization_gap: float | None
    document: str = field(repr=False)
    spectrum: str | None = field(default=None, repr=False)

    @classmethod
    def from_record(
        cls, record: Mapping[str, Any], spectrum: Mapping[str, Any] | None = None
    ) -> Measurement:
        """The measurement of a ``measurement.json`` document (and a ``spectrum.json`` one).

        Args:
            record: The document, as the measuring core or a file gives it.
            spectrum: The spectral density's document, if any.

        Returns:
            The frozen result; its :meth:`to_json` is ``record`` as JSON would read it back
            (non-finite numbers as None).
        """
        text = json_text(record)
        document = json.loads(text)
        return cls(
            layers=tuple(MeasuredLayer.from_json(entry) for entry in document["layers"]),
            bounds=Bounds(**document["bounds"]),
            generalization_gap=document["generalization_gap"]["loss"],
            document=text,
            spectrum=None if spectrum is None else json_text(spectrum),
        )

    def to_json(self) -> dict[str, Any]:
        """The ``measurement.json`` document (a new dict at each call).

        Returns:
            Exactly what :meth:`save` writes to ``measurement.json``, parsed.
        """
        return json.loads(self.document)

    def save(self, directory: str | Path) -> Path:
        """Write ``measurement.json`` (and ``spectrum.json`` with a density) into ``directory``.

        Args:
            directory: The output directory, created if absent.

        Returns:
            The path of ``measurement.json``.
        """
        directory = Path(directory)
        if self.spectrum is not None:
            write_json_atomic(directory / SPECTRUM, json.loads(self.spectrum))
        return write_json_atomic(directory / MEASUREMENT, self.to_json())

    def scalars(self) -> dict[str, float]:
        """The single numbers a training log takes, under their ``comparison.csv`` names.

        Returns:
            The finite values of :data:`SCALARS`: the bounds, the losses and the measured gap,
            and the sums over the layers (𝓗_i, sqrt(𝓗_i), ‖v_i‖_F, traces).
        """
        from hessfine.analysis.compare import Record, flat_row
        from hessfine.figures.tables import finite

        document = self.to_json()
        row = flat_row(Record(Path(MEASUREMENT), document, None, {}, document.get("epoch"), {}))
        return {name: float(row[name]) for name in SCALARS if finite(row.get(name))}

    def to_frame(self) -> Any:
        """The per-layer table as a pandas ``DataFrame``, one row per layer.

        Returns:
            The columns of ``layers.csv`` (docs/schema.md) but its key columns, indexed by layer.

        Raises:
            ImportError: pandas is not installed.
        """
        try:
            import pandas
        except ImportError:
            raise ImportError(
                "Measurement.to_frame needs pandas; pip install 'hessfine[pandas]'"
            ) from None
        from hessfine.figures.tables import layer_rows

        rows = layer_rows(self.to_json(), {})
        table = [{k: v for k, v in row.items() if k not in KEY_COLUMNS} for row in rows]
        return pandas.DataFrame(table).set_index("layer")
