"""Build the network architecture named by a model spec (docs/inputs.md, "Model specs").

A spec names an architecture only; weights come from a checkpoint later
(:func:`hessfine.analysis.checkpoints.align`). Every model is built with random initialisation — nothing is
downloaded — and returned in eval mode with float32 parameters and buffers.

Specs:

- ``torchvision:NAME`` — ``torchvision.models.get_model(NAME, weights=None, **kwargs)``;
  valid names: ``python -c "import torchvision; print(torchvision.models.list_models())"``.
- ``timm:NAME`` — ``timm.create_model(NAME, pretrained=False, **kwargs)`` (extra ``hessfine[timm]``);
  valid names: ``python -c "import timm; print(timm.list_models())"``.
- ``hf:DIR`` or ``hf`` — a Hugging Face directory holding ``config.json`` (``hf`` alone means the
  checkpoint directory, passed as ``hf_directory``). The class is the one named in
  ``config.architectures`` (e.g. ``BertForSequenceClassification``, ``GPT2LMHeadModel``), else
  ``AutoModelForSequenceClassification``, ``AutoModelForImageClassification`` or
  ``AutoModelForCausalLM``; kwargs override config attributes. Attention is transformers' default
  implementation (``sdpa`` today; ``{"attn_implementation": "eager"}`` selects another); the
  estimators run it with the differentiable math kernel and pass attention masks already
  expanded (:mod:`hessfine.bounds.functional`), and the measurement records the implementation.
  The experts of mixture-of-experts models run as ``batched_mm`` (``experts_implementation``
  selects another), recorded too. Remote code is never executed. A measurement loads the weights
  of such a directory with transformers' own loader (:mod:`hessfine.analysis.hf_loading`).
- ``path/to/file.py:FACTORY`` — the file is imported by path and ``FACTORY(**kwargs)`` called.
- ``package.module:FACTORY`` — ``importlib.import_module`` (the current directory is searched
  too), then ``FACTORY(**kwargs)``.

Example:
    >>> model = build_model("torchvision:resnet18", parse_model_kwargs('{"num_classes": 10}'))
    >>> model.fc.out_features, model.training
    (10, False)
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from hessfine.analysis.errors import InputError
from torch import nn

__all__ = ["build_model", "parse_model_kwargs"]


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """Parse ``--model-kwargs``: a JSON object (``None`` or empty text gives ``{}``).

    Example:
        >>> parse_model_kwargs('{"num_classes": 10}')
        {'num_classes': 10}
    """
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(
            f"--model-kwargs {text!r} is not valid JSON ({err.msg} at column {err.colno}); "
            "pass an object such as '{\"num_classes\": 10}'"
        ) from None
    if not isinstance(value, dict):
        raise InputError(
            f"--model-kwargs must be a JSON object, got {type(value).__name__}; "
            "pass an object such as '{\"num_classes\": 10}'"
        )
    return value


def build_model(
    spec: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    hf_directory: str | Path | None = None,
) -> nn.Module:
    """Build the (randomly initialised) architecture named by ``spec``; eval mode, float32.

    ``hf_directory`` is the directory that the bare spec ``hf`` refers to (usually the checkpoint
    directory). Any failure the user can fix raises :class:`InputError` with one line.
    """
    spec = spec.strip()
    options = dict(kwargs or {})
    source, _, rest = spec.partition(":")
    if source == "torchvision" and rest:
        model = _torchvision(spec, rest, options)
    elif source == "timm" and rest:
        model = _timm(spec, rest, options)
    elif source == "hf":
        directory = rest or hf_directory
        if not directory:
            raise InputError(
                "--model hf needs a Hugging Face directory: point CHECKPOINT at a directory "
                "holding config.json, or pass --model hf:DIR"
            )
        model = _huggingface(spec, Path(directory).expanduser(), options)
    else:
        target, sep, factory_name = spec.rpartition(":")
        if not sep or not target or not factory_name.isidentifier():
            raise InputError(
                f"--model {spec!r} is not a model spec; use torchvision:NAME, timm:NAME, hf[:DIR], "
                "path/to/file.py:FACTORY or package.module:FACTORY"
            )
        if target.endswith(".py"):
            module = _import_file(spec, Path(target))
        else:
            module = _import_module(spec, _LEGACY_MODULES.get(target, target))
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            raise InputError(
                f"--model {spec!r}: {target} has no callable {factory_name!r}; "
                "name a function or class that returns an nn.Module"
            )
        model = _call(spec, factory, options)
    if not isinstance(model, nn.Module):
        raise InputError(
            f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module; "
            "make the factory return the network"
        )
    return model.float().eval()


#: --model-kwargs entries of a Hugging Face model that choose an implementation, not a config
#: attribute.
HF_IMPLEMENTATIONS = ("attn_implementation", "experts_implementation")
#: The experts implementation of mixture-of-experts models unless --model-kwargs names another:
#: transformers' default kernels reject float64 (``grouped_mm``) or ``vmap`` (``eager``).
BATCHED_EXPERTS = "batched_mm"

#: Module paths that run manifests of earlier versions name (before the folders were installed
#: under ``hessfine``, and before ``finetune.models`` was renamed ``finetune.digit_networks``).
_LEGACY_MODULES = {
    "finetune.models": "hessfine.finetune.digit_networks",
    "hessfine.finetune.models": "hessfine.finetune.digit_networks",
}


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _call(spec: str, factory: Callable[..., Any], options: dict[str, Any]) -> Any:
    try:
        return factory(**options)
    except Exception as err:  # the user's factory: any failure is theirs to fix
        raise InputError(
            f"--model {spec!r} failed to build ({_one_line(err)}); check the spec and --model-kwargs"
        ) from None


def _unknown_name(spec: str, name: str, known: list[str], listing: str) -> InputError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return InputError(
        f"--model {spec!r}: unknown model {name!r}{hint}; list valid names with {listing}"
    )


def _torchvision(spec: str, name: str, options: dict[str, Any]) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        raise _unknown_name(
            spec,
            name,
            known,
            'python -c "import torchvision; print(torchvision.models.list_models())"',
        )
    if options.setdefault("weights", None) is not None:
        raise InputError(
            f"--model {spec!r}: weights come from the checkpoint, not from downloads; "
            "remove 'weights' from --model-kwargs"
        )
    return _call(spec, lambda **kw: torchvision.models.get_model(name, **kw), options)


def _timm(spec: str, name: str, options: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise InputError(
            f"--model {spec!r} needs timm; install it with pip install 'hessfine[timm]'"
        ) from None
    if not timm.is_model(name):
        raise _unknown_name(
            spec, name, timm.list_models(), 'python -c "import timm; print(timm.list_models())"'
        )
    if options.setdefault("pretrained", False):
        raise InputError(
            f"--model {spec!r}: weights come from the checkpoint, not from downloads; "
            "remove 'pretrained' from --model-kwargs"
        )
    return _call(spec, lambda **kw: timm.create_model(name, **kw), options)


def _huggingface(spec: str, directory: Path, options: dict[str, Any]) -> nn.Module:
    config = hf_config(spec, directory, options)
    model_class = hf_model_class(spec, config)
    return _call(spec, lambda: model_class(config), {})


def hf_config(spec: str, directory: Path, options: Mapping[str, Any]) -> Any:
    """The config of the Hugging Face directory ``directory`` with ``options`` (--model-kwargs)
    set on it: ``attn_implementation`` and ``experts_implementation`` choose the implementations
    (module docs), every other entry overrides a config attribute."""
    try:
        import transformers
    except ImportError:
        raise InputError(
            f"--model {spec!r} needs transformers; install it with pip install 'hessfine[text]'"
        ) from None
    if not (directory / "config.json").is_file():
        raise InputError(
            f"--model {spec!r}: {directory} has no config.json; point it at a Hugging Face "
            "model directory (as written by save_pretrained)"
        )
    chosen = {key: options.get(key) for key in HF_IMPLEMENTATIONS}
    chosen["experts_implementation"] = chosen["experts_implementation"] or BATCHED_EXPERTS
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(directory), local_files_only=True, **chosen
        )
    except Exception as err:  # malformed or unsupported config.json
        raise InputError(
            f"--model {spec!r}: cannot read {directory / 'config.json'} ({_one_line(err)}); "
            "check the file or upgrade transformers"
        ) from None
    for key, value in options.items():
        if key not in HF_IMPLEMENTATIONS:
            setattr(config, key, value)
    return config


def hf_implementations(config: Any) -> dict[str, str | None]:
    """The attention and experts implementations that ``config`` asks for (``None``: the
    model's default), as keyword arguments of ``from_pretrained``."""
    return {key: getattr(config, f"_{key}", None) for key in HF_IMPLEMENTATIONS}


def hf_model_class(spec: str, config: Any) -> type[nn.Module]:
    """The transformers class that ``config`` names in ``architectures``, else the first of the
    sequence-classification, image-classification and causal-LM Auto mappings that covers it."""
    import transformers

    named = [getattr(transformers, name, None) for name in config.architectures or []]
    classes = [
        c for c in named if isinstance(c, type) and issubclass(c, transformers.PreTrainedModel)
    ]
    if classes:
        return classes[0]
    mappings = (
        transformers.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
        transformers.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING,
        transformers.MODEL_FOR_CAUSAL_LM_MAPPING,
    )
    for mapping in mappings:
        if type(config) in mapping:
            return mapping[type(config)]
    raise InputError(
        f"--model {spec!r}: no classification or causal-LM model for config type "
        f"{type(config).__name__}; set 'architectures' in config.json to a transformers class name"
    )


def _import_file(spec: str, path: Path) -> ModuleType:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise InputError(f"--model {spec!r}: no such file {path}; check the path before ':'")
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    name = f"hessfine_user_model_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"--model {spec!r}: cannot import {path}; it must be a Python source file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's file: any failure is theirs to fix
        del sys.modules[name]
        raise InputError(f"--model {spec!r}: importing {path} failed ({_one_line(err)})") from None
    return module


def _import_module(spec: str, name: str) -> ModuleType:
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(err.name + ".")):
            raise InputError(
                f"--model {spec!r}: no module named {name!r}; install it, run from its parent "
                "directory, or use path/to/file.py:FACTORY"
            ) from None
        raise InputError(f"--model {spec!r}: importing {name} failed ({_one_line(err)})") from None
    except Exception as err:  # the user's module: any failure is theirs to fix
        raise InputError(f"--model {spec!r}: importing {name} failed ({_one_line(err)})") from None
    finally:
        if added:
            sys.path.remove(cwd)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(
            f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device
