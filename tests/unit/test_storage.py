"""datasets_prep.storage on the local filesystem (the same pyarrow calls serve s3:// and gs://;
tests/integration/test_object_storage.py runs them against a real S3 server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from datasets_prep.storage import (
    download_file,
    exists,
    filesystem,
    is_uri,
    join,
    list_dirs,
    read_bytes,
    upload_dataset,
    write_bytes,
)


def test_uri_helpers() -> None:
    assert is_uri("s3://b/x") and is_uri("gs://b") and not is_uri("runs/x") and not is_uri(Path("/tmp"))
    assert join("s3://b/runs/", "p", "/r/", "model.pt") == "s3://b/runs/p/r/model.pt"
    with pytest.raises(ValueError, match="nope://b/x: not a storage URI pyarrow can open"):
        filesystem("nope://b/x")


def test_write_read_download_list(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    write_bytes(join(root, "run1", "summary.json"), b"{}")
    write_bytes(join(root, "run2", "a", "model.pt"), b"w")
    assert exists(join(root, "run1", "summary.json")) and not exists(join(root, "run3"))
    assert read_bytes(join(root, "run2", "a", "model.pt")) == b"w"
    assert list_dirs(root) == ["run1", "run2"] and list_dirs(join(root, "missing")) == []
    got = download_file(join(root, "run1", "summary.json"), tmp_path / "local" / "summary.json")
    assert got.read_bytes() == b"{}" and [p.name for p in got.parent.iterdir()] == ["summary.json"]
    with pytest.raises(FileNotFoundError, match="run9/summary.json does not exist"):
        read_bytes(join(root, "run9", "summary.json"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        download_file(join(root, "run9", "x"), tmp_path / "local" / "x")
    assert [p.name for p in (tmp_path / "local").iterdir()] == ["summary.json"]  # no temp file left


def test_upload_dataset_skips_what_is_there_removes_stale_and_writes_the_manifest_last(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", str(tmp_path / "dst")
    src.mkdir()
    for i in range(3):
        (src / f"shard-{i:05d}.parquet").write_bytes(bytes([i]) * (10 + i))
    (src / ".shard-00000.json").write_text("{}")  # prep's resume records stay local
    (src / "_manifest.json").write_text('{"rows": 3}')
    assert upload_dataset(src, dst) == {"uploaded": 3, "skipped": 0}
    assert sorted(p.name for p in Path(dst).iterdir()) == ["_manifest.json", "shard-00000.parquet",
                                                            "shard-00001.parquet", "shard-00002.parquet"]
    # an interrupted earlier upload: one shard missing, a stale shard of a bigger run, the old manifest
    (Path(dst) / "shard-00001.parquet").unlink()
    write_bytes(join(dst, "shard-00009.parquet"), b"old")
    (src / "_manifest.json").write_text('{"rows": 4}')
    assert upload_dataset(src, dst) == {"uploaded": 1, "skipped": 2}
    assert not exists(join(dst, "shard-00009.parquet"))
    assert read_bytes(join(dst, "_manifest.json")) == b'{"rows": 4}'


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path: Path) -> None:
    from raytrain.runs import new_run_id

    first = new_run_id(tmp_path)
    (tmp_path / first).mkdir()
    second = new_run_id(tmp_path)
    if second[:15] == first[:15]:  # the same second (the usual case): a suffix
        assert second == f"{first}-2"
    (tmp_path / second).mkdir()
    assert new_run_id(tmp_path) not in {first, second}
