"""Seeded train/validation/test splits of a corpus' items, by ratio of items or by speaker.

By speaker, every speaker lands in exactly one split (a test set of unseen voices, as
wsj0-2mix and most speaker-verification sets do); speakers are shuffled with the seed and
dealt so that each split's share of *items* is as close to its ratio as whole speakers allow.
``raytrain prep split`` applies the same to a JSONL or TSV manifest and writes one manifest
per split beside it (like a ``split_jsonl`` utility).
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path
from typing import Any


def parse_ratios(text: str | dict[str, float]) -> dict[str, float]:
    """``"train=0.8,valid=0.1,test=0.1"`` (or a dict) -> ratios; a missing rest goes to ``train``."""
    if isinstance(text, dict):
        ratios = {str(k): float(v) for k, v in text.items()}
    else:
        ratios = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"split {part!r} must look like name=ratio, e.g. valid=0.1")
            ratios[name.strip()] = float(value)
    if any(v < 0 for v in ratios.values()):
        raise ValueError(f"split ratios must be >= 0, got {ratios}")
    total = sum(ratios.values())
    if total > 1 + 1e-9:
        raise ValueError(f"split ratios add up to {total:.3f} > 1: {ratios}")
    if total < 1 - 1e-9:
        ratios["train"] = ratios.get("train", 0.0) + 1 - total
    return ratios


def split_items(items: list[dict[str, Any]], ratios: dict[str, float] | str, *, by: str = "item", seed: int = 0,
                speaker_key: str = "speaker") -> dict[str, list[dict[str, Any]]]:
    """{split: items}, each split in the input's order; the same seed gives the same split."""
    ratios = parse_ratios(ratios)
    names = list(ratios)
    rng = random.Random(seed)
    if by == "item":
        order = list(range(len(items)))
        rng.shuffle(order)
        bounds, acc = [], 0.0
        for n in names:
            acc += ratios[n]
            bounds.append(round(acc * len(items)))
        which = {}
        start = 0
        for n, end in zip(names, bounds, strict=True):
            for k in order[start:end]:
                which[k] = n
            start = end
        return {n: [it for k, it in enumerate(items) if which.get(k, names[-1]) == n] for n in names}
    if by != "speaker":
        raise ValueError(f"split by {by!r}: use 'item' or 'speaker'")
    counts: dict[str, int] = {}
    for it in items:
        spk = str(it.get(speaker_key) or "")
        if not spk:
            raise ValueError(f"split by speaker: item {it.get('id')!r} has no {speaker_key!r}")
        counts[spk] = counts.get(spk, 0) + 1
    speakers = sorted(counts)
    rng.shuffle(speakers)
    # smallest splits first, so a 5% test set gets its speakers before train takes the rest
    target = {n: ratios[n] * len(items) for n in names}
    got = dict.fromkeys(names, 0)
    assign: dict[str, str] = {}
    for n in sorted(names, key=lambda n: ratios[n])[:-1]:
        for spk in [s for s in speakers if s not in assign]:
            if got[n] >= target[n] or (target[n] > 0 and got[n] + counts[spk] - target[n] > target[n] - got[n]):
                continue
            assign[spk] = n
            got[n] += counts[spk]
        if target[n] > 0 and got[n] == 0:  # every speaker is bigger than the split: take the smallest
            smallest = min((s for s in speakers if s not in assign), key=lambda s: counts[s], default=None)
            if smallest is not None:
                assign[smallest] = n
                got[n] += counts[smallest]
    largest = max(names, key=lambda n: ratios[n])
    return {n: [it for it in items if assign.get(str(it[speaker_key]), largest) == n] for n in names}


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], str, list[str] | None]:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return rows, "jsonl", None
    if path.suffix == ".tsv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            return list(reader), "tsv", list(reader.fieldnames or [])
    raise ValueError(f"{path}: raytrain prep split reads .jsonl or .tsv manifests")


def split_manifest(path: str | os.PathLike, ratios: str | dict[str, float], *, by: str = "item", seed: int = 0,
                   output_dir: str | os.PathLike | None = None, speaker_key: str = "speaker") -> dict[str, Path]:
    """Write ``<stem>.<split>.jsonl`` (or ``.tsv``) per split; returns {split: path}.

    Rows keep every field and their order; relative audio paths stay valid when the outputs
    sit beside the input (the default)."""
    path = Path(path)
    rows, fmt, header = _read_rows(path)
    parts = split_items(rows, ratios, by=by, seed=seed, speaker_key=speaker_key)
    out_dir = Path(output_dir) if output_dir else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, part in parts.items():
        dest = out_dir / f"{path.stem}.{name}{path.suffix}"
        tmp = dest.with_name(f".{dest.name}.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if fmt == "jsonl":
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
            else:
                w = csv.DictWriter(f, fieldnames=header or [], delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n",
                                   escapechar="\\")
                w.writeheader()
                w.writerows(part)
        os.replace(tmp, dest)
        written[name] = dest
    return written
