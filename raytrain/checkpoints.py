"""Checkpoint hand-off between phases: load rules, the load report, freezing, atomic saves.

`init_from` loads an earlier phase's weights under include/exclude/rename rules. The
same pure function (`plan_load`) decides what happens on the driver (which writes
the report before any worker starts) and in the workers (which apply it), so the
report always describes what was loaded.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from datasets_prep.storage import download_file, is_uri
from raytrain.config.schema import InitFromConfig, TrainPhaseConfig

STATE_FILE = "state.pt"
WEIGHTS_FILE = "model.pt"


class CheckpointError(RuntimeError):
    pass


class PatternError(ValueError):
    """A freeze/trainable/param-group pattern that matches no parameter."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write to a temp file in the same folder, then rename: a crash never leaves half a file.

    The temp file has the final file's name inside a temp folder: torch.save names the records of its zip
    after the file, so equal weights make equal bytes (a cache phase keys its output on the weights file's
    hash: a retrained encoder with the same weights reuses it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = os.path.join(tmp_dir, path.name)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.rmdir(tmp_dir)


RESAVE = "torch.save(model.state_dict(), 'model.pt')"


def load_data(path: str | Path) -> Any:
    """A checkpoint file as data: tensors, numbers, strings, lists, tuples and dicts only
    (`torch.load(weights_only=True)`), so a file from anywhere cannot run code when it is read.
    Anything else in it (a pickled class, a function, a numpy array) is refused, and a file that is not a torch
    checkpoint at all (cut short, empty, another format) is a CheckpointError; both one line naming the file."""
    p = Path(path)
    if p.is_file() and p.stat().st_size == 0:
        raise CheckpointError(f"{p}: not a readable torch checkpoint: an empty file (0 bytes); copy it again, or "
                              "give a model.pt/state.pt that a run wrote")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        # torch names what it refused: "Unsupported global: GLOBAL x.Y", "unsupported GLOBAL posix.system"
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:  # not refused for what it holds: the bytes are not a pickle torch.load can follow
            raise CheckpointError(_unreadable(p, e)) from None
        raise CheckpointError(
            f"{path}: refused: it holds Python objects beyond tensors and plain types ({found[1]}), and raytrain "
            "loads checkpoints as data only (nothing in them is run). If you trust its source, re-save its "
            f"weights as a plain state dict ({RESAVE}) and load that.") from None
    except Exception as e:  # torch.load reading bytes that are not a checkpoint fails in many ways (RuntimeError
        # from the zip reader, EOFError, UnicodeDecodeError, KeyError, IndexError, ...): all name the file
        raise CheckpointError(_unreadable(p, e)) from None


def _unreadable(path: Path, exc: BaseException) -> str:
    """`<path>: not a readable torch checkpoint (<what it is instead>); <fix>`."""
    text = str(exc).strip()
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # the reason inside torch's long weights_only text
    first = found[1] if found else (text.splitlines() or [""])[0]
    first = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", first)  # c10's source location
    first = first.split(". ")[0].rstrip(".")[:160] or type(exc).__name__
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        what = "cut short: it starts as torch's zip format but its end is missing"
    elif head == b"PK\x03\x04":
        what = f"a zip archive, but not one torch.save wrote: {first}"
    else:
        what = f"neither torch's zip format nor a pickle it reads: {first}"
    return (f"{path}: not a readable torch checkpoint ({what}); copy it again if it was cut short, or give a "
            f"model.pt/state.pt that a run wrote ({RESAVE})")


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def strip_ddp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from a `model.pt`, a `state.pt`, or a folder holding either; also an s3:// or gs://
    URI of a `model.pt`."""
    if is_uri(path):
        with tempfile.TemporaryDirectory(prefix="raytrain-ckpt-") as d:
            try:
                local = download_file(str(path), Path(d) / WEIGHTS_FILE)
            except FileNotFoundError as e:
                raise CheckpointError(f"checkpoint {path} does not exist in object storage. Give init_from a "
                                      "phase that has finished, or an existing model.pt URI (see summary.json "
                                      "of the earlier run).") from e
            return load_weights(local)
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_FILE if (p / WEIGHTS_FILE).exists() else p / STATE_FILE
    if not p.exists():
        raise CheckpointError(
            f"checkpoint {p} does not exist. Give init_from a phase that has finished, or an existing "
            "model.pt/state.pt path (see summary.json of the earlier run)."
        )
    obj = load_data(p)
    state = obj["model"] if isinstance(obj, dict) and "model" in obj else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{p}: not a state dict checkpoint (a mapping of parameter names to tensors): it "
                              f"holds {_describe(state)}; give a model.pt/state.pt that a run wrote ({RESAVE})")
    return strip_ddp(state)


def _describe(obj: Any) -> str:
    """What a checkpoint holds, in a few words: `a list of 3 items`, `a dict whose 'lr' is a float`."""
    if isinstance(obj, torch.Tensor):
        return f"one tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        bad = next(((k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
        if bad is None:
            return "a dict"
        return f"a dict whose {str(bad[0])[:60]!r} is a {type(bad[1]).__name__}"
    if isinstance(obj, list | tuple):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _rename(name: str, rules: dict[str, str]) -> str:
    for old, new in rules.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)
    skipped_by_name: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    skipped_by_shape: list[tuple[str, list[int], list[int]]] = field(default_factory=list)  # (key, ckpt, model)
    not_initialised: list[str] = field(default_factory=list)  # model keys left at their fresh init

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_table(self) -> str:
        rows = [("key", "action", "detail")]
        renamed = dict(self.renamed)
        rows += [(k, "loaded", f"from {renamed[k]}" if k in renamed else "") for k in self.loaded]
        rows += [(k, "skipped (name)", why) for k, why in self.skipped_by_name]
        rows += [(k, "skipped (shape)", f"checkpoint {tuple(a)} vs model {tuple(b)}") for k, a, b in self.skipped_by_shape]
        rows += [(k, "fresh init", "not in checkpoint or not selected") for k in self.not_initialised]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        head = (f"load report ({self.source}): {len(self.loaded)} loaded, {len(self.renamed)} renamed, "
                f"{len(self.skipped_by_name)} skipped by name, {len(self.skipped_by_shape)} skipped by shape, "
                f"{len(self.not_initialised)} left at init")
        lines = [head] + [f"  {a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
        return "\n".join(lines)

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        folder = Path(folder)
        js, txt = folder / "load_report.json", folder / "load_report.txt"
        atomic_write_text(js, json.dumps(self.to_dict(), indent=2))
        atomic_write_text(txt, self.to_table() + "\n")
        return js, txt


def plan_load(ckpt_shapes: dict[str, torch.Size | list[int]], model_shapes: dict[str, torch.Size | list[int]],
              rules: InitFromConfig, source: str) -> tuple[LoadReport, dict[str, str]]:
    """Decide which checkpoint key goes to which model key. Returns (report, {model_key: ckpt_key})."""
    report = LoadReport(source=source)
    mapping: dict[str, str] = {}
    for key, shape in ckpt_shapes.items():
        if rules.exclude and _matches(key, rules.exclude):  # the explicit rule names the reason
            report.skipped_by_name.append((key, "excluded"))
            continue
        if not _matches(key, rules.include):
            report.skipped_by_name.append((key, "not in include"))
            continue
        target = _rename(key, rules.rename)
        if target not in model_shapes:
            report.skipped_by_name.append((key, f"no model key {target!r}" if target != key else "not in model"))
            continue
        if list(model_shapes[target]) != list(shape):
            if rules.on_shape_mismatch == "error":
                raise CheckpointError(
                    f"init_from {source}: {key} has shape {tuple(shape)} in the checkpoint but "
                    f"{tuple(model_shapes[target])} in the model. Set on_shape_mismatch: skip to leave it at "
                    "its fresh init, or exclude it."
                )
            report.skipped_by_shape.append((target, list(shape), list(model_shapes[target])))
            continue
        mapping[target] = key
        report.loaded.append(target)
        if target != key:
            report.renamed.append((target, key))
    report.not_initialised = [k for k in model_shapes if k not in mapping]
    return report, mapping


def load_into(model: torch.nn.Module, ckpt: dict[str, torch.Tensor], rules: InitFromConfig,
              source: str) -> LoadReport:
    """Apply `plan_load` to a real model (in place)."""
    own = model.state_dict()
    report, mapping = plan_load({k: v.shape for k, v in ckpt.items()}, {k: v.shape for k, v in own.items()},
                                rules, source)
    with torch.no_grad():
        for target, key in mapping.items():
            own[target].copy_(ckpt[key])
    return report


def check_patterns(names: list[str], patterns: list[str], key: str) -> None:
    """Every pattern must match some parameter; the error shows what names look like."""
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            prefixes = sorted({n.split(".")[0] + ".*" for n in names})
            raise PatternError(
                f"{key}: pattern {pat!r} matches no parameter. Top-level prefixes: {', '.join(prefixes)}; "
                f"e.g. {', '.join(names[:3])}. Fix the pattern (globs: * ? [..])."
            )


def frozen_names(names: list[str], phase: TrainPhaseConfig, where: str) -> set[str]:
    """Names of the parameters a phase freezes (validated patterns). A LoRA phase without `train_all`
    freezes everything but the adapters."""
    lora = getattr(phase, "lora", None)
    if lora is not None and not lora.train_all:
        from raytrain.lora import is_lora_key

        return {n for n in names if not is_lora_key(n)}
    if phase.freeze is not None:
        check_patterns(names, phase.freeze, f"{where}.freeze")
        return {n for n in names if _matches(n, phase.freeze)}
    if phase.trainable is None or phase.trainable == "all":
        return set()
    check_patterns(names, phase.trainable, f"{where}.trainable")
    return {n for n in names if not _matches(n, phase.trainable)}


def apply_freeze(model: torch.nn.Module, phase: TrainPhaseConfig, where: str = "phase") -> tuple[int, int]:
    """Set requires_grad; returns (trainable, frozen) parameter counts."""
    names = [n for n, _ in model.named_parameters()]
    frozen = frozen_names(names, phase, where)
    n_train = n_frozen = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
        if name in frozen:
            n_frozen += p.numel()
        else:
            n_train += p.numel()
    return n_train, n_frozen


def hand_off_report(mcfg: Any, init: dict[str, Any], folder: str | Path) -> tuple[Path, Path]:
    """The load report of `init` (`{"path", "rules"}`) into the model `mcfg` (a `ModelConfig`, built on
    `meta`): printed (its head only when long) and saved in `folder` as load_report.json/.txt."""
    from raytrain.models import build_model

    with torch.device("meta"):
        model = build_model(mcfg.name, dict(mcfg.args), mcfg.adapter)
    ckpt = load_weights(init["path"])
    report, _ = plan_load({k: v.shape for k, v in ckpt.items()}, {k: v.shape for k, v in model.state_dict().items()},
                          InitFromConfig(**init["rules"]), init["path"])
    js, txt = report.save(folder)
    lines = report.to_table().splitlines()
    print("\n".join(lines) if len(lines) < 40 else f"{lines[0]}\n  (full table: {txt})")
    return js, txt
