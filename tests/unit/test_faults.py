"""datasets_prep.faults.pause_point: a no-op unless RAYTRAIN_PAUSE_AT names the point; there it blocks once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from datasets_prep import faults

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh_env_read() -> Iterator[None]:
    """The variable is read once per process: let each test's environment count, and leave none behind."""
    faults.pause_at.cache_clear()
    yield
    faults.pause_at.cache_clear()


def _returns_at_once(kind: str, n: int, marker_dir: Path) -> None:
    t0 = time.monotonic()
    faults.pause_point(kind, n, marker_dir)
    assert time.monotonic() - t0 < 1.0


def test_unset_variable_never_pauses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faults.ENV, raising=False)
    _returns_at_once("step", 3, tmp_path)
    assert faults.pause_at() is None and not list(tmp_path.iterdir())


def test_other_points_do_not_pause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "step=3")
    _returns_at_once("step", 2, tmp_path)
    _returns_at_once("shard", 3, tmp_path)
    assert not list(tmp_path.iterdir())


def test_the_named_point_blocks_after_writing_its_marker(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from datasets_prep.faults import pause_point\n"
            "pause_point('step', 2, Path(sys.argv[1])); pause_point('step', 3, Path(sys.argv[1]))\n"
            "print('went past the pause point')")
    env = {**os.environ, faults.ENV: "step=3", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    marker = faults.marker_path("step", 3, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"no marker; exit code {proc.poll()}"
        time.sleep(0.5)
        assert proc.poll() is None, "the process went on past its pause point"
        assert marker.read_text().strip() == str(proc.pid)
        assert [p.name for p in tmp_path.iterdir()] == [marker.name]  # no temporary file left
    finally:
        proc.kill()
        out = proc.communicate(timeout=30)[0].decode()
    assert "went past" not in out and "paused at step=3" in out


def test_a_point_already_marked_does_not_pause_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "trial=3")
    faults.marker_path("trial", 3, tmp_path).write_text("123\n")
    _returns_at_once("trial", 3, tmp_path)


@pytest.mark.parametrize("value", ["step", "epoch=3", "step=x", "step=-1"])
def test_a_malformed_variable_is_an_error_naming_it(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, value)
    with pytest.raises(ValueError, match=faults.ENV):
        faults.pause_point("step", 1, Path("."))
