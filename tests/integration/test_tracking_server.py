"""The pipeline against a real MLflow tracking server: a `mlflow server` on 127.0.0.1 with a sqlite store that
serves the artifacts itself. Everything is read back over HTTP: runs, metric history, artifacts (downloaded
through the server), the logged phase models and the registered model version."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from raytrain.checkpoints import load_weights
from raytrain.config import load_config
from raytrain.models import build_model
from raytrain.pipeline import PipelineRunner

from .conftest import TINY_MODEL, pipeline_dict

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REGISTERED = "it_sep_separator"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """TERM the server's process group (the CLI, uvicorn and its worker), KILL what is left."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # workers outliving the CLI process (its group id is the CLI's pid)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # No background job runner (it starts 8 more Python processes), no telemetry to the internet.
    env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    log_path = root / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
           "--artifacts-destination", str(root / "artifacts")]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, last = time.monotonic() + 60, "no answer yet"
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode} before answering /health:\n"
                            f"{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
                    last = f"HTTP {r.status}"
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                last = repr(e)
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server at {url} did not answer /health within 60 s ({last}):\n"
                            f"{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield {"url": url, "artifacts": root / "artifacts", "log": log_path}
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def served_run(corpus: Path, ray_local: Any, mlflow_server: dict[str, Any],
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    runs = tmp_path_factory.mktemp("runs")
    raw = pipeline_dict(corpus, runs)
    raw["tracking"] = {"uri": mlflow_server["url"], "register_as": REGISTERED}
    runner = PipelineRunner(load_config(raw=raw), progress=False)
    summary = runner.run()
    return {"summary": summary, "run_dir": runner.run_dir, "runs": runs}


def _client(url: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def test_runs_metrics_and_artifacts_go_through_the_server(served_run: dict[str, Any], mlflow_server: dict[str, Any],
                                                          tmp_path: Path) -> None:
    import mlflow.artifacts

    url, summary, run_dir = mlflow_server["url"], served_run["summary"], served_run["run_dir"]
    assert summary["status"] == "finished" and summary["mlflow_uri"] == url
    assert not (served_run["runs"] / "mlflow.db").exists()  # nothing went to the default sqlite store
    client = _client(url)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")  # uploads and downloads go through the server
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert sorted(by_name) == ["a", "b"]
    for name, run in by_name.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_id == summary["phases"][name]["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(by_name["a"].info.run_id, "eval/si_sdri")] == [4, 8]
    evals = client.get_metric_history(by_name["b"].info.run_id, "eval/si_sdri")
    assert [m.step for m in evals] == [3, 6]
    assert evals[-1].value == pytest.approx(summary["phases"]["b"]["final_metrics"]["eval/si_sdri"])

    b_id = by_name["b"].info.run_id
    listed = {a.path for a in client.list_artifacts(b_id)}
    assert {"config.yaml", "load_report.json", "load_report.txt", "checkpoint"} <= listed
    got = Path(mlflow.artifacts.download_artifacts(run_id=b_id, artifact_path="config.yaml", tracking_uri=url,
                                                   dst_path=str(tmp_path / "dl")))
    assert got.read_bytes() == (run_dir / "b" / "config.yaml").read_bytes()
    assert yaml.safe_load(got.read_text())["init_from"] == "a"
    got = Path(mlflow.artifacts.download_artifacts(run_id=b_id, artifact_path="load_report.json", tracking_uri=url,
                                                   dst_path=str(tmp_path / "dl")))
    report = json.loads(got.read_text())
    assert report["loaded"] and report["not_initialised"] == []
    assert got.read_bytes() == (run_dir / "b" / "load_report.json").read_bytes()
    got = Path(client.download_artifacts(b_id, "checkpoint/model.pt", str(tmp_path / "ckpt")))
    best = load_weights(summary["phases"]["b"]["best_checkpoint"])
    assert all(torch.equal(v, best[k]) for k, v in load_weights(got).items())
    # The server stored them in its --artifacts-destination, not the client.
    assert list(mlflow_server["artifacts"].rglob("load_report.json"))
    got = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="summary.json",
                                                   tracking_uri=url, dst_path=str(tmp_path / "parent")))
    assert json.loads(got.read_text())["phases"]["b"]["mlflow_model_uri"] == summary["phases"]["b"]["mlflow_model_uri"]


def test_phase_models_load_from_the_server_and_match_the_best_checkpoints(
        served_run: dict[str, Any], mlflow_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pytorch

    url, summary = mlflow_server["url"], served_run["summary"]
    client = _client(url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # models:/ URIs resolve against the process-wide store
    torch.manual_seed(0)
    batch = {"mix": torch.randn(2, 4000), "lengths": torch.tensor([4000, 3000])}
    uris = []
    for name in ("a", "b"):
        entry = summary["phases"][name]
        assert "mlflow_model_error" not in entry
        uri = entry["mlflow_model_uri"]
        assert uri.startswith("models:/")
        uris.append(uri)
        logged = client.get_logged_model(uri.removeprefix("models:/"))
        assert logged.source_run_id == entry["mlflow_run_id"]
        # Filed under the pipeline's experiment (not "Default"), its files in the server's artifact store.
        assert logged.experiment_id == client.get_run(entry["mlflow_run_id"]).info.experiment_id
        assert list(mlflow_server["artifacts"].rglob(f"{logged.model_id}/artifacts/MLmodel"))
        # The run's eval metrics at the phase's last step are linked to the model.
        assert {m.key for m in logged.metrics} >= {"eval/si_sdri"}

        loaded = mlflow.pytorch.load_model(uri).eval()
        rebuilt = build_model(TINY_MODEL["name"], dict(TINY_MODEL["args"]))
        rebuilt.load_state_dict(load_weights(entry["best_checkpoint"]))
        rebuilt.eval()
        want = rebuilt.state_dict()
        got = loaded.state_dict()
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want), f"phase {name}: weights differ"
        with torch.no_grad():
            assert torch.equal(loaded(batch)["est_sources"], rebuilt(batch)["est_sources"])
    assert uris[0] != uris[1]


def test_only_the_final_phase_is_registered(served_run: dict[str, Any], mlflow_server: dict[str, Any],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pytorch

    url, phases = mlflow_server["url"], served_run["summary"]["phases"]
    versions = _client(url).search_model_versions(f"name='{REGISTERED}'")
    assert len(versions) == 1
    (v,) = versions
    assert v.run_id == phases["b"]["mlflow_run_id"]
    assert v.source == phases["b"]["mlflow_model_uri"]
    assert v.status == "READY"
    assert phases["b"]["mlflow_registered_model"] == {"name": REGISTERED, "version": v.version}
    assert "mlflow_registered_model" not in phases["a"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    model = mlflow.pytorch.load_model(f"models:/{REGISTERED}/{v.version}")
    best = load_weights(phases["b"]["best_checkpoint"])
    assert all(torch.equal(t, best[k]) for k, t in model.state_dict().items())


def test_mlflow_tracking_uri_from_the_environment_wins_when_the_config_has_none(
        corpus: Path, mlflow_server: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = mlflow_server["url"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    raw = pipeline_dict(corpus, tmp_path)
    raw["tracking"] = {"experiment": "env_uri"}  # no uri: $MLFLOW_TRACKING_URI, else sqlite beside the runs
    runner = PipelineRunner(load_config(raw=raw), progress=False)  # creates the experiment; runs nothing
    assert runner.tracker.uri == url and runner.summary.mlflow_uri == url
    exp = _client(url).get_experiment_by_name("env_uri")
    assert exp is not None and exp.experiment_id == runner.tracker.experiment_id
    assert not (tmp_path / "mlflow.db").exists()
