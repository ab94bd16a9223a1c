"""YAML -> validated `PipelineConfig`: `-o key=value` overrides, phase defaults, readable errors."""

from __future__ import annotations

import copy
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raytrain.config.schema import PHASE_CONFIGS, PipelineConfig, phase_kind_of


class ConfigError(ValueError):
    """A config problem; the message names the key path and the fix."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`phases.1.optim.lr=3e-4` -> (['phases', '1', 'optim', 'lr'], 0.0003). Values are YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. phases.1.optim.lr=3e-4)")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML 1.1 reads "3e-4" as a string; numbers are what users mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return [p for p in key.strip().split(".")], value


def _child_key(node: Any, part: str, path: str) -> Any:
    """Index into a list by position or by an element's `name` (phases.multitask.optim.lr)."""
    if isinstance(node, list):
        if part.lstrip("-").isdigit():
            idx = int(part)
            if not -len(node) <= idx < len(node):
                raise ConfigError(f"override {path}: index {idx} out of range (there are {len(node)})")
            return idx
        names = [n.get("name") for n in node if isinstance(n, dict)]
        if part in names:
            return names.index(part)
        close = difflib.get_close_matches(part, [str(n) for n in names], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"override {path}: no list entry named {part!r}{hint} (names: {names})")
    return part


def apply_override(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    node: Any = raw
    path = ".".join(parts)
    for i, part in enumerate(parts):
        key = _child_key(node, part, path)
        last = i == len(parts) - 1
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and (key not in node or node[key] is None):
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict | list):
                raise ConfigError(f"override {path}: {'.'.join(parts[: i + 1])} is a value, not a section")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Dicts merge recursively; anything else in `over` replaces `base`."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _model_at(loc: tuple[Any, ...], raw: dict[str, Any] | None = None) -> type[BaseModel] | None:
    """The config model class that holds the key at `loc[-1]` (a phase's model is its kind's)."""
    cls: Any = PipelineConfig
    node: Any = raw
    for i, part in enumerate(loc[:-1]):
        if isinstance(node, dict | list):
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
        else:
            node = None
        if isinstance(part, int) or cls is None:
            if i == 1 and loc[0] == "phases":  # the phase's own model: by its kind
                cls = PHASE_CONFIGS.get(phase_kind_of(node if isinstance(node, dict) else {}))
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        cls = _unwrap(cls.model_fields[part].annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap(ann: Any) -> Any:
    """First BaseModel class inside Optional/list/dict/Union annotations."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    origin = typing.get_origin(ann)
    if origin in (list, dict, typing.Union, types.UnionType):
        for arg in typing.get_args(ann):
            found = _unwrap(arg)
            if found is not None:
                return found
    return None


def _loc_text(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    out: list[str] = []
    node: Any = raw
    for part in loc:
        if isinstance(part, int):
            label = f"[{part}]"
            if isinstance(node, list) and part < len(node) and isinstance(node[part], dict):
                name = node[part].get("name")
                label = f"[{part}]" + (f"({name})" if name else "")
            out.append(label)
        elif str(part).startswith("function-after["):
            continue
        else:
            out.append(("." if out else "") + str(part))
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return "".join(out)


def _drop_kind_tag(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """pydantic puts the phase's kind (the union's tag) after `phases.<i>`: not a key of the user's data."""
    if len(loc) > 2 and loc[0] == "phases" and isinstance(loc[1], int) and loc[2] in PHASE_CONFIGS:
        return loc[:2] + loc[3:]
    return loc


def format_validation_error(err: ValidationError, raw: dict[str, Any], source: str) -> str:
    errors = []
    for e in err.errors():
        errors.append((_real_loc(_drop_kind_tag(e["loc"]), raw, missing=e["type"] == "missing"), e))
    # For a union, keep the errors of the member the user evidently meant (the deeper ones).
    errors = [(loc, e) for loc, e in errors
              if not any(len(o) > len(loc) and o[: len(loc)] == loc for o, _ in errors)]
    lines = [f"{source}: invalid config ({len(errors)} problem{'s' * (len(errors) > 1)})"]
    for loc, e in errors:
        where = _loc_text(loc, raw) or "<top level>"
        if e["type"] == "extra_forbidden":
            model = _model_at(loc, raw)
            valid = sorted(model.model_fields) if model else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            owner = ""
            if len(loc) == 3 and loc[0] == "phases" and model is not None:
                kind = phase_kind_of(_at(raw, loc[:2]) or {})
                others = [k for k, m in PHASE_CONFIGS.items() if loc[-1] in m.model_fields]
                owner = (f" ({loc[-1]!r} is a key of {' and '.join(others)} phases, not of {kind} phases)"
                         if others else "")
            lines.append(f"  {where}: unknown key{owner}.{hint} Valid keys here: {', '.join(valid)}")
        elif e["type"] == "union_tag_invalid":
            tag = str(e["ctx"].get("tag", ""))
            close = difflib.get_close_matches(tag, list(PHASE_CONFIGS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            lines.append(f"  {where}.kind: unknown phase kind {tag!r}.{hint} Kinds: {', '.join(PHASE_CONFIGS)}")
        elif e["type"] == "missing":
            lines.append(f"  {where}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {msg} (got {e.get('input')!r})" if e["type"] != "value_error" else f"  {where}: {msg}")
    return "\n".join(lines)


def _at(raw: Any, loc: tuple[Any, ...]) -> Any:
    node = raw
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _real_loc(loc: tuple[Any, ...], raw: Any, missing: bool) -> tuple[Any, ...]:
    """Drop pydantic's union-member tags ("str", "InitFromConfig", "function-after[...]") from a
    location by walking the user's own data: a part that is a key of the data is real."""
    out: list[Any] = []
    node = raw
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif last and missing and isinstance(part, str) and not part.startswith("function-"):
            out.append(part)  # a required key the user left out
        elif not isinstance(node, dict | list) or isinstance(part, int) or part not in node:
            # The data was reshaped by a validator (e.g. `train: {a: 1}` became a list): keep what
            # does not look like a union tag.
            if isinstance(part, int) or not (part.startswith(("function-", "literal[")) or part[:1].isupper()
                                             or part in ("str", "int", "float", "bool", "list[str]")):
                out.append(part)
            node = None
    return tuple(out)



def _inherit_default(raw: dict[str, Any], parts: list[str]) -> None:
    """An override deeper than a key the phase takes from `defaults` (`phases.b.transforms.0.args.x`
    where only `defaults.transforms` exists) first copies the default into the phase, so the override
    changes that phase's inherited value instead of replacing it with a stub."""
    phases, defaults = raw.get("phases"), raw.get("defaults")
    if len(parts) < 4 or parts[0] != "phases" or not isinstance(phases, list) or not isinstance(defaults, dict):
        return
    try:
        phase = phases[_child_key(phases, parts[1], ".".join(parts))]
    except ConfigError:
        return
    keys = _kind_keys(phase)
    if isinstance(phase, dict) and parts[2] not in phase and parts[2] in defaults and (keys is None or parts[2] in keys):
        phase[parts[2]] = copy.deepcopy(defaults[parts[2]])


def _kind_keys(phase: Any) -> set[str] | None:
    """The keys a phase's kind has (None for an unknown kind: validation names it)."""
    model = PHASE_CONFIGS.get(phase_kind_of(phase)) if isinstance(phase, dict) else None
    return set(model.model_fields) if model is not None else None


def _merge_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Each phase takes the `defaults:` keys its kind has (an export phase takes no `optim`)."""
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError("defaults: must be a mapping of phase keys (e.g. {batch_size: 8, optim: {lr: 1e-3}})")
    known = set().union(*(m.model_fields for m in PHASE_CONFIGS.values())) - {"name", "kind"}
    unknown = [k for k in defaults if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"defaults.{unknown[0]}: no phase kind has this key.{hint} Phase keys: "
                          f"{', '.join(sorted(known))}")
    phases = raw.get("phases")
    if isinstance(phases, list):
        raw = dict(raw)
        merged = []
        for p in phases:
            keys = _kind_keys(p)
            if isinstance(p, dict):
                own = {k: v for k, v in defaults.items() if keys is None or k in keys}
                merged.append(deep_merge(own, p))
            else:
                merged.append(p)
        raw["phases"] = merged
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last silently, so a
    second `gates:` pasted into a phase would replace the first without a word. Merge keys (`<<: *anchor`)
    work as in YAML 1.1: the mapping's own keys win over the merged ones."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first at line {seen[key].start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node
        self.flatten_mapping(node)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content; a missing file, bad YAML or a key given twice in one mapping is a ConfigError
    naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} file not found")
    try:
        return yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                raw: dict[str, Any] | None = None) -> PipelineConfig:
    """Read YAML (or take `raw`), apply overrides, merge phase defaults, validate."""
    source = str(path) if path is not None else "<config>"
    if raw is None:
        if path is None:
            raise ConfigError("load_config needs a path or a raw dict")
        raw = read_yaml(path, "config")
    raw = copy.deepcopy(raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with name, data, model, phases")
    for text in overrides or []:
        parts, value = parse_override(text)
        _inherit_default(raw, parts)
        apply_override(raw, parts, value)
    merged = _merge_defaults(raw)
    try:
        cfg = PipelineConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, merged, source)) from None
    cfg._raw = raw
    return cfg


def validate_update(cfg: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """Re-validate after overrides (sweeps): never `model_copy(update=...)`, which skips validation."""
    raw = cfg._raw if cfg._raw is not None else cfg.model_dump(mode="json")
    return load_config(raw=raw, overrides=overrides)


def with_values(cfg: PipelineConfig, values: dict[str, Any], source: str = "<sweep>") -> PipelineConfig:
    """`cfg` with each dotted path set to a Python value (a sampled sweep config), re-validated by the
    same models as a normal run; an error names the path and says it came from the sweep."""
    raw = set_values(cfg._raw if cfg._raw is not None else cfg.model_dump(mode="json"), values)
    try:
        return load_config(raw=raw)
    except ConfigError as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise ConfigError(f"{source}: the config with {shown} is invalid:\n{exc}") from None


def set_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a raw (pre-defaults) config with each dotted path set to a Python value, as `-o` does."""
    raw = copy.deepcopy(raw)
    for path, value in values.items():
        _inherit_default(raw, path.split("."))
        apply_override(raw, path.split("."), value)
    return raw
