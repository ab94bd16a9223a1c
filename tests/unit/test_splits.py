"""Seeded splits by item and by speaker; `split_manifest` on JSONL and TSV."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datasets_prep.splits import parse_ratios, split_items, split_manifest


def _items(speakers: int = 20, per: int = 10) -> list[dict]:
    return [{"id": f"s{s:02d}/{u}", "speaker": f"s{s:02d}"} for s in range(speakers) for u in range(per)]


def test_parse_ratios_fills_train_and_rejects_bad_input() -> None:
    assert parse_ratios("valid=0.1,test=0.05") == pytest.approx({"valid": 0.1, "test": 0.05, "train": 0.85})
    with pytest.raises(ValueError, match="add up to 1.200"):
        parse_ratios("train=0.9,valid=0.3")
    with pytest.raises(ValueError, match="name=ratio"):
        parse_ratios("valid")


def test_split_by_item_is_seeded_exact_and_a_partition() -> None:
    items = _items()
    a = split_items(items, "train=0.8,valid=0.1,test=0.1", seed=3)
    assert {k: len(v) for k, v in a.items()} == {"train": 160, "valid": 20, "test": 20}
    assert sorted(i["id"] for v in a.values() for i in v) == sorted(i["id"] for i in items)
    assert a == split_items(items, "train=0.8,valid=0.1,test=0.1", seed=3)
    assert a != split_items(items, "train=0.8,valid=0.1,test=0.1", seed=4)


def test_split_by_speaker_keeps_each_speaker_in_one_split() -> None:
    items = _items(speakers=20, per=10) + [{"id": f"big/{u}", "speaker": "big"} for u in range(40)]
    parts = split_items(items, "valid=0.1,test=0.1", by="speaker", seed=0)
    owners: dict[str, set[str]] = {}
    for name, part in parts.items():
        for it in part:
            owners.setdefault(it["speaker"], set()).add(name)
    assert all(len(v) == 1 for v in owners.values())
    assert sum(len(p) for p in parts.values()) == len(items)
    assert 20 <= len(parts["valid"]) <= 30 and 20 <= len(parts["test"]) <= 30  # whole speakers near 10% of 240
    with pytest.raises(ValueError, match="has no 'speaker'"):
        split_items([{"id": "x"}], "valid=0.5", by="speaker")


def test_split_manifest_jsonl_and_tsv(tmp_path: Path) -> None:
    rows = [{"idx": k, "audio_path": f"a/{k}.wav", "lyrics": "la", "speaker": f"s{k % 5}"} for k in range(50)]
    src = tmp_path / "songs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = split_manifest(src, "valid=0.2", by="speaker", seed=1)
    assert set(out) == {"valid", "train"} and out["valid"].name == "songs.valid.jsonl"
    back = [json.loads(x) for p in out.values() for x in p.read_text().splitlines()]
    assert sorted(r["idx"] for r in back) == list(range(50)) and back[0].keys() == rows[0].keys()
    tsv = tmp_path / "st.tsv"
    tsv.write_text("id\taudio\tn_frames\ttgt_text\tspeaker\n" +
                   "".join(f"u{k}\tc/{k}.wav\t100\tsalut\ts{k % 3}\n" for k in range(30)))
    parts = split_manifest(tsv, "test=0.1", seed=0, output_dir=tmp_path / "splits")
    lines = parts["test"].read_text().splitlines()
    assert lines[0] == "id\taudio\tn_frames\ttgt_text\tspeaker" and len(lines) == 1 + 3
