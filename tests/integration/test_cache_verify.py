"""A cache phase's checks of the rows it wrote, on local Ray: `verify_lengths` names the rows whose carried
sketch does not match the latents written beside it (their source manifest lines too), `require_length_match`
stops the pipeline there, also when the cache is reused, and a tokens column's codebook usage and perplexity
reach summary.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from datasets_prep.columns import ColumnSpec
from datasets_prep.shards import DatasetWriter
from raytrain.config import load_config
from raytrain.phases.base import PipelineError
from raytrain.phases.cache_checks import codebook_stats
from raytrain.pipeline import PipelineRunner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SR, HOP, SKETCH_RATE, CODES = 8000, 80, 25, 4  # latents at 100 frames/s: 4 per sketch token
SECONDS = (0.40, 0.48, 0.56, 0.64, 0.72, 0.80)
WRONG = {2: +2, 4: -3}  # row -> tokens added to its sketch (a sketch file of another take)


class SketchCoder(nn.Module):
    """``mix`` (batch, time) -> ``latents`` (batch, frames, 8) at SR / HOP frames/s and ``codes`` (batch,
    frames): frame index mod CODES, so its histogram is known from the rows' lengths."""

    reads = ("mix",)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, kernel_size=HOP, stride=HOP)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        mix = batch["mix"]
        z = self.conv(mix[:, None, : mix.shape[-1] // HOP * HOP]).transpose(1, 2)
        lengths = batch["lengths"] // HOP
        codes = (torch.arange(z.shape[1]) % CODES).expand(z.shape[0], -1)
        return {"latents": z, "latents_lengths": lengths, "codes": codes, "codes_lengths": lengths}


def write_songs(folder: Path, manifest: Path) -> None:
    """Song rows as JSONL shards hold them: audio, a sketch at 25 tokens/s, the manifest line of each row."""
    cols = {"id": ColumnSpec.id(), "mix": ColumnSpec.audio(SR), "sketch": ColumnSpec.tokens(rate=SKETCH_RATE),
            "line": ColumnSpec.meta("int64")}
    rng = np.random.default_rng(0)
    with DatasetWriter(folder, cols, kind="songs", rows_per_shard=4, prep={"source": str(manifest)}) as w:
        for i, sec in enumerate(SECONDS):
            tokens = round(sec * SKETCH_RATE) + WRONG.get(i, 0)
            w.write({"id": f"song{i}", "mix": rng.uniform(-0.5, 0.5, round(sec * SR)).astype(np.float32),
                     "sketch": np.arange(tokens, dtype=np.int64) % 7, "line": i + 1})


def pipeline(songs: Path, runs: Path, **checks: Any) -> dict[str, Any]:
    return {
        "name": "it_cache_verify", "seed": 1, "runs_dir": str(runs), "tracking": {"enabled": False},
        "data": {"songs": {"shards": str(songs)}},
        "model": {"name": "tests.toys:LatentProbe"},
        "phases": [
            {"name": "encode", "kind": "cache", "model": {"name": "tests.integration.test_cache_verify:SketchCoder"},
             "batch_size": 4, "datasets": {"songs": "latents_songs"},
             "columns": {"latents": {"role": "features", "frame_rate": SR / HOP},
                         "codes": {"role": "tokens", "frame_rate": SR / HOP, "dtype": "int64", "codebook_size": 8}},
             "carry": ["sketch"], "cache_dir": str(runs / "cache"), "verify_lengths": "all",
             "length_columns": ["sketch", "latents"], **checks},
            {"name": "generator", "train": ["latents_songs"],
             "eval": "latents_songs", "losses": {"tests.toys:recon_mse": 1.0}, "batch_size": 2, "max_steps": 2},
        ],
    }


def test_mismatching_rows_are_named_and_stop_the_pipeline(ray_local: Any, tmp_path: Path, capsys: Any) -> None:
    songs, runs = tmp_path / "songs", tmp_path / "runs"
    write_songs(songs, tmp_path / "raw" / "songs.jsonl")

    first = PipelineRunner(load_config(raw=pipeline(songs, runs)), progress=False, run_dir=runs / "one",
                           only=["encode"]).run()
    enc = first["phases"]["encode"]
    assert enc["status"] == "finished", enc.get("error")
    assert enc["forward_passes"] == 2
    m = enc["final_metrics"]
    assert m["cache/length_checked"] == len(SECONDS) and m["cache/length_mismatches"] == len(WRONG)
    report = json.loads(Path(enc["files"]["length_check"]).read_text())
    got = {r["id"]: (r["source"], r["lengths"], r["expected"]) for r in report["mismatches"]}
    want = {f"song{i}": (f"songs.jsonl:{i + 1}",
                         {"sketch": round(SECONDS[i] * SKETCH_RATE) + d, "latents": round(SECONDS[i] * SR / HOP)},
                         4 * (round(SECONDS[i] * SKETCH_RATE) + d)) for i, d in WRONG.items()}
    assert got == want
    out = capsys.readouterr().out
    assert "latents_songs: row song2 (songs.jsonl:3): sketch 16, latents 56 (expected 64)" in out
    assert "latents_songs: row song4 (songs.jsonl:5): sketch 15, latents 72 (expected 60)" in out

    # the codes' histogram: each row's frames cycle through CODES of the 8 codes
    counts = np.zeros(8, dtype=np.int64)
    for sec in SECONDS:
        counts[:CODES] += np.bincount(np.arange(round(sec * SR / HOP)) % CODES, minlength=CODES)
    usage, perplexity = codebook_stats(counts)
    assert m["cache/latents_songs/codes_usage"] == pytest.approx(0.5)
    assert m["cache/latents_songs/codes_perplexity"] == pytest.approx(perplexity) and 3.9 < perplexity <= 4.0

    # the same cache, now required to match: reused (the checks are not in its key), and the generator never runs
    strict = load_config(raw=pipeline(songs, runs, require_length_match=True))
    runner = PipelineRunner(strict, progress=False, run_dir=runs / "two")
    with pytest.raises(PipelineError, match=r"2 of 6 rows checked .* row song2 \(songs\.jsonl:3\).* row song4"):
        runner.run()
    summary = json.loads((runs / "two" / "summary.json").read_text())
    enc2 = summary["phases"]["encode"]
    assert summary["status"] == "failed" and enc2["status"] == "failed"
    assert enc2["forward_passes"] == 0 and enc2["final_metrics"]["cache/length_mismatches"] == 2
    assert enc2["final_metrics"]["cache/latents_songs/codes_usage"] == pytest.approx(0.5)
    assert "song2 (songs.jsonl:3)" in enc2["error"]
    assert summary["phases"].get("generator", {}).get("status", "pending") == "pending"
