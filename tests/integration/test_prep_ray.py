"""`raytrain prep` on Ray Data: killed midway and re-run, it ends with the bytes of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from datasets_prep import faults
from datasets_prep.execute import prep_corpus

from .conftest import crash

pytestmark = pytest.mark.integration
SR = 16000
STEPS = ["vad_trim", "normalize", "features"]
PAUSE_SHARD = 4  # of 25


def _corpus(root: Path, speakers: int = 4, per_speaker: int = 12) -> Path:
    rng = np.random.default_rng(3)
    for s in range(speakers):
        for u in range(per_speaker):
            t = np.arange(int(rng.uniform(0.8, 1.6) * SR)) / SR
            tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) * (np.sin(2 * np.pi * 3 * t) > -0.5)
            wave = np.concatenate([np.zeros(SR // 4), tone, np.zeros(SR // 3)]) + rng.normal(0, 1e-3, SR // 4 + len(t) + SR // 3)
            path = root / f"spk{s}" / f"u{u:02d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(path), wave.astype(np.float32), SR, subtype="PCM_16")
    (root / "spk0" / "broken.wav").write_bytes(b"not audio at all")
    return root


def _prep_cmd(raw: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "raytrain.cli", "prep", "--input", str(raw), "--format", "speaker-dirs",
            "--output-dir", str(out), "--steps", *STEPS, "--sample-rate", str(SR), "--rows-per-shard", "2",
            "--workers", "2"]


def test_killed_prep_resumes_to_the_same_manifest(tmp_path: Path, ray_local: object) -> None:
    raw = _corpus(tmp_path / "raw")
    reference = prep_corpus(raw, "speaker-dirs", tmp_path / "ref", steps=STEPS, sample_rate=SR, workers=0,
                            rows_per_shard=2, progress=False)
    assert reference["rejects"]["count"] == 1 and len(reference["shards"]) == 25

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env[faults.ENV] = f"shard={PAUSE_SHARD}"  # never written in this run: it cannot end before it is killed
    log = tmp_path / "prep.log"
    proc = subprocess.Popen(_prep_cmd(raw, out), stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)
    marker, deadline = faults.marker_path("shard", PAUSE_SHARD, out), time.monotonic() + 240
    while not (marker.exists() and list(out.glob(".shard-*.json"))):  # the other worker goes on
        assert proc.poll() is None and time.monotonic() < deadline, (
            f"prep did not pause at shard {PAUSE_SHARD} with a shard done (exit code {proc.poll()}):\n"
            + log.read_text()[-3000:])
        time.sleep(0.05)
    crash(proc)
    done = len(list(out.glob(".shard-*.json")))
    assert 0 < done < 25 and not (out / "_manifest.json").exists()

    resumed = prep_corpus(raw, "speaker-dirs", out, steps=STEPS, sample_rate=SR, workers=2, rows_per_shard=2,
                          progress=False)
    assert resumed["shards"] == reference["shards"]  # same files, rows and sha256
    assert {k: resumed[k] for k in ("rows", "hours", "speaker_hours", "rejects", "duration_histogram")} == \
        {k: reference[k] for k in ("rows", "hours", "speaker_hours", "rejects", "duration_histogram")}
    assert not list(out.glob(".*.tmp"))
    assert json.loads((out / "_manifest.json").read_text())["steps"][0]["step"] == "vad_trim"
