"""The dataset columns a phase needs, from what its model, losses, metrics and transforms declare.

``needed_columns`` starts from the batch keys the model, losses and metrics read, walks the
transforms from the last to the first (a key a transform makes is replaced by the keys it is made
from, and its own reads are added), and drops what the collate makes (``lengths``,
``<key>_lengths``). What is left must be columns of the dataset: ``missing_columns`` says which
are not, ``ColumnNeeds.to_read`` which to read. The declarations are in ``raytrain.data.columns``.

For a train phase, pass its ``transforms`` and the losses (metrics are scored on eval batches);
for its eval dataset, ``eval_transforms``, the losses and the metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from raytrain.data.columns import ColumnNeeds, collate_source, declared_makes, declared_reads, missing_columns

__all__ = ["ColumnNeeds", "missing_columns", "needed_columns", "phase_needs"]


def _name_args(part: Any) -> tuple[Any, dict[str, Any]]:
    """(name or object, args) of a config entry: a pydantic config, a dict, a name, or the part itself."""
    if isinstance(part, Mapping):
        return part["name"], dict(part.get("args") or {})
    if hasattr(part, "name") and hasattr(part, "args") and isinstance(part.name, str):
        return part.name, dict(part.args or {})
    return part, {}


def _label(obj: Any) -> str:
    return obj if isinstance(obj, str) else getattr(obj, "__name__", type(obj).__name__)


def _model_reads(model: Any) -> tuple[str, tuple[str, ...] | None]:
    from raytrain.models import ADAPTERS, MODELS

    name, args = _name_args(model)
    adapter = model.get("adapter") if isinstance(model, Mapping) else getattr(model, "adapter", None)
    target = MODELS.get(name) if isinstance(name, str) else name
    if isinstance(adapter, str):  # the adapter's forward is what reads the batch
        wrapped = declared_reads(ADAPTERS.get(adapter), args)
        if wrapped is not None:
            return f"model {_label(name)} (adapter {adapter})", wrapped
    return f"model {_label(name)}", declared_reads(target, args)


def needed_columns(model: Any, losses: Iterable[Any] = (), metrics: Iterable[Any] = (),
                   transforms: Iterable[Any] = ()) -> ColumnNeeds:
    """The dataset columns a phase needs (see the module docstring).

    ``model``: a ``ModelConfig`` (or ``{"name", "args", "adapter"}``, a registry name, a dotted path or
    the model class); ``losses``, ``metrics``: registry names or dotted paths (a ``losses`` dict gives its
    names) or the functions; ``transforms``: ``TransformConfig``s, ``{"name", "args"}`` dicts, names or
    classes, in the order they run.
    """
    from raytrain.data.transforms import TRANSFORMS
    from raytrain.losses import LOSSES
    from raytrain.metrics import METRICS

    wants: dict[str, list[str]] = {}
    complete = True

    def want(keys: Iterable[str], why: str) -> None:
        for k in keys:
            wants.setdefault(k, []).append(why)

    parts: list[tuple[str, tuple[str, ...] | None]] = [_model_reads(model)]
    for kind, registry, items in (("loss", LOSSES, losses), ("metric", METRICS, metrics)):
        for item in items:
            name, args = _name_args(item)
            fn = registry.get(name) if isinstance(name, str) else name
            parts.append((f"{kind} {_label(name)}", declared_reads(fn, args)))
    for why, keys in parts:
        if keys is None:
            complete = False
        else:
            want(keys, why)
    for item in reversed(list(transforms)):
        name, args = _name_args(item)
        cls = TRANSFORMS.get(name) if isinstance(name, str) else name
        label = f"transform {_label(name)}"
        makes = declared_makes(cls, args)
        if makes is None:  # it may make any key: nothing after it is known to come from the dataset
            wants, complete = {}, False
            continue
        before: dict[str, list[str]] = {}
        for key, whys in wants.items():
            if key in makes:
                for src in makes[key]:
                    before.setdefault(src, []).extend(f"{w} (via {label})" for w in whys)
            else:
                before.setdefault(key, []).extend(whys)
        wants = before
        want(declared_reads(cls, args) or (), label)
    columns: dict[str, list[str]] = {}
    for key, whys in wants.items():
        column = collate_source(key)
        if column is not None:
            columns.setdefault(column, []).extend(whys)
    return ColumnNeeds(frozenset(columns), complete, {k: tuple(dict.fromkeys(v)) for k, v in columns.items()})


def phase_needs(model: Any, phase: Any) -> dict[str, ColumnNeeds]:
    """``{"train": ..., "eval": ...}``: the needs of a phase config's train datasets (its ``transforms``
    and losses) and of its eval dataset (``eval_transforms``, losses and metrics); a key is absent when
    the phase has no such datasets. ``model``: the phase's ``ModelConfig`` (``pipe.phase_model(phase)``)."""
    losses = list(getattr(phase, "losses", None) or {})
    module_losses = [n for m in (getattr(phase, "modules", None) or {}).values() for n in m.losses]
    out = {}
    if getattr(phase, "train", None):
        out["train"] = needed_columns(model, list(dict.fromkeys(losses + module_losses)), [],
                                      getattr(phase, "transforms", None) or [])
    if getattr(phase, "eval", None):
        out["eval"] = needed_columns(model, losses, getattr(phase, "metrics", None) or [],
                                     getattr(phase, "eval_transforms", None) or [])
    return out
