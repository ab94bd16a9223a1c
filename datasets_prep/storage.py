"""Local folders and object storage (``s3://``, ``gs://``) through pyarrow filesystems.

Endpoint and credentials come from the usual variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for an S3-compatible
server; ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS), so the same config runs against AWS, GCS
or a local S3 server. An object is written by one PUT, so it appears whole or not at all: a
dataset's ``_manifest.json`` and a run's ``summary.json`` are uploaded last.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def is_uri(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local folder or a URI."""
    s = str(path)
    if is_uri(s):
        try:
            return pafs.FileSystem.from_uri(s)
        except Exception as e:  # an unknown scheme, a malformed URI
            raise ValueError(f"{s}: not a storage URI pyarrow can open ({e}); use s3://bucket/path, "
                             "gs://bucket/path or a local folder") from e
    return pafs.LocalFileSystem(), str(Path(s).resolve())


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return bytes(f.read())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri} does not exist") from e


def _local_replace(path: str, fill: Any) -> None:
    """Write a local file through a temp name in its folder and rename it (atomic on POSIX)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        fill(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        _local_replace(path, lambda tmp: tmp.write_bytes(data))
        return
    with fs.open_output_stream(path) as f:  # one PUT: the object appears whole
        f.write(data)


def upload_file(local: str | os.PathLike[str], uri: str) -> None:
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):  # a shared folder as storage
        _local_replace(path, lambda tmp: shutil.copyfile(local, tmp))
        return
    pafs.copy_files(str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download_file(uri: str, local: str | os.PathLike[str]) -> Path:
    """Copy ``uri`` to ``local`` through a temp file in the same folder (a reader never sees half a file)."""
    dest = Path(local)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fs, path = filesystem(uri)
        try:
            pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{uri} does not exist") from e
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def list_dirs(uri: str) -> list[str]:
    """Names of the folders (prefixes) directly under ``uri``; [] when there is none."""
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except FileNotFoundError:
        return []
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def upload_dataset(local_dir: str | os.PathLike[str], uri: str, manifest_name: str = "_manifest.json") -> dict[str, int]:
    """Upload a prepared dataset folder: shards first (skipping objects already there with the same size,
    so an interrupted upload resumes), the manifest last, so readers never see half a dataset. Stale
    shards of an earlier, bigger upload are removed. Returns {"uploaded": n, "skipped": n}."""
    local = Path(local_dir)
    fs, base = filesystem(uri)
    # A dataset being rewritten stops being one until its new manifest lands.
    if fs.get_file_info(f"{base}/{manifest_name}").type != pafs.FileType.NotFound:
        fs.delete_file(f"{base}/{manifest_name}")
    remote = {i.base_name: i.size for i in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
              if i.type == pafs.FileType.File}
    files = sorted(p for p in local.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name != manifest_name)
    counts = {"uploaded": 0, "skipped": 0}
    for p in files:
        if remote.get(p.name) == p.stat().st_size:
            counts["skipped"] += 1
            continue
        upload_file(p, f"{uri.rstrip('/')}/{p.name}")
        counts["uploaded"] += 1
    names = {p.name for p in files}
    for name in remote:
        if name not in names and name != manifest_name:
            fs.delete_file(f"{base}/{name}")
    upload_file(local / manifest_name, f"{uri.rstrip('/')}/{manifest_name}")
    return counts
