"""What a run checks before it writes anything or starts Ray: its storage bucket and MLflow server answer, and
every dataset its phases read is prepared. Each problem is a `ConfigError` of one line naming the key, what is
wrong and the fix (`raytrain run` prints it and exits 2), found in seconds: one short HTTP request for an
MLflow server (no retries: MLflow's own client retries for minutes), pyarrow's few bounded retries for a bucket.
"""

from __future__ import annotations

import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from datasets_prep.storage import exists, is_uri
from raytrain.config.loader import ConfigError
from raytrain.config.schema import PipelineConfig
from raytrain.data.datasets import resolve

PROBE_TIMEOUT_S = 5.0  # one request to an MLflow server; a server that needs longer to answer is not usable
PREPARE = "raytrain prep configs/prep/<name>.yaml"


def preflight(pipe: PipelineConfig, *, prepared: bool = True) -> None:
    """The storage, the MLflow server, then the datasets (`prepared`: each must have its `_manifest.json`;
    else only those that exist are read, as `raytrain plan` does)."""
    check_storage(pipe)
    check_tracking(pipe)
    check_datasets(pipe, prepared=prepared)


def _detail(exc: BaseException) -> str:
    """pyarrow's reason without its preamble: `Failed to connect to 127.0.0.1 port 9 after 0 ms: ...`."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = text.split("Details: ", 1)[-1]
    return text[:240]


def _bucket_fix(uri: str) -> str:
    if uri.startswith("gs://"):
        return "check the bucket name and GOOGLE_APPLICATION_CREDENTIALS"
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    where = f"AWS_ENDPOINT_URL (now {endpoint})" if endpoint else "AWS_ENDPOINT_URL (for an S3-compatible server)"
    return f"check the bucket name, {where} and the AWS_* credentials"


def check_storage(pipe: PipelineConfig) -> None:
    """`storage:` (a bucket; a shared folder is not probed) answers a metadata request."""
    uri = pipe.storage
    if not uri or not is_uri(uri):
        return
    try:
        exists(uri)
    except ValueError as exc:  # a scheme pyarrow does not know, a malformed URI
        raise ConfigError(f"storage: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"storage: {uri} cannot be reached ({_detail(exc)}); {_bucket_fix(uri)}, or remove "
                          "storage: to keep the run in runs_dir only") from None


def _shown(uri: str) -> str:
    """`uri` without a password in it (http://user:secret@host -> http://user@host)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}@{parts.hostname}"
                                                  + (f":{parts.port}" if parts.port else "")))


def check_tracking(pipe: PipelineConfig) -> None:
    """An MLflow server (`tracking.uri` or `MLFLOW_TRACKING_URI`, http/https) answers one request within
    PROBE_TIMEOUT_S. Any HTTP answer counts (a 401 or 404 too: the server is there); so does a TLS handshake
    that fails (MLflow has its own TLS settings). A local store (sqlite, a folder) is not probed."""
    if not pipe.tracking.enabled:
        return
    env = os.environ.get("MLFLOW_TRACKING_URI")
    uri = env or pipe.tracking.uri
    if not uri or not uri.startswith(("http://", "https://")):
        return
    key = "MLFLOW_TRACKING_URI" if env else "tracking.uri"
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason: Any = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError | ssl.CertificateError):
            return
        fix = (f"start the server (mlflow server --host ... --port ...), fix {key}, or set tracking.enabled: false "
               "(or leave tracking.uri out for the sqlite store in runs_dir)")
        raise ConfigError(f"{key}: no MLflow server answers at {_shown(uri)} ({reason or type(exc).__name__}); "
                          f"{fix}") from None


def check_datasets(pipe: PipelineConfig, *, prepared: bool = True) -> None:
    """Each `data:` entry a phase reads: its manifest reads (a bucket that does not answer, a manifest of
    another version: one line each); with `prepared`, a folder without `_manifest.json` is one line too."""
    from datasets_prep.manifest import read_manifest
    from raytrain.jobs import used_datasets

    missing: list[tuple[str, str]] = []
    for name in used_datasets(pipe):
        key = f"data.{name}.shards"
        path = resolve(pipe.data[name].shards)
        try:
            read_manifest(path)
        except FileNotFoundError:
            missing.append((key, path))
        except ValueError as exc:  # another schema version (the message names the file), a manifest not JSON
            why = (str(exc).splitlines() or [type(exc).__name__])[0]
            if path not in why:
                why = f"{path}/_manifest.json is not a manifest ({why}); re-run raytrain prep to rewrite it"
            raise ConfigError(f"{key}: {why}") from None
        except OSError as exc:
            if not is_uri(path):
                raise ConfigError(f"{key}: {path} cannot be read ({exc}); check the folder") from None
            raise ConfigError(f"{key}: {path} cannot be reached ({_detail(exc)}); {_bucket_fix(path)}") from None
    if missing and prepared:
        (key, path), more = missing[0], missing[1:]
        also = f", nor is {', '.join(k for k, _ in more)}" if more else ""
        what = "does not exist" if not is_uri(path) and not os.path.isdir(path) else "has no _manifest.json"
        raise ConfigError(f"{key}: {path} {what}: not a prepared dataset{also}; prepare it first ({PREPARE}), "
                          f"or point {key} at a prepared folder (-o {key}=PATH)")
