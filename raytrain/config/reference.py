"""`raytrain schema`: the pipeline YAML's reference, generated from the pydantic models of `schema.py`.

`markdown()` is `docs/config.md`: every key of the top level, of `defaults:`, of each phase kind and of
each nested section, with its type, default, constraint and description. `json_schema()` is
`docs/pipeline.schema.json`, a JSON Schema (draft 2020-12) of the YAML as a user writes it, before
`load_config` merges `defaults:` into the phases: an editor completes and checks pipeline YAMLs with it.
Both are rendered from pydantic's own `model_json_schema()` and `model_fields`, so they list what the
loader accepts; the rules of the models' validators (e.g. `init_from` needs exactly one of `phase` and
`path`) are left to `raytrain plan`.

The JSON Schema differs from pydantic's in what the loader does before validating:
- each phase's model is picked by `kind` (`train` when it has none): an `if`/`then` per kind;
- a phase may leave to `defaults:` any key but those the loader refuses there (`name`, `kind`), and
  mappings merge key by key, so below a phase or `defaults:` no mapping requires a key (list items, which
  replace rather than merge, still do);
- `defaults:` takes the phase keys of every kind, nothing else.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from raytrain.config import schema as models
from raytrain.config.loader import ConfigError, _merge_defaults
from raytrain.config.schema import PHASE_CONFIGS, PhaseBase, PipelineConfig, phase_kind_of

MARKDOWN_PATH = "docs/config.md"
JSON_PATH = "docs/pipeline.schema.json"
MARKDOWN_COMMAND = f"raytrain schema --markdown -o {MARKDOWN_PATH}"
JSON_COMMAND = f"raytrain schema --json -o {JSON_PATH}"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
_REF = "#/$defs/"


# --------------------------------------------------------------------------------------------- JSON Schema


def _ref_name(node: dict[str, Any]) -> str:
    return str(node["$ref"]).removeprefix(_REF)


def defaults_keys() -> list[str]:
    """The phase keys `defaults:` may set, in declaration order: those the loader's merge accepts there."""
    keys: list[str] = []
    for model in PHASE_CONFIGS.values():
        for key in model.model_fields:
            if key in keys:
                continue
            try:
                _merge_defaults({"defaults": {key: None}})
            except ConfigError:
                continue
            keys.append(key)
    return keys


class _Partial:
    """Copies of schemas as a mapping that `defaults:` merges with: no object there requires a key."""

    def __init__(self, defs: dict[str, Any]) -> None:
        self.defs = defs
        self.made: dict[str, str] = {}

    def node(self, node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            return {**node, "$ref": _REF + self.ref(_ref_name(node))}
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "required":
                continue
            if key == "properties":
                out[key] = {name: self.node(sub) for name, sub in value.items()}
            elif key == "additionalProperties":
                out[key] = self.node(value)
            elif key in ("anyOf", "oneOf", "allOf"):
                out[key] = [self.node(sub) for sub in value]
            else:  # items, prefixItems: a list replaces the default's whole; its items keep their requireds
                out[key] = value
        return out

    def ref(self, name: str) -> str:
        """The name of `name`'s partial schema (`name` itself where nothing below it requires a key)."""
        if name not in self.made:
            partial = f"{name}Partial"
            self.made[name] = partial  # a model that contains itself refers to the copy being made
            body = self.node(self.defs[name])
            if body == self.defs[name]:
                self.made[name] = name
            else:
                self.defs[partial] = body
        return self.made[name]


def _merged(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    unique: list[dict[str, Any]] = []
    for s in schemas:
        if s not in unique:
            unique.append(s)
    return unique[0] if len(unique) == 1 else {"anyOf": unique}


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a pipeline YAML as written (see the module's docstring)."""
    schema = PipelineConfig.model_json_schema()
    defs: dict[str, Any] = schema.pop("$defs")
    partial = _Partial(defs)
    allowed = defaults_keys()
    default_kind = phase_kind_of({})

    by_key: dict[str, list[dict[str, Any]]] = {}
    branches: list[dict[str, Any]] = []
    for kind, model in PHASE_CONFIGS.items():
        name = model.__name__
        whole = defs[name]
        phase = partial.node(whole)
        phase["required"] = [k for k in whole.get("required", []) if k not in allowed]
        defs[name] = phase
        for key, sub in phase["properties"].items():
            if key in allowed:
                by_key.setdefault(key, []).append(sub)
        cond: dict[str, Any] = {"properties": {"kind": {"const": kind}}}
        if kind != default_kind:
            cond["required"] = ["kind"]
        branches.append({"if": cond, "then": {"$ref": _REF + name}})
    defs["Phase"] = {
        "title": "Phase",
        "description": f"{inspect.cleandoc(PhaseBase.__doc__ or '')} Without `kind`, a {default_kind} phase.",
        "type": "object",
        "properties": {"kind": {"enum": list(PHASE_CONFIGS), "default": default_kind}},
        "allOf": branches,
    }
    props = schema["properties"]
    props["phases"] = {**props["phases"], "items": {"$ref": _REF + "Phase"}}
    props["defaults"] = {
        **{k: v for k, v in props["defaults"].items() if k != "additionalProperties"},
        "properties": {key: _merged(by_key[key]) for key in allowed},
        "additionalProperties": False,
    }
    return {
        "$schema": DIALECT,
        "title": "raytrain pipeline",
        **{k: v for k, v in schema.items() if k != "title"},
        "description": f"{inspect.cleandoc(PipelineConfig.__doc__ or '')} Generated by `{JSON_COMMAND}`.",
        "$defs": dict(sorted(defs.items())),
    }


def json_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


# --------------------------------------------------------------------------------------------- Markdown


_JSON_TYPES = {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "null": "null",
               "object": "dict", "array": "list"}


def _models() -> dict[str, type[BaseModel]]:
    return {name: obj for name, obj in vars(models).items()
            if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == models.__name__}


def _anchor(name: str) -> str:
    """The section of a model: its kind's for a phase model, else its name's."""
    kind = next((k for k, m in PHASE_CONFIGS.items() if m.__name__ == name), None)
    return f"phase-{kind}" if kind is not None else name.lower()


def _label(name: str) -> str:
    return next((k for k, m in PHASE_CONFIGS.items() if m.__name__ == name), name)


def _type(node: Any) -> str:
    """A property's schema as a short Python-like type; a nested model links to its section."""
    if not isinstance(node, dict) or not node:
        return "any"
    if "$ref" in node:
        name = _ref_name(node)
        return f"[{_label(name)}](#{_anchor(name)})"
    members = node.get("anyOf") or node.get("oneOf")
    if members:
        return " \\| ".join(dict.fromkeys(_type(sub) for sub in members))
    kind = node.get("type")
    if kind == "array":
        if "prefixItems" in node:
            return "\\[" + ", ".join(_type(sub) for sub in node["prefixItems"]) + "\\]"
        return f"list\\[{_type(node.get('items', {}))}\\]"
    if kind == "object":
        values = node.get("additionalProperties", True)
        return f"dict\\[str, {_type(values) if isinstance(values, dict) else 'any'}\\]"
    if isinstance(kind, str):
        return _JSON_TYPES.get(kind, kind)
    if "const" in node or "enum" in node:
        return "str"
    return "any"


def _constraints(node: Any) -> list[str]:
    """Bounds, patterns, lengths and choices of a property (and of its union's members)."""
    if not isinstance(node, dict):
        return []
    out: list[str] = []
    for key, fmt in (("minimum", ">= {}"), ("exclusiveMinimum", "> {}"), ("maximum", "<= {}"),
                     ("exclusiveMaximum", "< {}"), ("minLength", "at least {} characters"),
                     ("maxLength", "at most {} characters")):
        if key in node:
            out.append(f"`{fmt.format(node[key])}`")
    if "pattern" in node:
        out.append(f"matches `{node['pattern']}`")
    if "minProperties" in node:
        out.append(f"at least {node['minProperties']} entr{'ies' if node['minProperties'] != 1 else 'y'}")
    if "minItems" in node and "prefixItems" not in node:
        out.append(f"at least {node['minItems']} item{'s' * (node['minItems'] != 1)}")
    choices = node["enum"] if "enum" in node else [node["const"]] if "const" in node else []
    if choices:
        out.append("one of " + ", ".join(f"`{c}`" for c in choices))
    for sub in node.get("anyOf", []):
        out += [c for c in _constraints(sub) if c not in out]
    return out


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "`{}` (its defaults)"
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value)}`"


def _text(text: str) -> str:
    """Markdown of a description or docstring: `|`, `*`, `<`, `>` escaped outside code spans."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = (parts[i].replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")
                    .replace(">", "&gt;"))
    return "`".join(parts)


def _table(model: type[BaseModel], props: dict[str, Any], types: dict[str, str] | None = None) -> list[str]:
    lines = ["| Key | Type | Default | Constraint | Description |", "|---|---|---|---|---|"]
    for key, field in model.model_fields.items():
        node = props[key]
        kind = (types or {}).get(key) or _type(node)
        lines.append(f"| `{key}` | {kind} | {_default(field)} | {'; '.join(_constraints(node))} | "
                     f"{_text(' '.join((field.description or '').split()))} |")
    return lines


def _doc(model: type[BaseModel]) -> list[str]:
    return [_text(inspect.cleandoc(model.__doc__)), ""] if model.__doc__ else []


def _nested(start: list[dict[str, Any]], defs: dict[str, Any], skip: set[str]) -> list[str]:
    """Names of the models referred to below `start`, in the order a reader meets them."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                name = _ref_name(node)
                if name not in found and name not in skip:
                    found.append(name)
                    walk(defs[name])
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for node in start:
        walk(node)
    return found


def markdown() -> str:
    """`docs/config.md`: the reference of every key of a pipeline YAML."""
    schema = PipelineConfig.model_json_schema()
    defs: dict[str, Any] = schema["$defs"]
    classes = _models()
    kinds = PHASE_CONFIGS
    default_kind = phase_kind_of({})
    phase_defs = {kind: defs[model.__name__] for kind, model in kinds.items()}
    nested = _nested([schema["properties"], *phase_defs.values()], defs, {m.__name__ for m in kinds.values()})
    allowed = defaults_keys()
    kind_links = {kind: f"[{kind}](#phase-{kind})" for kind in kinds}

    out = [
        "# Pipeline config reference",
        "",
        f"Generated by `{MARKDOWN_COMMAND}` from the pydantic models in `raytrain/config/schema.py`: "
        "change the models (their `description`s and docstrings), not this file, and regenerate; a test "
        "fails while it is stale.",
        "",
        f"**Editor setup.** `{JSON_PATH}` (`{JSON_COMMAND}`) is the same reference as a JSON Schema. "
        "With VS Code's YAML extension (Red Hat), one line does it: either the first line of a pipeline YAML "
        "in `configs/pipelines/`",
        "",
        "    # yaml-language-server: $schema=../../docs/pipeline.schema.json",
        "",
        "or, for all of them, in `.vscode/settings.json`",
        "",
        '    "yaml.schemas": {"./docs/pipeline.schema.json": "configs/pipelines/*.yaml"}',
        "",
        "The editor then completes keys, shows these descriptions and flags an unknown key, a wrong type or "
        "a value out of range as you type; `raytrain plan` checks the rest (e.g. that `init_from` names an "
        "earlier phase, that the datasets are prepared).",
        "",
        "Sections: [top level](#top-level) · [defaults](#defaults) · phases: "
        + ", ".join(kind_links.values()) + " · nested: "
        + ", ".join(f"[{name}](#{_anchor(name)})" for name in nested),
        "",
        '<a id="top-level"></a>',
        "",
        "## Top level",
        "",
        *_doc(PipelineConfig),
        *_table(PipelineConfig, schema["properties"],
                {"phases": "list\\[[phase](#phases)\\]", "defaults": "[phase keys](#defaults)"}),
        "",
        '<a id="defaults"></a>',
        "",
        "## defaults",
        "",
        _text("Each phase takes the keys of `defaults:` that its kind has (an export phase takes no "
              "`optim`): a key the phase sets itself wins, and mappings (e.g. `optim`, `model`) merge key by "
              "key, so a key a section requires may come from either side. Lists are not merged: a phase's "
              "list replaces the default one. The keys it takes, and the kinds that have them:"),
        "",
        "| Key | Phase kinds that take it |",
        "|---|---|",
        *[f"| `{key}` | {', '.join(kind_links[k] for k, m in kinds.items() if key in m.model_fields)} |"
          for key in allowed],
        "",
        "Not in `defaults:` (each phase its own): "
        + ", ".join(f"`{k}`" for k in dict.fromkeys(k for m in kinds.values() for k in m.model_fields)
                    if k not in allowed) + ".",
        "",
        '<a id="phases"></a>',
        "",
        "## Phases",
        "",
        _text(inspect.cleandoc(PhaseBase.__doc__ or ""))
        + f" Without `kind`, a phase is a {default_kind} phase.",
        "",
    ]
    for kind, model in kinds.items():
        out += [f'<a id="phase-{kind}"></a>', "", f"### `{kind}` phase", "", *_doc(model),
                *_table(model, phase_defs[kind]["properties"]), ""]
    out += ["## Nested sections", ""]
    for name in nested:
        out += [f'<a id="{_anchor(name)}"></a>', "", f"### {name}", "", *_doc(classes[name]),
                *_table(classes[name], defs[name]["properties"]), ""]
    return "\n".join(out).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------- command


def write_reference(fmt: str, output: str | None) -> int:
    """`raytrain schema --markdown|--json [-o PATH]`: to PATH, else to stdout."""
    text = markdown() if fmt == "markdown" else json_text()
    if output is None:
        sys.stdout.write(text)
        return 0
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"wrote {path}")
    return 0
