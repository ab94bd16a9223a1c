"""Shared worlds for integration tests: a tiny espeak-ng corpus and a local, loopback-only Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # single-node Ray on 127.0.0.1 only
# Ray workers inherit this, so test configs can name user parts as "tests.integration._faults:nan_loss".
ROOT = Path(__file__).resolve().parents[2]
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

TINY_MODEL = {"name": "convtasnet", "args": {
    "sample_rate": 8000, "num_sources": 2, "enc_kernel_size": 16, "enc_num_feats": 16, "msk_kernel_size": 3,
    "msk_num_feats": 16, "msk_num_hidden_feats": 32, "msk_num_layers": 2, "msk_num_stacks": 1}}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test here starts Ray (or a server, or a cluster): `-m "not integration"` must leave it out."""
    here = Path(__file__).parent
    unmarked = [i.nodeid for i in items if here in Path(str(i.path)).parents and i.get_closest_marker("integration") is None]
    if unmarked:
        raise pytest.UsageError(f"tests under {here.name}/ need the `integration` mark (pytestmark): {unmarked}")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ (speech, 6 voices), dev/ (8 fixed mixtures of 2 held-out voices) at 8 kHz."""
    from datasets_prep.prep import run_prep

    root = tmp_path_factory.mktemp("corpus")
    cfg = {
        "name": "it_tiny", "sample_rate": 8000, "raw_dir": str(root / "raw"), "output_dir": str(root / "shards"),
        "generator": {"kind": "espeak", "seed": 0, "train_voices": 6, "dev_voices": 2, "train_sentences": 30,
                      "dev_sentences": 8, "utterances_per_voice": 5},
        "dev_mixtures": {"num": 8, "max_seconds": 1.5, "seed": 1},
        "rows_per_shard": 8,
        "workers": 0,  # in this process: the corpus needs no Ray, and leaves none started behind it
    }
    path = root / "prep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_prep(path)
    return root / "shards"


@pytest.fixture(scope="session")
def ray_local() -> Any:
    import ray

    from raytrain.session import ray_init

    if ray.is_initialized():  # started by code under test (e.g. an in-process prep): start ours instead
        ray.shutdown()
    # As raytrain starts a local Ray (its environment, its own State API for Ray Train's placement-group
    # cleaner), with 2 CPUs on any machine.
    ray_init(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def recipe_data(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`recipe_data(name)`: a folder with raw/ and shards/ of the tiny recipe's own prep config, shrunk
    (tests/integration/_recipes.py), prepared once per session."""
    from ._recipes import prepare

    roots: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in roots:
            roots[name] = tmp_path_factory.mktemp(name)
            prepare(name, roots[name])
        return roots[name]

    return get


@pytest.fixture(scope="session")
def recipe_run(recipe_data: Any, ray_local: Any) -> Any:
    """`recipe_run(name)`: the tiny recipe run cut short on `recipe_data(name)`, once per session, shared by
    the tests that inspect it (test_recipes.py for every recipe, the recipe's own test module)."""
    from ._recipes import run_recipe

    runs: dict[str, dict[str, Any]] = {}

    def get(name: str) -> dict[str, Any]:
        if name not in runs:
            runs[name] = run_recipe(name, recipe_data(name))
        return runs[name]

    return get


def pipeline_dict(corpus: Path, runs: Path, **phase_b: Any) -> dict[str, Any]:
    """Two short phases: `a` trains everything, `b` starts from `a` (options in phase_b)."""
    mix = [{"name": "dynamic_mix", "args": {"num_speakers": 2, "crop_seconds": 0.5}}]
    return {
        "name": "it_sep", "seed": 7, "runs_dir": str(runs),
        "tracking": {"uri": f"sqlite:///{runs / 'mlflow.db'}"},
        "data": {"train": {"shards": str(corpus / "train")}, "dev": {"shards": str(corpus / "dev")}},
        "model": TINY_MODEL,
        "scaling": {"num_workers": 1},
        "defaults": {"train": ["train"], "eval": "dev", "losses": {"si_sdr_pit": 1.0}, "metrics": ["si_sdri"],
                     "best_metric": "eval/si_sdri", "batch_size": 4, "transforms": mix, "log_every": 2,
                     "optim": {"name": "adam", "lr": 3e-3}, "shuffle_buffer": 16},
        "phases": [
            {"name": "a", "max_steps": 8, "eval_every": 4, "checkpoint_every": 4},
            {"name": "b", "init_from": "a", "max_steps": 6, "eval_every": 3, "checkpoint_every": 3, **phase_b},
        ],
    }


def raytrain_cli(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """`raytrain ARGS` in a new session: killing its group kills the driver and the local Ray it started,
    as a crash would."""
    return subprocess.Popen([sys.executable, "-m", "raytrain.cli", *args], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ})


def _session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getsid(int(d.name)) == sid and (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(int(d.name))
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    return out


def crash(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGKILL a `raytrain_cli` process and every process of its session, as a machine crash would, and wait
    until none is left. Killing its process group alone is not enough: Ray's workers lead their own process
    groups and go on running (and writing checkpoints) for seconds after the raylet dies."""
    deadline = time.monotonic() + timeout
    while members := _session_members(proc.pid):
        assert time.monotonic() < deadline, f"processes of session {proc.pid} still alive: {members}"
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)  # the killed driver stays a zombie (not a member) until the wait below
    proc.wait(timeout=30)


def registered_checkpoints(phase_dir: Path) -> list[str]:
    """The checkpoints Ray Train's run snapshot lists: what a resumed phase starts from. A worker writes a
    checkpoint folder before the controller registers it, so a crash in between resumes from the one before."""
    try:
        snap = json.loads((phase_dir / "ray" / "checkpoint_manager_snapshot.json").read_text())
        return [c["checkpoint_dir_name"] for c in snap["checkpoint_results"]]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def checkpoints_of(phase_dir: Path) -> list[Path]:
    """The Ray Train checkpoints a phase has written so far."""
    return sorted(p for p in (phase_dir / "ray").glob("checkpoint_*") if p.is_dir()) if (phase_dir / "ray").exists() else []


def controller_probe(record: Path) -> Any:
    """A Ray Train callback that appends, from inside each phase's Train controller process, whether torch was
    imported there by the time training ended (raytrain's backend keeps it out: raytrain/phases/backend.py).
    Defined in a function so that it travels by value: the controller imports nothing of the tests."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class ControllerModules(ControllerCallback):
        def after_controller_finish(self, result: Any) -> None:
            import sys as controller_sys

            with open(record, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "torch": "torch" in controller_sys.modules}) + "\n")

    return ControllerModules()


def controller_records(record: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in record.read_text().splitlines()]
