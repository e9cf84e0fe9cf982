"""The result files' schema: every field of ``measurement.json`` and every column of the
comparison tables, once, with its type, unit and meaning.

This module is the one owner of the names. The measurement writer (:mod:`hessfine.analysis.measure`,
with the results' own ``to_json``), the comparison (:mod:`hessfine.analysis.compare`), the
figures (:mod:`hessfine.figures`) and the report import the names from here; the tests check
that every document the writer produces has exactly the declared fields
(:func:`undeclared`, :func:`missing`), and that ``docs/schema.md`` — generated from this module
(:func:`render_markdown`) by ``python -m hessfine.analysis.doc_pages`` — is current. The module imports nothing from hessfine, so
every layer of the package may use it.

A field's ``path`` names its place: ``.`` separates keys, ``[]`` stands for every element of a
list and ``{layer}``-style segments for keys that vary (layer names, which may hold dots, count
as one key). ``kind`` lists the JSON types allowed (``number`` is an int or a float; ``object*``
is an object whose keys are not declared one by one). A field that is not ``required`` appears
only in the circumstances its meaning states. ``measurement.json`` keeps the name ``method`` for
how a value was computed (the *route*): version 1 of the schema fixes it.

Example:
    >>> FIELDS["layers[].quadratic_form.max"].unit
    'loss'
    >>> undeclared({"schema_version": 1, "surprise": 0})
    ['surprise']
    >>> [c.name for c in COMPARISON_COLUMNS][:3]
    ['measurement', 'checkpoint', 'method']
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 1
MEASUREMENT = "measurement.json"
SPECTRUM = "spectrum.json"
COMPARISON_TABLE = "comparison.csv"
LAYERS_TABLE = "layers.csv"
NOISE_TABLE = "noise_stability.csv"
CORRELATIONS_TABLE = "correlations.csv"
RUN_METRICS = "metrics.csv"
"""The per-epoch metrics a ``hessfine finetune`` run writes; joined as ``metrics_*`` columns."""


@dataclass(frozen=True)
class Field:
    """One entry of a JSON result file."""

    path: str
    kind: str
    unit: str
    meaning: str
    required: bool = True

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.replace("[]", ".[]").split("."))


def _f(path: str, kind: str, unit: str, meaning: str, required: bool = True) -> Field:
    return Field(path, kind, unit, meaning, required)


_LOSS = "loss"  # the per-example loss's unit (nats for cross-entropy)
_Q = "Σ_i over the selected layers i"

# One entry a line: a table, not reformatted.
# fmt: off
MEASUREMENT_FIELDS: tuple[Field, ...] = (
    _f("schema_version", "int", "", f"Version of this schema: {SCHEMA_VERSION}."),
    _f("checkpoint", "str", "path", "The fine-tuned checkpoint measured (as given)."),
    _f("reference", "str", "path", "The reference (pretrained) checkpoint W^(s)."),
    _f("model", "str", "", "The model spec the architecture was built from."),
    _f("model_kwargs", "object*", "", "Keyword arguments of the model spec."),
    _f("mode", "str", "", "Mode of the network while measured: `eval`."),
    _f("settings", "object", "", "Every option that changes the numbers, and how the run ran."),
    _f("settings.estimator", "str", "", "Quadratic-form estimator: auto, block, positive, ggn, reference-code."),
    _f("settings.task", "str", "", "The per-example loss: classification or causal-lm."),
    _f("settings.lanczos_steps", "int", "steps", "Cap on Lanczos steps per example."),
    _f("settings.positive_rtol", "number", "relative", "Accuracy of the positive part relative to the layer's maximum."),
    _f("settings.samples", "int|str", "examples", "Examples the Hessian maxima are taken over (`all` for every one)."),
    _f("settings.sample_order", "str", "", "How they were chosen: stratified (seeded) or file order."),
    _f("settings.batch_size", "int", "examples", "Batch size asked for."),
    _f("settings.batch_size_used", "int", "examples", "Batch size used (halved after CUDA out-of-memory)."),
    _f("settings.hessian_split", "str", "", "The split the Hessian examples come from: train or eval."),
    _f("settings.layers", "list|null", "", "Layer globs given (null: the default selection)."),
    _f("settings.layers[]", "str", "", "One glob."),
    _f("settings.head_reference", "str|null", "", "Reference of a new head: null/`zero` or a file."),
    _f("settings.trace", "bool", "", "Whether traces were measured."),
    _f("settings.trace_probes", "int", "probes", "Hutchinson probes of the mean trace."),
    _f("settings.positive_trace_probes", "int", "probes", "SLQ probes per example of max_x Tr[H_i⁺(x)]."),
    _f("settings.trace_method", "str", "", "Route of the mean trace: hutchinson or hutch++."),
    _f("settings.eigen", "int", "", "Top eigenvalues asked for per layer (0: none)."),
    _f("settings.density", "bool", "", "Whether the spectral density was estimated."),
    _f("settings.noise_sigma", "list", "", "Noise scales σ of the noise stability."),
    _f("settings.noise_sigma[]", "number", "weight units (relative: fraction of |w|)", "One σ."),
    _f("settings.noise_draws", "int", "draws", "Noise draws (antithetic pairs) per σ."),
    _f("settings.noise_relative", "bool", "", "Noise σ·|w|⊙N(0, I) instead of σ·N(0, I)."),
    _f("settings.epsilon", "number", "", "ε of Theorem 2.1."),
    _f("settings.loss_bound", "number|null", _LOSS, "C given (null: the largest loss seen)."),
    _f("settings.n_train", "int|null", "examples", "n given (null: the training set's size)."),
    _f("settings.certificate", "bool", "", "Whether the PAC-Bayes certificate was computed."),
    _f("settings.device", "str", "", "Device the measurement ran on."),
    _f("settings.dtype", "str", "", "Floating-point type: float32 or float64."),
    _f("settings.seed", "int", "", "Seed of every random draw."),
    _f("settings.image_size", "int", "pixels", "ImageFolder crop size."),
    _f("settings.draws", "str", "", "How random draws are keyed (`keyed-v1`)."),
    _f("settings.tf32", "bool", "", "Whether TF32 matrix products were allowed (always false)."),
    _f("settings.world_size", "int", "processes", "Processes that shared the examples (torchrun)."),
    _f("settings.attn_implementation", "str", "", "Attention implementation of a Hugging Face model.", False),
    _f("data", "object", "", "The data measured on."),
    _f("data.train", "str", "", "Training data spec."),
    _f("data.eval", "str|null", "", "Evaluation data spec."),
    _f("data.input_columns", "list|null", "", "Input columns of a `datasets` directory, as given."),
    _f("data.input_columns[]", "str", "", "One column."),
    _f("data.label_column", "str|null", "", "Label column of a `datasets` directory, as given."),
    _f("data.n_train", "int", "examples", "Training examples."),
    _f("data.n_eval", "int|null", "examples", "Evaluation examples."),
    _f("data.n_hessian_samples", "int", "examples", "Examples the Hessian quantities are taken over."),
    _f("data.num_classes", "int", "", "Logits per prediction (classes, or the vocabulary)."),
    _f("data.hessian_sample", "object", "", "Which examples those are."),
    _f("data.hessian_sample.order", "str", "", "`stratified` (seeded, per class) or `file`."),
    _f("data.hessian_sample.population", "int", "examples", "Size of the split sampled from."),
    _f("data.hessian_sample.indices", "list|null", "", "Indices in the data, in the order used (null: every example in file order)."),
    _f("data.hessian_sample.indices[]", "int", "", "One index."),
    _f("data.hessian_sample.per_class", "object|null", "", "Examples drawn per class (stratified)."),
    _f("data.hessian_sample.per_class.{class}", "int", "examples", "Count of one class."),
    _f("unused_layers", "list", "", "Selected layers the model does not use in eval mode (zero Hessian blocks)."),
    _f("unused_layers[]", "str", "", "One layer."),
    _f("notes", "list", "", "Plain-language caveats about this result."),
    _f("notes[]", "str", "", "One note."),
    _f("manifest", "object*", "", "Run facts copied from the run manifest: method, seed, epoch, label_noise."),
    _f("epoch", "number|null", "epochs", "Epoch of the checkpoint (a float for a Trainer checkpoint)."),
    _f("step", "int|null", "steps", "The training tool's global step."),
    _f("training", "object*|null", "", "What the training tool recorded (tool, step, epoch, logged losses, hyper_parameters)."),
    _f("layers", "list", "", "One entry per selected layer, in the model's order."),
    _f("layers[]", "object", "", "One layer."),
    _f("layers[].name", "str", "", "Parameter name of the weight W_i."),
    _f("layers[].numel", "int", "weights", "d_i, its number of weights."),
    _f("layers[].shape", "list", "", "Its shape."),
    _f("layers[].shape[]", "int", "", "One dimension."),
    _f("layers[].distance", "number", "weight units", "‖v_i‖_F = ‖W_i − W_i^(s)‖_F."),
    _f("layers[].reference_source", "str", "", "Where W_i^(s) came from: reference, zero or the head file."),
    _f("layers[].method", "str", "", "Route of the quadratic form: ggn-certified, lanczos, hvp, ggn, reference-code or unused."),
    _f("layers[].quadratic_form", "object", "", "The per-example quadratic form of v_i, reduced over the Hessian examples."),
    _f("layers[].quadratic_form.max", "number", _LOSS, "𝓗_i = max_x v_iᵀ M(x) v_i (M = H_i⁺ by default; the estimator's matrix)."),
    _f("layers[].quadratic_form.mean", "number", _LOSS, "The mean over the same examples."),
    _f("layers[].quadratic_form.argmax", "int", "", "Position in data.hessian_sample of the maximising example (reference-code: the batch)."),
    _f("layers[].quadratic_form.argmax_index", "int|null", "", "That example's index in the data (null for batches and unused layers)."),
    _f("layers[].diagnostics", "object", "", "Why the value can be trusted (entries depend on the route)."),
    _f("layers[].diagnostics.certification_residual", "number", "relative", "|uᵀ∇²φ u|/(∇φ·u)² of the logits along a random probe (0: piecewise linear).", False),
    _f("layers[].diagnostics.certified_psd", "bool", "", "Whether H_i = G_i (PSD) was certified.", False),
    _f("layers[].diagnostics.ggn_products", "str", "", "How J_iv_i was formed: layer-io (shared pass) or jvp.", False),
    _f("layers[].diagnostics.lanczos_max_steps", "int", "steps", "The Lanczos step cap.", False),
    _f("layers[].diagnostics.positive_rtol", "number", "relative", "The positive part's tolerance.", False),
    _f("layers[].diagnostics.lanczos_steps_mean", "number", "steps", "Lanczos steps per example, mean.", False),
    _f("layers[].diagnostics.lanczos_steps_max", "int", "steps", "Lanczos steps per example, max.", False),
    _f("layers[].diagnostics.change_half_steps", "number", _LOSS, "Largest |R_k − R_⌈k/2⌉| of an example not pruned: the max is within about this.", False),
    _f("layers[].diagnostics.pruned_fraction", "number", "fraction", "Examples stopped because they cannot attain the max.", False),
    _f("layers[].diagnostics.krylov_exhausted_fraction", "number", "fraction", "Examples whose Krylov space was exhausted (exact).", False),
    _f("layers[].diagnostics.lower_bound_max", "number", _LOSS, "max_x max(v_iᵀH_i v_i, 0), a rigorous lower bound of 𝓗_i.", False),
    _f("layers[].diagnostics.unit", "str", "", "reference-code: the maximum is over `batch` means.", False),
    _f("layers[].diagnostics.used_in_eval", "bool", "", "false for a layer the model does not use.", False),
    _f("layers[].trace", "object|null", "", "Traces (with --trace)."),
    _f("layers[].trace.mean", "number", _LOSS, "Tr[H̄_ii], the trace of the mean-loss Hessian's block (PyHessian's `trace`)."),
    _f("layers[].trace.stderr", "number", _LOSS, "Its standard error (0 when exact)."),
    _f("layers[].trace.probes", "int", "probes", "Probes used."),
    _f("layers[].trace.method", "str", "", "Its route: hutchinson, hutchinson-ggn, exact-ggn, hutch++ or unused."),
    _f("layers[].trace.positive_max", "number", _LOSS, "max_x Tr[H_i⁺(x)], for the trace corollary."),
    _f("layers[].trace.positive_max_stderr", "number", _LOSS, "Its standard error (0 when exact)."),
    _f("layers[].trace.positive_method", "str", "", "Its route: exact-ggn, exact-dense, slq or unused."),
    _f("layers[].top_eigenvalues", "list|null", "", "The K largest eigenvalues of H̄_ii (with --eigen K)."),
    _f("layers[].top_eigenvalues[]", "number", _LOSS, "One Ritz value, descending."),
    _f("layers[].top_eigenvalue_residuals", "list|null", "", "Their residual bounds |β_k s_kj|."),
    _f("layers[].top_eigenvalue_residuals[]", "number", _LOSS, "One bound."),
    _f("layers[].quadratic_form_noisy_labels", "object|null", "", "𝓗̄_i of the consistent loss on the noisy labels (runs with a noise matrix F)."),
    _f("layers[].quadratic_form_noisy_labels.max", "number", _LOSS, "𝓗̄_i."),
    _f("layers[].quadratic_form_noisy_labels.mean", "number", _LOSS, "Mean over the same examples."),
    _f("layers[].quadratic_form_noisy_labels.argmax", "int", "", "Position of the maximising example."),
    _f("layers[].quadratic_form_noisy_labels.method", "str", "", "Its route (`same as clean (…)` where the clean value was reused)."),
    _f("top_eigenvalues_all_layers", "object|null", "", "The K largest eigenvalues of the Hessian of all selected layers together."),
    _f("top_eigenvalues_all_layers.values", "list", "", "Ritz values, descending."),
    _f("top_eigenvalues_all_layers.values[]", "number", _LOSS, "One value."),
    _f("top_eigenvalues_all_layers.residuals", "list", "", "Their residual bounds."),
    _f("top_eigenvalues_all_layers.residuals[]", "number", _LOSS, "One bound."),
    _f("labels", "object|null", "", "A run with recorded label noise: which labels were measured against."),
    _f("labels.train", "str", "", "`clean`: the training labels used are the run's clean ones."),
    _f("labels.source", "str", "path", "The run's labels.csv."),
    _f("labels.data_file_holds", "str", "", "Which labels the data file holds: clean or noisy."),
    _f("labels.noisy_fraction", "number", "fraction", "Training labels the noise changed."),
    _f("loss", "object", "", "Mean per-example losses."),
    _f("loss.train", "number", _LOSS, "L̂, on the training data (clean labels under recorded noise)."),
    _f("loss.eval", "number|null", _LOSS, "On the evaluation data."),
    _f("loss.max", "number", _LOSS, "The largest per-example loss on the Hessian examples (the default C)."),
    _f("loss.train_noisy", "number|null", _LOSS, "On the noisy training labels trained on."),
    _f("loss.train_consistent", "number|null", _LOSS, "The consistent loss ℓ̄ on the noisy labels (with F)."),
    _f("accuracy", "object", "", "Accuracies (token accuracy for causal-lm)."),
    _f("accuracy.train", "number", "fraction", "On the training data."),
    _f("accuracy.eval", "number|null", "fraction", "On the evaluation data."),
    _f("accuracy.train_noisy", "number|null", "fraction", "On the noisy training labels."),
    _f("generalization_gap", "object", "", "The measured gap."),
    _f("generalization_gap.loss", "number|null", _LOSS, "eval − train loss."),
    _f("generalization_gap.accuracy", "number|null", "fraction", "train − eval accuracy."),
    _f("generalization_gap.against", "str", "", "`training labels`, or `clean training labels` under recorded noise."),
    _f("bounds", "object", "", "The bounds (docs/bounds.md derives each)."),
    _f("bounds.C", "number", _LOSS, "The loss bound C."),
    _f("bounds.n", "int", "examples", "n, the training-set size."),
    _f("bounds.epsilon", "number", "", "ε."),
    _f("bounds.hessian_distance_measure", "number", _LOSS, f"{_Q} of sqrt(C·𝓗_i/n)."),
    _f("bounds.theorem_2_1", "number", _LOSS, "(1+ε)·L̂ + (1+ε)·hessian_distance_measure (ξ dropped)."),
    _f("bounds.trace_corollary", "number|null", _LOSS, "(1+ε)·L̂ + (1+ε)·Σ_i α_i·sqrt(C·max_x Tr[H_i⁺(x)]/n) (with --trace)."),
    _f("bounds.distance_measures", "object", "", "Distance measures in the style of prior work."),
    _f("bounds.distance_measures.{measure}", "number|null", _LOSS, "One measure, or its `_log10`."),
    _f("bounds.pac_bayes_certificate", "object*|null", "", "The numerical PAC-Bayes certificate (docs/bounds.md)."),
    _f("bounds.noisy_label_factor", "number|null", "", "κ(F) = ‖F⁻¹‖_∞ (with F)."),
    _f("bounds.hessian_distance_measure_noisy_labels", "number|null", _LOSS, f"{_Q} of sqrt(κC·𝓗̄_i/n)."),
    _f("bounds.theorem_2_1_noisy_labels", "number|null", _LOSS, "The noisy-label bound (ξ dropped)."),
    _f("bounds.trace_corollary_noisy_labels", "number|null", _LOSS, "Its trace corollary (every layer certified)."),
    _f("bounds.noise_matrix_source", "str|null", "", "Where F comes from: known or dual-t."),
    _f("bounds.settings", "object", "", "Constants of the prior distance measures."),
    _f("bounds.settings.{constant}", "number", "", "margin γ, input_norm B or delta δ."),
    _f("noise_stability", "list", "", "One entry per σ."),
    _f("noise_stability[]", "object", "", "One noise level."),
    _f("noise_stability[].sigma", "number", "weight units (relative: fraction of |w|)", "σ."),
    _f("noise_stability[].mean", "number", _LOSS, "I(σ) = E_U[ℓ̄(W+U)] − ℓ̄(W)."),
    _f("noise_stability[].stderr", "number", _LOSS, "Its Monte Carlo standard error."),
    _f("noise_stability[].draws", "int", "draws", "Independent noise vectors."),
    _f("noise_stability[].evaluations", "int", "passes", "Perturbed passes over the data."),
    _f("noise_stability[].relative", "bool", "", "Relative (σ·|w|) noise."),
    _f("noise_stability[].antithetic", "bool", "", "Antithetic pairs ±U."),
    _f("noise_stability[].ci95", "list", "", "95% interval (Student's t)."),
    _f("noise_stability[].ci95[]", "number", _LOSS, "One end."),
    _f("noise_stability[].base_loss", "number", _LOSS, "ℓ̄(W)."),
    _f("noise_stability[].examples", "int", "examples", "Examples averaged over."),
    _f("noise_stability[].trace_prediction", "number", _LOSS, "(σ²/2)·Σ_i t_i, the second-order prediction."),
    _f("spectrum_file", "str", "", f"`{SPECTRUM}` beside this file (with --density).", False),
    _f("provenance", "object", "", "What a reader needs to reproduce the result."),
    _f("provenance.hessfine_version", "str", "", "hessfine's version."),
    _f("provenance.torch_version", "str", "", "torch's version."),
    _f("provenance.python_version", "str", "", "Python's version."),
    _f("provenance.timestamp", "str", "UTC", "When the measurement finished (ISO 8601)."),
    _f("provenance.checkpoint_sha256", "str", "", "SHA-256 of the checkpoint's files."),
    _f("provenance.reference_sha256", "str", "", "SHA-256 of the reference's files."),
    _f("provenance.device_name", "str", "", "The device's name (cpu or the GPU model)."),
    _f("provenance.timings", "object", "", "Wall-clock seconds per phase (0 for phases not run)."),
    _f("provenance.timings.{phase}", "number", "s", "load_s, quadratic_forms_s, trace_s, eigen_s, noise_s, certificate_s, quadratic_forms_noisy_labels_s or total_s."),
)
# fmt: on

# One entry a line: a table, not reformatted.
# fmt: off
SPECTRUM_FIELDS: tuple[Field, ...] = (
    _f("checkpoint", "str", "path", "The checkpoint measured."),
    _f("grid", "list", "", "Eigenvalue grid."),
    _f("grid[]", "number", _LOSS, "One grid point."),
    _f("density", "list", "", "Smoothed density on the grid."),
    _f("density[]", "number", "1/loss", "One value."),
    _f("nodes", "list", "", "Ritz values per SLQ run."),
    _f("nodes[]", "list", "", "One run's nodes."),
    _f("nodes[][]", "number", _LOSS, "One node."),
    _f("weights", "list", "", "Their weights per run."),
    _f("weights[]", "list", "", "One run's weights."),
    _f("weights[][]", "number", "", "One weight."),
    _f("steps", "int", "steps", "Lanczos steps."),
    _f("runs", "int", "", "SLQ runs."),
    _f("bandwidth", "number", "relative", "Gaussian kernel width relative to the spectral range."),
)
# fmt: on

FIELDS: dict[str, Field] = {f.path: f for f in MEASUREMENT_FIELDS}


def _declared(fields: Sequence[Field]) -> dict[tuple[str, ...], Field]:
    return {f.segments: f for f in fields}


def _lookup(table: Mapping[tuple[str, ...], Field], path: tuple[str, ...]) -> Field | None:
    """The field declared for a document path (placeholders ``{…}`` match any one key)."""
    for segments, found in table.items():
        if len(segments) == len(path) and all(
            s == p or (s.startswith("{") and p != "[]") for s, p in zip(segments, path, strict=True)
        ):
            return found
    return None


_JSON_KINDS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "list": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "object*": lambda v: isinstance(v, dict),
}


def _walk(
    value: Any, path: tuple[str, ...], table: Mapping[tuple[str, ...], Field]
) -> Iterator[str]:
    """Problems below ``path``: undeclared entries and values of the wrong kind."""
    if isinstance(value, dict):
        for key, item in value.items():
            child = (*path, str(key))
            found = _lookup(table, child)
            if found is None:
                yield ".".join(child)
                continue
            if not any(_JSON_KINDS[k](item) for k in found.kind.split("|")):
                yield f"{'.'.join(child)}: {type(item).__name__} is not {found.kind}"
            elif not found.kind.startswith("object*"):
                yield from _walk(item, child, table)
    elif isinstance(value, list):
        child = (*path, "[]")
        found = _lookup(table, child)
        for item in value:
            if found is None:
                yield ".".join(child)
                return
            if not any(_JSON_KINDS[k](item) for k in found.kind.split("|")):
                yield f"{'.'.join(child)}: {type(item).__name__} is not {found.kind}"
            else:
                yield from _walk(item, child, table)


def undeclared(
    document: Mapping[str, Any], fields: Sequence[Field] = MEASUREMENT_FIELDS
) -> list[str]:
    """The entries of a result document that the schema does not declare, or whose value is
    not of the declared kind (empty for a conforming document)."""
    return list(_walk(dict(document), (), _declared(fields)))


def missing(document: Mapping[str, Any], fields: Sequence[Field] = MEASUREMENT_FIELDS) -> list[str]:
    """The required fields absent from a document (below every object that is present)."""
    out = []
    for f in fields:
        if f.required and "[]" not in f.path and "{" not in f.path:
            node: Any = document
            for key in f.segments[:-1]:
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, dict) and f.segments[-1] not in node:
                out.append(f.path)
    return out


@dataclass(frozen=True)
class Column:
    """One column of a comparison table: its name, where its value comes from, unit, meaning.

    ``source`` is the ``measurement.json`` path of a column copied as it is, empty for a
    derived column (its meaning says how). A name with ``{…}`` stands for a family of columns.
    """

    name: str
    meaning: str
    unit: str = ""
    source: str = ""


GAP = "generalization_gap_loss"
HDM = "hessian_distance_measure"
TRACE_MEASURE = "trace_distance_measure"
SUM_DISTANCE = "sum_distance"
DISTANCE_PREFIX = "distance_measure_"
NOISE_PREFIX = "noise_stability_sigma_"
NOISY_SUFFIX = "_noisy_labels"

KEY_COLUMNS = (
    "measurement",
    "checkpoint",
    "method",
    "epoch",
    "seed",
    "noise_rate",
    "final_checkpoint",
)
"""The columns every long table starts with: the measurement a row belongs to."""

# One entry a line: a table, not reformatted.
# fmt: off
COMPARISON_COLUMNS: tuple[Column, ...] = (
    Column("measurement", "Path of the measurement.json file."),
    Column("checkpoint", "The checkpoint measured.", "path", "checkpoint"),
    Column("method", "The fine-tuning method, from the run manifest."),
    Column("epoch", "Epoch of the checkpoint (a float for a Trainer checkpoint, 0-based for Lightning).", "epochs"),
    Column("seed", "The run's seed, from its manifest."),
    Column("noise_rate", "The run's label-noise rate.", "fraction"),
    Column("final_checkpoint", "1 for the run's final model (its best_epoch, else its last checkpoint), 0 for other epochs, empty without a manifest."),
    Column("step", "The training tool's global step.", "steps", "step"),
    Column("noise_matrix_source", "F of the noisy-label bound: known, dual-t or none."),
    Column("reference", "The reference checkpoint.", "path", "reference"),
    Column("model", "The model spec.", "", "model"),
    Column("run", "The run directory (where its manifest is)."),
    Column("estimator", "The quadratic-form estimator.", "", "settings.estimator"),
    Column("noise_kind", "symmetric, pair or matrix."),
    Column("radius", "Distance-constraint radius of the extractor (constrained methods).", "weight units"),
    Column("head_radius", "Its radius for the head.", "weight units"),
    Column("confusion_source", "F of the consistent loss in training: given or dual-t."),
    Column("n", "n of the bounds.", "examples"),
    Column("n_eval", "Evaluation examples.", "examples", "data.n_eval"),
    Column("n_hessian_samples", "Hessian examples.", "examples", "data.n_hessian_samples"),
    Column("C", "The loss bound.", _LOSS, "bounds.C"),
    Column("epsilon", "ε.", "", "bounds.epsilon"),
    Column("train_loss", "L̂.", _LOSS, "loss.train"),
    Column("eval_loss", "Test loss.", _LOSS, "loss.eval"),
    Column("max_loss", "Largest loss on the Hessian examples.", _LOSS, "loss.max"),
    Column("train_accuracy", "Training accuracy.", "fraction", "accuracy.train"),
    Column("eval_accuracy", "Test accuracy.", "fraction", "accuracy.eval"),
    Column(GAP, "eval − train loss.", _LOSS, "generalization_gap.loss"),
    Column("generalization_gap_accuracy", "train − eval accuracy.", "fraction", "generalization_gap.accuracy"),
    Column(HDM, "Σ_i sqrt(C·𝓗_i/n).", _LOSS, "bounds.hessian_distance_measure"),
    Column("theorem_2_1", "The Theorem 2.1 bound.", _LOSS, "bounds.theorem_2_1"),
    Column("trace_corollary", "The trace corollary's bound.", _LOSS, "bounds.trace_corollary"),
    Column(TRACE_MEASURE, "The trace corollary's complexity term Σ_i α_i·sqrt(C·max_x Tr[H_i⁺(x)]/n), comparable with the gap.", _LOSS),
    Column("train_loss_noisy", "Loss on the noisy labels trained on.", _LOSS, "loss.train_noisy"),
    Column("train_loss_consistent", "Consistent loss on them.", _LOSS, "loss.train_consistent"),
    Column("train_accuracy_noisy", "Accuracy on them.", "fraction", "accuracy.train_noisy"),
    Column("gap_against", "training labels or clean training labels.", "", "generalization_gap.against"),
    Column("{bound}", "Every other numeric entry of bounds under its own name (noisy_label_factor, hessian_distance_measure_noisy_labels, theorem_2_1_noisy_labels, trace_corollary_noisy_labels)."),
    Column(DISTANCE_PREFIX + "{name}", "Each entry of bounds.distance_measures.", _LOSS),
    Column("num_layers", "Selected layers."),
    Column("num_weights", "Their weights.", "weights"),
    Column("sum_hessian_quadratic_form", "Σ_i 𝓗_i.", _LOSS),
    Column("sum_sqrt_hessian_quadratic_form", "Σ_i sqrt(𝓗_i), negative 𝓗_i counted as 0.", "sqrt(loss)"),
    Column(SUM_DISTANCE, "Σ_i ‖v_i‖_F.", "weight units"),
    Column("sum_trace_mean", "Σ_i mean_x Tr[H_i(x)] (with traces).", _LOSS),
    Column(NOISE_PREFIX + "{σ}", "I(σ) at each noise level.", _LOSS),
    Column("noise_stability_stderr_sigma_{σ}", "Its standard error.", _LOSS),
    Column("noise_trace_prediction_sigma_{σ}", "Its trace prediction.", _LOSS),
    Column("pac_bayes_{name}", "Each numeric entry of bounds.pac_bayes_certificate."),
    Column("trainer_{name}", "Trainer checkpoints: losses the Trainer logged at or nearest the step (loss, loss_step, eval_*, eval_step)."),
    Column("total_s", "Measurement wall time.", "s", "provenance.timings.total_s"),
    Column("metrics_{column}", f"Each column of the run's {RUN_METRICS} at the checkpoint's epoch."),
)
# fmt: on

LEADING_COLUMNS = tuple(
    c.name
    for c in COMPARISON_COLUMNS[: [c.name for c in COMPARISON_COLUMNS].index(TRACE_MEASURE) + 1]
)
"""The columns that come first in comparison.csv, in this order; the others follow in the order
of :data:`COMPARISON_COLUMNS` (families expanded in place)."""

MEASURE_COLUMNS = (
    HDM,
    "theorem_2_1",
    "trace_corollary",
    TRACE_MEASURE,
    "sum_hessian_quadratic_form",
    "sum_sqrt_hessian_quadratic_form",
    SUM_DISTANCE,
    "sum_trace_mean",
)
"""Bound and measure columns correlated with the gap (with the families of
:data:`MEASURE_PREFIXES` and :data:`MEASURE_SUFFIXES`)."""
MEASURE_PREFIXES = (DISTANCE_PREFIX, NOISE_PREFIX)
MEASURE_SUFFIXES = (NOISY_SUFFIX,)

# One entry a line: a table, not reformatted.
# fmt: off
LAYER_COLUMNS: tuple[Column, ...] = (
    Column("{key}", f"The {', '.join(KEY_COLUMNS)} of the measurement's comparison row."),
    Column("index", "Position of the layer."),
    Column("layer", "Its name.", "", "name"),
    Column("numel", "Its number of weights.", "weights", "numel"),
    Column("route", "Route of its quadratic form.", "", "method"),
    Column("distance", "‖v_i‖_F.", "weight units", "distance"),
    Column("quadratic_form_max", "𝓗_i.", _LOSS, "quadratic_form.max"),
    Column("quadratic_form_mean", "Mean of the form.", _LOSS, "quadratic_form.mean"),
    Column("sqrt_quadratic_form_max", "sqrt(𝓗_i) (empty when negative).", "sqrt(loss)"),
    Column("trace_mean", "Tr[H̄_ii].", _LOSS, "trace.mean"),
    Column("trace_stderr", "Its standard error.", _LOSS, "trace.stderr"),
    Column("trace_positive_max", "max_x Tr[H_i⁺(x)].", _LOSS, "trace.positive_max"),
    Column("top_eigenvalue", "The largest eigenvalue of H̄_ii.", _LOSS),
)
# fmt: on
"""``layers.csv``: one row per (measurement, layer); sources relative to ``layers[]``."""

# One entry a line: a table, not reformatted.
# fmt: off
NOISE_COLUMNS: tuple[Column, ...] = (
    Column("{key}", f"The {', '.join(KEY_COLUMNS)} of the measurement's comparison row."),
    Column("sigma", "σ.", "weight units", "sigma"),
    Column("mean", "I(σ).", _LOSS, "mean"),
    Column("stderr", "Its standard error.", _LOSS, "stderr"),
    Column("draws", "Noise draws.", "draws", "draws"),
    Column("trace_prediction", "(σ²/2)·Σ_i t_i.", _LOSS, "trace_prediction"),
)
# fmt: on
"""``noise_stability.csv``: one row per (measurement, σ); sources relative to ``noise_stability[]``."""

# One entry a line: a table, not reformatted.
# fmt: off
CORRELATION_COLUMNS: tuple[Column, ...] = (
    Column("measure", "The measure or bound column."),
    Column("target", "The column it is correlated with (the gap by default)."),
    Column("group", "`all`, or `method=NAME` for the rows of one method."),
    Column("n", "Pairs with both values finite."),
    Column("runs", "Distinct runs among them."),
    Column("{statistic}", "pearson_r, spearman_rho, kendall_tau."),
    Column("{test}_p", "pearson_p, spearman_p, kendall_p: two-sided p-values."),
    Column("{statistic}_ci_low, {statistic}_ci_high", "95% interval from a bootstrap that resamples runs (the measures also given per method)."),
)
# fmt: on


def value_at(document: Mapping[str, Any], source: str) -> Any:
    """The value at a dotted ``source`` path of a document (None where any part is absent)."""
    node: Any = document
    for key in source.split("."):
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


def copied(columns: Sequence[Column], document: Mapping[str, Any]) -> dict[str, Any]:
    """The columns with a ``source``, read from ``document``."""
    return {c.name: value_at(document, c.source) for c in columns if c.source}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _field_table(fields: Sequence[Field]) -> list[str]:
    lines = ["| field | type | unit | meaning |", "|---|---|---|---|"]
    for f in fields:
        when = "" if f.required else " *(not always present)*"
        lines.append(f"| `{f.path}` | {_cell(f.kind)} | {f.unit} | {_cell(f.meaning)}{when} |")
    return lines


def _column_table(columns: Sequence[Column], source_label: str) -> list[str]:
    lines = [f"| column | unit | {source_label} | meaning |", "|---|---|---|---|"]
    for c in columns:
        source = f"`{c.source}`" if c.source else "derived"
        lines.append(f"| `{c.name}` | {c.unit} | {source} | {_cell(c.meaning)} |")
    return lines


def render_markdown() -> str:
    """The text of ``docs/schema.md``."""
    lines = [
        "# Result files: measurement.json and the comparison tables",
        "",
        "<!-- generated by `python -m hessfine.analysis.doc_pages`; do not edit -->",
        "",
        f"Schema version {SCHEMA_VERSION}. Every field is declared once in "
        "`analysis/schema.py`, which the writer, `hessfine compare`, the figures and the report "
        "use; the tests check each written document against it. Paths: `.` separates keys, "
        "`[]` is every element of a list, `{…}` a key that varies (a layer's name counts as one "
        "key). `number` is an int or a float; `object*` an object whose keys are not declared "
        "one by one; `null` stands for a value not computed (JSON has no NaN or infinity: they "
        "are written as null too). Units: `loss` is the unit of the per-example loss (nats for "
        "cross-entropy); `weight units` those of the weights. How a value was computed is its "
        "*route*; schema version 1 names that field `method`.",
        "",
        f"## `{MEASUREMENT}`",
        "",
        "Written by `hessfine measure` for every checkpoint (atomically).",
        "",
        *_field_table(MEASUREMENT_FIELDS),
        "",
        f"## `{SPECTRUM}`",
        "",
        "Written beside it with `--density`: the stochastic-Lanczos-quadrature estimate of the "
        "eigenvalue density of the selected layers' mean-loss Hessian.",
        "",
        *_field_table(SPECTRUM_FIELDS),
        "",
        f"## `{COMPARISON_TABLE}`",
        "",
        "Written by `hessfine compare`: one row per measurement, joined with its run's "
        "manifest (`hessfine.json`) and metrics; the fixed columns come first in this order, "
        "then the families in order of appearance.",
        "",
        *_column_table(COMPARISON_COLUMNS, "from measurement.json"),
        "",
        f"## `{LAYERS_TABLE}`",
        "",
        *_column_table(LAYER_COLUMNS, "from layers[]"),
        "",
        f"## `{NOISE_TABLE}`",
        "",
        *_column_table(NOISE_COLUMNS, "from noise_stability[]"),
        "",
        f"## `{CORRELATIONS_TABLE}`",
        "",
        *_column_table(CORRELATION_COLUMNS, "source"),
        "",
    ]
    return "\n".join(lines)
