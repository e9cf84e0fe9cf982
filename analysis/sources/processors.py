"""Raw text and images of a ``datasets`` directory made into model inputs by the model's own
tokenizer or image processor (docs/inputs.md, "Raw text and images").

:class:`Processing` holds the options (``--text-column``, ``--text-pair-column``,
``--image-column``, ``--tokenizer``, ``--image-processor``, ``--max-length``) and the checkpoints
beside which a saved tokenizer or image processor is looked for; :func:`read_processed` reads a
directory with them:

- text: the tokenizer (``AutoTokenizer.from_pretrained(DIR, local_files_only=True)``, never
  remote code) tokenizes the column, or the pairs of two columns, truncated to ``max_length``
  tokens (default: the tokenizer's ``model_max_length``, at most :data:`MAX_LENGTH_CAP`; a
  tokenizer saved without a limit reports 10^30) and padded to the longest example with the
  tokenizer's pad token on its padding side (a tokenizer without a pad token pads with the model
  config's ``pad_token_id``, else its end-of-text token). ``x`` holds what the tokenizer gives:
  ``input_ids``, ``attention_mask`` and, where it makes them, ``token_type_ids``;
- images: every image of the column, converted to RGB (as transformers' image-classification
  example does), becomes ``pixel_values`` through the image processor
  (``AutoImageProcessor``) when it is read, batch by batch, as an ImageFolder is.

The tokenizer or image processor is the one given (``--tokenizer DIR``, ``--image-processor
DIR``), else the first one saved in the directories searched: the fine-tuned checkpoint's, then
the reference's (for a PEFT adapter, its base). Labels come from the label column (default
``label``, else ``labels``), or under ``--task causal-lm`` from the tokens
(:func:`hessfine.analysis.data.load_data` sets −100 at the padding). What was used is recorded
(``data.processor`` of ``measurement.json``, :func:`processor_record`).

Example:
    >>> Processing(text_column="text", max_length=128).searching(Path("ft/model.safetensors"))
    ... # doctest: +NORMALIZE_WHITESPACE
    Processing(text_column='text', text_pair_column=None, image_column=None, tokenizer=None,
               image_processor=None, max_length=128, search=(PosixPath('ft'),))
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from hessfine.analysis.errors import InputError
from hessfine.analysis.labeled_data import LabeledData
from hessfine.analysis.sources.files import one_line
from hessfine.analysis.sources.hf_datasets import default_label_column, open_dataset, read_labels
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "MAX_LENGTH_CAP",
    "Processed",
    "Processing",
    "add_processing_options",
    "processing_options",
    "processor_record",
    "read_processed",
]

MAX_LENGTH_CAP = 1024
"""The longest default truncation length, in tokens (``--max-length`` may ask for more)."""


@dataclass(frozen=True)
class _Kind:
    """A kind of processor: its record name, option, transformers auto class and saved files."""

    name: str
    option: str
    loader: str
    files: tuple[str, ...]

    @property
    def words(self) -> str:
        return self.name.replace("_", " ")


TOKENIZER = _Kind(
    "tokenizer", "--tokenizer", "AutoTokenizer", ("tokenizer_config.json", "tokenizer.json")
)
IMAGE_PROCESSOR = _Kind(
    "image_processor", "--image-processor", "AutoImageProcessor", ("preprocessor_config.json",)
)


@dataclass(frozen=True)
class Processing:
    """How raw columns become model inputs: the raw columns, the tokenizer or image-processor
    directory when given, the truncation length (tokens; ``None``: the default of the module
    docs), and the directories searched for a saved one otherwise, in order."""

    text_column: str | None = None
    text_pair_column: str | None = None
    image_column: str | None = None
    tokenizer: str | Path | None = None
    image_processor: str | Path | None = None
    max_length: int | None = None
    search: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        text, image = self.text_column is not None, self.image_column is not None
        checks = [
            (not (text and image), "--text-column and --image-column exclude each other"),
            (
                self.text_pair_column is None or text,
                "--text-pair-column needs --text-column (the first text of each pair)",
            ),
            (
                text or (self.tokenizer is None and self.max_length is None),
                "--tokenizer and --max-length apply to raw text; pass --text-column COL",
            ),
            (
                image or self.image_processor is None,
                "--image-processor applies to raw images; pass --image-column COL",
            ),
            (
                self.max_length is None or self.max_length >= 1,
                f"--max-length must be a positive integer, got {self.max_length}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    @property
    def active(self) -> bool:
        """Whether a raw column is to be processed."""
        return self.text_column is not None or self.image_column is not None

    def columns(self) -> list[tuple[str, str]]:
        """``(option, column)`` of every raw column named."""
        named = [
            ("--text-column", self.text_column),
            ("--text-pair-column", self.text_pair_column),
            ("--image-column", self.image_column),
        ]
        return [(option, column) for option, column in named if column is not None]

    def searching(self, *checkpoints: str | Path) -> Processing:
        """These options with the directories of ``checkpoints`` (a file stands for its
        directory) searched after those already listed."""
        found = [Path(c) if Path(c).is_dir() else Path(c).parent for c in checkpoints]
        return replace(self, search=tuple(dict.fromkeys([*self.search, *found])))


@dataclass(frozen=True)
class Processed:
    """Processed examples: inputs ``x`` held in memory (text) or ``dataset`` read lazily
    (images), labels ``y`` (``None``: from the tokens), and the ``record`` of what made them."""

    x: dict[str, Tensor] | None
    y: Tensor | None
    dataset: Dataset | None
    record: dict[str, Any]


def read_processed(
    spec: str,
    processing: Processing,
    *,
    label_column: str | None = None,
    pad_token_id: int | None = None,
    labels_from_tokens: bool = False,
    label: str = "--data",
) -> Processed:
    """The raw columns of the ``datasets`` directory ``spec`` through the tokenizer or image
    processor (module docs). ``pad_token_id`` is the model config's; ``labels_from_tokens``
    (``--task causal-lm``) leaves the labels to the tokens."""
    where = f"{label} {spec}"
    if labels_from_tokens and processing.image_column is not None:
        raise InputError(
            f"{where}: --task causal-lm reads text; pass --text-column, not --image-column"
        )
    if labels_from_tokens and label_column is not None:
        raise InputError(
            f"{where}: under --task causal-lm the labels are the tokens of --text-column; drop "
            "--label-column"
        )
    dataset = open_dataset(spec, label)
    columns = list(dataset.column_names)
    for option, column in processing.columns():
        if column not in columns:
            raise InputError(
                f"{where}: no column {column!r} (columns: {', '.join(columns)}); name the raw "
                f"column with {option} COL"
            )
    if len(dataset) == 0:
        raise InputError(f"{where}: the data set is empty; pass data with at least one example")
    y = None if labels_from_tokens else _labels(dataset, label_column, where, spec, label)
    if processing.image_column is not None:
        return _images(dataset, processing, y, where)
    return _text(dataset, processing, y, pad_token_id, where)


def processor_record(train: LabeledData, evaluation: LabeledData | None) -> dict[str, Any]:
    """``{"processor": ...}`` for ``data`` of ``measurement.json``: the record of the processor
    that made the training inputs, a tokenizer's ``truncated`` examples per split; ``{}`` when
    the inputs were read as stored."""
    if train.processor is None:
        return {}
    record = dict(train.processor)
    if "truncated" in record:
        made = None if evaluation is None else evaluation.processor
        record["truncated"] = {
            "train": record["truncated"],
            "eval": None if made is None else made["truncated"],
        }
    return {"processor": record}


def _labels(dataset: Any, given: str | None, where: str, spec: str, label: str) -> Tensor:
    """The label column ``given`` (default ``label``, else ``labels``) as a tensor."""
    columns = list(dataset.column_names)
    target = given or default_label_column(columns)
    if target not in columns:
        raise InputError(
            f"{where}: no label column {given or 'label'!r} (columns: {', '.join(columns)}); "
            "name it with --label-column COL"
        )
    return read_labels(dataset, target, spec, label)


def _text(
    dataset: Any, processing: Processing, y: Tensor | None, config_pad: int | None, where: str
) -> Processed:
    """Tokenized, truncated and padded text (module docs)."""
    names = [c for c in (processing.text_column, processing.text_pair_column) if c is not None]
    texts = [_strings(dataset, name, where) for name in names]
    path = _find(TOKENIZER, processing.tokenizer, processing.search, where)
    tokenizer = _load(TOKENIZER, path)
    pad = _pad_token(tokenizer, config_pad, path)
    max_length = processing.max_length or min(int(tokenizer.model_max_length), MAX_LENGTH_CAP)
    try:
        lengths = tokenizer(*texts, verbose=False, return_length=True)["length"]
        encoded = tokenizer(
            *texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt"
        )
    except Exception as err:  # a tokenizer's refusal (e.g. no room for the special tokens)
        raise InputError(
            f"{where}: the tokenizer in {path} cannot tokenize {', '.join(names)} "
            f"({one_line(err)[:300]}); check --max-length and the tokenizer"
        ) from None
    record = {
        "kind": TOKENIZER.name,
        "class": type(tokenizer).__name__,
        "path": str(path),
        "columns": names,
        "max_length": max_length,
        "padding_side": tokenizer.padding_side,
        "pad_token_id": pad,
        "truncated": sum(int(n) > max_length for n in lengths),
    }
    return Processed({k: v.long() for k, v in encoded.items()}, y, None, record)


def _images(dataset: Any, processing: Processing, y: Tensor | None, where: str) -> Processed:
    """Images read lazily through the image processor (module docs)."""
    import datasets

    column = str(processing.image_column)
    feature = dataset.features[column]
    if not isinstance(feature, datasets.Image):
        raise InputError(
            f"{where}: column {column!r} holds {feature}, not images; cast it with "
            f"dataset.cast_column({column!r}, datasets.Image()) or name the image column"
        )
    path = _find(IMAGE_PROCESSOR, processing.image_processor, processing.search, where)
    processor = _load(IMAGE_PROCESSOR, path)
    images = _ProcessedImages(dataset.select_columns([column]), column, processor, where)
    record = {
        "kind": IMAGE_PROCESSOR.name,
        "class": type(processor).__name__,
        "path": str(path),
        "columns": [column],
    }
    return Processed(None, y, images, record)


class _ProcessedImages(Dataset):
    """The images of one column, each converted to RGB and made ``pixel_values`` by the image
    processor when read; items are ``(pixel_values, 0)`` (the labels are held apart)."""

    def __init__(self, rows: Any, column: str, processor: Any, where: str):
        self.rows, self.column, self.processor, self.where = rows, column, processor, where

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        try:
            image = self.rows[index][self.column].convert("RGB")
            pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        except (OSError, ValueError, TypeError) as err:
            raise InputError(
                f"{self.where}: image {index} of column {self.column!r} cannot be processed "
                f"({one_line(err)[:300]}); replace it or check the image processor"
            ) from None
        return pixels[0], 0


def _find(kind: _Kind, given: str | Path | None, search: Sequence[Path], where: str) -> Path:
    """The directory of the tokenizer or image processor: ``given``, else the first directory of
    ``search`` that holds one of its saved files."""
    if given is not None:
        path = Path(given).expanduser()
        if not any((path / name).is_file() for name in kind.files):
            raise InputError(
                f"{kind.option} {given}: no {' or '.join(kind.files)} there; pass a directory "
                f"written by the {kind.words}'s save_pretrained"
            )
        return path
    for directory in search:
        if any((directory / name).is_file() for name in kind.files):
            return directory
    looked = f" saved in {' or '.join(map(str, search))}" if search else " given"
    raise InputError(
        f"{where}: no {kind.words}{looked}; pass {kind.option} DIR (a directory written by the "
        f"{kind.words}'s save_pretrained)"
    )


def _load(kind: _Kind, path: Path) -> Any:
    """The tokenizer or image processor saved in ``path``: local files only, no remote code."""
    import transformers

    loader = getattr(transformers, kind.loader)
    try:
        return loader.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # unreadable, foreign or remote-code files: the user's to fix
        raise InputError(
            f"{kind.option} {path}: cannot load the {kind.words} ({one_line(err)[:300]}); save "
            "it again with save_pretrained"
        ) from None


def _strings(dataset: Any, column: str, where: str) -> list[str]:
    """The text column ``column`` as a list of strings."""
    feature = dataset.features[column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise InputError(
            f"{where}: column {column!r} holds {feature}, not text; name a text column with "
            "--text-column (token ids: --input-columns)"
        )
    values = dataset.with_format("arrow")[column].to_pylist()
    if None in values:
        raise InputError(f"{where}: column {column!r} has missing values; fill or drop them")
    return values


def _pad_token(tokenizer: Any, config_pad: int | None, path: Path) -> int:
    """The id the tokenizer pads with: its own pad token, else the model config's
    ``pad_token_id``, else its end-of-text token (set on the tokenizer)."""
    if tokenizer.pad_token_id is None:
        fallback = config_pad if config_pad is not None else tokenizer.eos_token_id
        if fallback is None:
            raise InputError(
                f"the tokenizer in {path} has no pad token and the model config no pad_token_id; "
                "set tokenizer.pad_token and save it again, or set pad_token_id in config.json"
            )
        tokenizer.pad_token_id = fallback
    return int(tokenizer.pad_token_id)


def add_processing_options(parser: Any) -> None:
    """The raw-column options of ``hessfine measure`` and ``hessfine finetune`` on ``parser``
    (a parser or an argument group)."""
    add = parser.add_argument
    add(
        "--text-column",
        metavar="COL",
        help="datasets directory: raw text, tokenized by the model's saved tokenizer",
    )
    add("--text-pair-column", metavar="COL", help="datasets directory: second text of a pair")
    add(
        "--image-column",
        metavar="COL",
        help="datasets directory: images, made pixel_values by the model's saved image processor",
    )
    add(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer directory (default: the one saved beside the checkpoint, else the "
        "reference)",
    )
    add(
        "--image-processor",
        metavar="DIR",
        help="image processor directory (default: as --tokenizer)",
    )
    add(
        "--max-length",
        type=int,
        metavar="N",
        help=f"truncate text to N tokens (default: the tokenizer's model_max_length, at most "
        f"{MAX_LENGTH_CAP})",
    )


def processing_options(args: argparse.Namespace) -> Processing | None:
    """The :class:`Processing` of the parsed options of :func:`add_processing_options`, ``None``
    when none is given."""
    options = {f.name: getattr(args, f.name) for f in fields(Processing) if f.name != "search"}
    if all(value is None for value in options.values()):
        return None
    return Processing(**options)
