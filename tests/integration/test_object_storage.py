"""Shards and checkpoints in object storage: a real S3-compatible server (moto) on 127.0.0.1.

`raytrain prep` writes the shards to s3://, a pipeline trains from them with `storage: s3://...`
(Ray Train's checkpoints, the phases' weights, summary.json), its second phase dies mid-way, the
local run folder is deleted, and `raytrain run --resume` continues from what is in the bucket.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .conftest import crash, pipeline_dict, raytrain_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

BUCKET = "raytrain-it"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server on loopback with an empty bucket; AWS_* variables point every process at it."""
    port = _free_port()
    log = (tmp_path / "moto.log").open("wb")
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "moto.log").read_text()
                assert time.monotonic() < deadline, "moto server did not answer in 60 s"
                time.sleep(0.3)
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(k, v)
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _snapshot_checkpoints(phase_uri: str) -> list[str]:
    """Checkpoints Ray Train registered in the bucket (its run snapshot)."""
    from datasets_prep.storage import read_bytes

    try:
        snap = json.loads(read_bytes(f"{phase_uri}/ray/checkpoint_manager_snapshot.json"))
    except FileNotFoundError:
        return []
    return [c["checkpoint_dir_name"] for c in snap["checkpoint_results"]]


def test_shards_and_checkpoints_in_s3_and_resume_from_the_bucket(s3: str, tmp_path: Path) -> None:
    from datasets_prep.prep import run_prep
    from datasets_prep.shards import read_manifest, shard_paths
    from datasets_prep.storage import exists, list_dirs, read_bytes

    # 1. prep straight to the bucket (prepared in a local staging folder, uploaded with the manifest last)
    prep = {"name": "s3_tiny", "sample_rate": 8000, "raw_dir": str(tmp_path / "raw"),
            "output_dir": f"{s3}/shards", "staging_dir": str(tmp_path / "staging"),
            "generator": {"kind": "espeak", "seed": 0, "train_voices": 6, "dev_voices": 2, "train_sentences": 30,
                          "dev_sentences": 8, "utterances_per_voice": 5},
            "dev_mixtures": {"num": 8, "max_seconds": 1.5, "seed": 1}, "rows_per_shard": 8, "workers": 0}
    (tmp_path / "prep.yaml").write_text(yaml.safe_dump(prep))
    result = run_prep(tmp_path / "prep.yaml")
    assert result["output_dir"] == f"{s3}/shards"
    for split in ("train", "dev"):
        remote, local = read_manifest(f"{s3}/shards/{split}"), read_manifest(tmp_path / "staging" / split)
        assert remote == local and remote["rows"] > 0
        assert all(exists(p) for p in shard_paths(f"{s3}/shards/{split}", remote))

    # 2. train from the bucket, checkpoints to the bucket; phase b's rank 0 dies at step 8 (no restarts)
    runs = tmp_path / "runs"
    raw = pipeline_dict(tmp_path, runs, max_steps=9, fail_at_step=8)
    raw["data"] = {"train": {"shards": f"{s3}/shards/train"}, "dev": {"shards": f"{s3}/shards/dev"}}
    raw["storage"] = f"{s3}/runs"
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env_ok = os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert env_ok
    first = raytrain_cli("run", str(cfg), log=tmp_path / "first.log")
    try:
        rc = first.wait(timeout=600)
    finally:
        crash(first)  # whatever of its local Ray is left
    log1 = (tmp_path / "first.log").read_text()
    assert rc != 0, log1[-3000:]
    (run_id,) = list_dirs(f"{s3}/runs/it_sep")
    base = f"{s3}/runs/it_sep/{run_id}"
    summary = json.loads(read_bytes(f"{base}/summary.json"))
    assert summary["phases"]["a"]["status"] == "finished", summary
    assert summary["phases"]["b"]["status"] == "failed", summary
    assert summary["phases"]["a"]["best_checkpoint_uri"] == f"{base}/a/best/model.pt"
    assert exists(f"{base}/a/best/model.pt") and exists(f"{base}/a/last/model.pt")
    assert _snapshot_checkpoints(f"{base}/a"), "phase a's Ray Train checkpoints are not in the bucket"
    assert _snapshot_checkpoints(f"{base}/b"), "phase b registered no checkpoint before it died"

    # 3. a fresh machine: no local run folder at all; --resume finds the run in the bucket
    shutil.rmtree(runs)
    second = raytrain_cli("run", str(cfg), "--resume", "-o", "phases.b.fail_at_step=null",
                          log=tmp_path / "second.log")
    try:
        rc = second.wait(timeout=600)
    finally:
        crash(second)
    log2 = (tmp_path / "second.log").read_text()
    assert rc == 0, log2[-3000:]
    assert f"--resume: continuing run {run_id} from {base}" in log2
    assert "phase a: finished earlier, skipped" in log2
    # the sqlite MLflow store went with the local run folder: the resumed run logs to new MLflow runs
    assert "is not in sqlite:///" in log2 and "logging to a new run" in log2
    resumed = re.search(r"resumed phase 'b' at step (\d+)", log2)
    assert resumed and int(resumed[1]) in (3, 6), log2[-3000:]  # its last checkpoint registered in the bucket
    final = json.loads(read_bytes(f"{base}/summary.json"))
    assert final["status"] == "finished" and final["phases"]["b"]["steps"] == 9
    assert final["phases"]["b"]["best_checkpoint_uri"] == f"{base}/b/best/model.pt" and exists(f"{base}/b/best/model.pt")
    local = json.loads((runs / "it_sep" / run_id / "summary.json").read_text())
    assert local == final
    report = json.loads((runs / "it_sep" / run_id / "b" / "load_report.json").read_text())
    assert report["source"] == f"{base}/a/best/model.pt" and report["loaded"]
