"""Models by name, and adapters that bring plain user modules to the batch-dict interface.

A built model's ``forward(batch: dict[str, Tensor]) -> dict[str, Tensor]``. ``name``
is a registry name (``convtasnet``) or a dotted path ``pkg.mod:Class``; with
``adapter`` the class is a plain module and the adapter (``ADAPTERS``, a class taking
the built module first, then its own keyword arguments) wraps it. Arguments are
checked against the constructor before anything is built, so a typo in a config
fails with the model name and the accepted arguments.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from raytrain.models.asr import CTCASR
from raytrain.models.av import AVTSEASR
from raytrain.models.music import MusicAE, MusicGenerator, SketchVQ
from raytrain.models.separation import SeparationAdapter, SeparationModel
from raytrain.models.vc import SpeakerEncoder, VCFlow
from raytrain.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
ADAPTERS: Registry[Callable[..., nn.Module]] = Registry("model adapter")

MODELS.register("convtasnet")(SeparationModel)
MODELS.register("ctc_asr")(CTCASR)
MODELS.register("vc_flow")(VCFlow)
MODELS.register("speaker_encoder")(SpeakerEncoder)
MODELS.register("music_ae")(MusicAE)
MODELS.register("sketch_vq")(SketchVQ)
MODELS.register("music_generator")(MusicGenerator)
MODELS.register("av_tse_asr")(AVTSEASR)
ADAPTERS.register("separation")(SeparationAdapter)


def _params(fn: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool] | None:
    """Keyword-passable parameters of ``fn`` and whether it takes ``**kwargs``; None if opaque."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = {
        n: p
        for n, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return params, var_kw


def _describe(params: Mapping[str, inspect.Parameter]) -> str:
    return ", ".join(
        n if p.default is inspect.Parameter.empty else f"{n}={p.default!r}" for n, p in params.items()
    )


def check_args(kind: str, name: str, fn: Callable[..., Any], args: Mapping[str, Any]) -> None:
    """Raise TypeError naming ``name`` and the accepted arguments if ``args`` do not fit ``fn``."""
    found = _params(fn)
    if found is None:
        return
    params, var_kw = found
    problems = []
    if not var_kw:
        for key in sorted(set(args) - set(params)):
            close = difflib.get_close_matches(key, params, n=1)
            problems.append(f"unknown argument {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in args]
    problems += [f"missing required argument {n!r}" for n in missing]
    if problems:
        raise TypeError(f"{kind} {name!r}: {'; '.join(problems)}. Accepted arguments: {_describe(params)}")


def build_model(name: str, args: Mapping[str, Any] | None = None, adapter: str | None = None) -> nn.Module:
    """Build model ``name`` from keyword ``args``, optionally wrapped by ``adapter``.

    With an adapter, the arguments the adapter's constructor names (after the module
    itself) go to the adapter; those the model's constructor also names go to both.
    """
    factory = MODELS.get(name)
    model_args = dict(args or {})
    if adapter is None:
        return _construct(name, factory, model_args)
    wrapper = ADAPTERS.get(adapter)
    found = _params(wrapper)
    wrap_params = list(found[0]) if found else []
    model_params = _params(factory)
    model_takes = set(model_params[0]) if model_params else set()
    wrap_args: dict[str, Any] = {}
    for key in wrap_params[1:]:
        if key in model_args:
            wrap_args[key] = model_args[key] if key in model_takes else model_args.pop(key)
    model = _construct(name, factory, model_args)
    if wrap_params:
        check_args("model adapter", adapter, wrapper, {wrap_params[0]: model, **wrap_args})
    return wrapper(model, **wrap_args)


def _construct(name: str, factory: Callable[..., nn.Module], args: dict[str, Any]) -> nn.Module:
    check_args("model", name, factory, args)
    model = factory(**args)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r} built a {type(model).__name__}, expected a torch.nn.Module")
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once); only ``requires_grad`` ones if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "ADAPTERS",
    "AVTSEASR",
    "CTCASR",
    "MODELS",
    "MusicAE",
    "MusicGenerator",
    "SeparationAdapter",
    "SeparationModel",
    "SketchVQ",
    "SpeakerEncoder",
    "VCFlow",
    "build_model",
    "check_args",
    "count_parameters",
]
