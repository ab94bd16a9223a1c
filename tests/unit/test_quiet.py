"""Quiet by default: Ray's worker log lines only with --verbose; the prep executor's Ray Data call without the
deprecated `concurrency=` (no Ray started here)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from raytrain import session
from raytrain.cli import build_parser


@pytest.mark.parametrize("argv", [["run", "p.yaml"], ["tune", "p.yaml", "--sweep", "s.yaml"], ["demo"],
                                  ["prep", "p.yaml"]])
def test_verbose_is_off_unless_asked(argv: list[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(argv).verbose is False
    assert parser.parse_args([*argv, "--verbose"]).verbose is True
    assert parser.parse_args([*argv, "-v"]).verbose is True


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_init_forwards_worker_logs_only_when_verbose(verbose: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    seen: dict[str, Any] = {}
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(session, "_VERBOSE", session._VERBOSE)
    session.set_verbose(verbose)
    session.ray_init()
    assert seen["log_to_driver"] is verbose


def test_prep_gives_ray_data_a_compute_strategy_not_concurrency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    import ray.data

    from datasets_prep.execute import run_chunks

    calls: list[dict[str, Any]] = []

    class Source:
        def map_batches(self, fn: Any, **kw: Any) -> Any:
            calls.append(kw)
            return self

        def iter_rows(self) -> list[Any]:
            return []

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.data, "from_items", lambda items, **kw: Source())
    chunks: list[tuple[int, list[dict[str, Any]], str]] = [(i, [{"path": f"{i}.wav"}], "k") for i in range(4)]
    run_chunks(tmp_path, chunks, {}, 3, lambda rec: None)
    run_chunks(tmp_path, chunks[:1], {}, 3, lambda rec: None)
    assert ["concurrency" in kw for kw in calls] == [False, False]
    # tasks, at most `workers` at once and no more than the chunks (Ray Data warns of a limit above its inputs)
    assert [kw["compute"] for kw in calls] == [ray.data.TaskPoolStrategy(size=3), ray.data.TaskPoolStrategy(size=1)]


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_datas_end_of_read_line_only_when_verbose(verbose: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    name = "ray.data._internal.execution.streaming_executor"  # "Dataset ... execution finished in 0.06 seconds"
    logger = logging.getLogger(name)
    before = logger.level
    monkeypatch.setattr(session, "_VERBOSE", verbose)
    try:
        logger.setLevel(logging.NOTSET)
        session.quiet_data_context()
        assert logger.level == (logging.NOTSET if verbose else logging.WARNING)  # verbose: Ray Data's own level
    finally:
        logger.setLevel(before)


def test_a_new_sqlite_store_is_created_without_mlflows_info_lines(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from raytrain.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "quiet")  # MLflow's own handler writes to stderr
    assert tracker.experiment_id and (tmp_path / "mlflow.db").is_file()
    out, err = capfd.readouterr()
    assert "database tables" not in out + err, out + err


def test_ray_init_keeps_the_users_state_api_address_and_passes_num_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    seen: dict[str, Any] = {}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:1"  # the user's own: raytrain neither replaces nor drops it
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    session.ray_init(num_cpus=2)
    assert seen["num_cpus"] == 2 and "dashboard_port" not in seen
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:1"
