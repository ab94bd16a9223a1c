"""`raytrain prep` of `layout: songs` on Ray Data (real espeak-ng, real shards): the shards of an in-process run,
byte for byte, split by singer."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from datasets_prep.prep import run_prep
from datasets_prep.shards import read_manifest

pytestmark = pytest.mark.integration
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "prep" / "music_lora_tiny.yaml"


def _config(root: Path, output: str, workers: int) -> Path:
    data = yaml.safe_load(CONFIG.read_text())
    g = data["generator"]
    g["corpora"]["en"].update({"singers": 3, "songs": 6})
    g["corpora"]["es"].update({"singers": 3, "songs": 4})
    g.update({"duration_sec": 2.0, "prompt_sec": 1.0})
    data.update({"workers": workers, "rows_per_shard": 2, "raw_dir": str(root / "raw"),
                 "output_dir": str(root / output), "splits": {"ratios": {"dev": 0.34}, "by": "speaker", "seed": 1}})
    path = root / f"{output}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_songs_prep_on_ray_writes_the_shards_of_an_in_process_run(tmp_path: Path, ray_local: object) -> None:
    ref = run_prep(_config(tmp_path, "ref", workers=0), root=tmp_path)
    ray = run_prep(_config(tmp_path, "ray", workers=2), root=tmp_path)  # the same raw songs: not rendered again
    assert list(ray["splits"]) == list(ref["splits"]) == ["en/train", "en/dev", "es/train", "es/dev"]
    for split in ref["splits"]:
        a, b = read_manifest(tmp_path / "ref" / split), read_manifest(tmp_path / "ray" / split)
        assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]], split
        assert a["roles"] == b["roles"] and b["audio_columns"] == ["audio", "prompt"] and b["rejects"]["count"] == 0
    for corpus in ("en", "es"):
        train, dev = (read_manifest(tmp_path / "ray" / corpus / s)["speaker_hours"] for s in ("train", "dev"))
        assert train and dev and not set(train) & set(dev)
