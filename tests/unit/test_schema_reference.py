"""`raytrain schema`: docs/config.md and docs/pipeline.schema.json are generated from the config models,
committed, and current; the JSON Schema accepts the shipped pipelines and rejects misspelt keys."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from raytrain.cli import main
from raytrain.config.loader import ConfigError, load_config
from raytrain.config.reference import JSON_COMMAND, JSON_PATH, MARKDOWN_COMMAND, MARKDOWN_PATH, json_schema
from raytrain.config.schema import PHASE_CONFIGS, PipelineConfig

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = sorted((ROOT / "configs" / "pipelines").glob("*.yaml"))


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["schema", *args]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator: jsonschema.Draft202012Validator, doc: Any) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def _models_below(model: type[BaseModel]) -> list[type[BaseModel]]:
    """`model` and every model its fields' annotations name, recursively."""
    found: list[type[BaseModel]] = []

    def walk(ann: Any) -> None:
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if ann not in found:
                found.append(ann)
                for field in ann.model_fields.values():
                    walk(field.annotation)
            return
        for arg in getattr(ann, "__args__", ()) or ():
            walk(arg)
        for meta in getattr(ann, "__metadata__", ()) or ():
            walk(meta)

    walk(model)
    for phase in PHASE_CONFIGS.values():
        walk(phase)
    return found


def _section(markdown: str, anchor: str) -> str:
    """The text of the section under `<a id="anchor">` up to the next anchor."""
    start = markdown.index(f'<a id="{anchor}"></a>')
    end = markdown.find('<a id="', start + 1)
    return markdown[start:] if end < 0 else markdown[start:end]


# (a) the committed files are what the command writes


def test_markdown_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    committed = (ROOT / MARKDOWN_PATH).read_text(encoding="utf-8")
    assert _cli(capsys, "--markdown") == committed, \
        f"{MARKDOWN_PATH} is stale: regenerate it with `{MARKDOWN_COMMAND}`"
    assert MARKDOWN_COMMAND in committed.splitlines()[2]  # the header says how it was made


def test_json_schema_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    committed = (ROOT / JSON_PATH).read_text(encoding="utf-8")
    assert _cli(capsys, "--json") == committed, f"{JSON_PATH} is stale: regenerate it with `{JSON_COMMAND}`"
    assert json.loads(committed)["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_output_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "config.md"
    assert main(["schema", "--markdown", "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert out.read_text(encoding="utf-8") == _cli(capsys, "--markdown")
    with pytest.raises(SystemExit):  # one format at a time
        main(["schema", "--markdown", "--json"])


# (b) the shipped pipelines validate


def test_pipelines_found() -> None:
    assert len(PIPELINES) >= 5


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_pipeline_validates(validator: jsonschema.Draft202012Validator, path: Path) -> None:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))  # anchors and merge keys resolved, as editors do
    assert _errors(validator, doc) == []


# (c) misspelt keys are rejected, at every level


def _tiny() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "configs/pipelines/separation_tiny.yaml").read_text(encoding="utf-8"))


def _first(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(p for p in doc["phases"] if p.get("kind", "train") == kind)


@pytest.mark.parametrize("where, key, expected", [
    ("top", "seeed", "'seeed' was unexpected"),
    ("train", "max_step", "'max_step' was unexpected"),
    ("defaults", "max_step", "'max_step' was unexpected"),
    ("optim", "learning_rate", "'learning_rate' was unexpected"),
    ("data", "shard", "'shard' was unexpected"),
    ("model", "arg", "'arg' was unexpected"),
    ("export", "max_steps", "'max_steps' was unexpected"),   # a key of another kind
    ("train", "teacher", "'teacher' was unexpected"),        # a distill key in a train phase
])
def test_misspelt_key_rejected(validator: jsonschema.Draft202012Validator, where: str, key: str,
                               expected: str) -> None:
    doc = _tiny()
    assert _errors(validator, doc) == []
    target = {"top": doc, "defaults": doc["defaults"], "data": next(iter(doc["data"].values())),
              "model": doc["model"]}.get(where)
    if target is None and where == "optim":
        target = _first(doc, "train").setdefault("optim", {})
    elif target is None:
        target = _first(doc, where)
    target[key] = 1
    errors = _errors(validator, doc)
    assert any(expected in e for e in errors), errors
    with pytest.raises(ConfigError):  # and the loader agrees
        load_config(raw=doc)


def test_unknown_kind_and_bad_values_rejected(validator: jsonschema.Draft202012Validator) -> None:
    for change in (lambda d: d["phases"][0].update(kind="trian"),
                   lambda d: d["phases"][0].update(max_steps=0),
                   lambda d: d["phases"][0].update(precision="fp8"),
                   lambda d: d["defaults"].update(name="x"),        # the loader refuses it in defaults
                   lambda d: d["phases"][0].pop("name"),
                   lambda d: d.pop("data")):
        doc = _tiny()
        change(doc)
        assert _errors(validator, doc), doc
        with pytest.raises(ConfigError):
            load_config(raw=doc)


def test_keys_from_defaults_accepted(validator: jsonschema.Draft202012Validator) -> None:
    """What the loader accepts because `defaults:` completes a phase, the schema accepts too."""
    doc = _tiny()
    doc["defaults"]["model"] = copy.deepcopy(doc["model"])
    train = _first(doc, "train")
    train["model"] = {"args": {"num_sources": 2}}  # its name comes from defaults.model
    train["optim"] = {"lr": 2.0e-3}
    load_config(raw=doc)
    assert _errors(validator, doc) == []
    doc["defaults"]["train"] = "train"  # the str and mapping forms the validators accept
    train.pop("train", None)
    train["trainable"] = "*"
    load_config(raw=doc)
    assert _errors(validator, doc) == []


# (d) the markdown documents every field


def test_markdown_lists_every_field_of_every_phase_kind(capsys: pytest.CaptureFixture[str]) -> None:
    markdown = _cli(capsys, "--markdown")
    for kind, model in PHASE_CONFIGS.items():
        section = _section(markdown, f"phase-{kind}")
        rows = re.findall(r"^\| `([A-Za-z0-9_]+)` \|", section, flags=re.M)
        assert rows == list(model.model_fields), f"{kind}: table rows {rows}"


def test_markdown_lists_every_field_of_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    markdown = _cli(capsys, "--markdown")
    phase_models = set(PHASE_CONFIGS.values())
    for model in _models_below(PipelineConfig):
        if model in phase_models:
            continue
        anchor = "top-level" if model is PipelineConfig else model.__name__.lower()
        rows = re.findall(r"^\| `([A-Za-z0-9_]+)` \|", _section(markdown, anchor), flags=re.M)
        assert rows == list(model.model_fields), f"{model.__name__}: table rows {rows}"


def test_every_field_is_described() -> None:
    missing = [f"{m.__name__}.{k}" for m in _models_below(PipelineConfig) for k, f in m.model_fields.items()
               if not (f.description or "").strip()]
    assert missing == [], f"add Field(description=...) in raytrain/config/schema.py for {missing}"
