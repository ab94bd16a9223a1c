"""Checkpoints are data: a file whose pickle would run code is refused by every path that reads one
(`init_from` and `ckpt diff` through load_weights, `infer`, a resumed phase's state.pt), and nothing in it runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from raytrain.checkpoints import CheckpointError, load_data, load_weights
from raytrain.cli import main

MODEL = {"name": "convtasnet", "args": {
    "sample_rate": 8000, "num_sources": 2, "enc_kernel_size": 16, "enc_num_feats": 8, "msk_kernel_size": 3,
    "msk_num_feats": 8, "msk_num_hidden_feats": 16, "msk_num_layers": 1, "msk_num_stacks": 1}}


class RunsCode:
    """Unpickling this runs a shell command, as a hostile checkpoint would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def hostile(path: Path, marker: Path, **extra: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.zeros(2)}, "extra": RunsCode(marker), **extra}, path)
    return path


def test_the_payload_does_run_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The fixture is real: without weights_only the file executes its command."""
    marker = tmp_path / "ran"
    torch.load(hostile(tmp_path / "model.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["model.pt", "state.pt"])
def test_load_weights_and_load_data_refuse_it_naming_the_file(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "ran"
    path = hostile(tmp_path / "ckpt" / name, marker)
    with pytest.raises(CheckpointError, match=rf"{name}: refused: .*data only"):
        load_weights(path if name == "model.pt" else path.parent)
    with pytest.raises(CheckpointError, match="refused"):
        load_data(path)
    assert not marker.exists()


def test_a_plain_state_dict_and_a_training_state_still_load(tmp_path: Path) -> None:
    state = {"model": {"w": torch.ones(3)}, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99)}]},
             "rng": [{"numpy": ["MT19937", torch.zeros(624, dtype=torch.int64), 0, 0, 0.0]}], "best": None,
             "data_position": [{"picks": 3, "epoch": {"train": 1}, "consumed": {"train": 7}}]}
    torch.save(state, tmp_path / "state.pt")
    loaded = load_data(tmp_path / "state.pt")
    assert loaded["data_position"] == state["data_position"] and torch.equal(load_weights(tmp_path)["w"], torch.ones(3))


def test_a_truncated_file_is_named(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(100)}, tmp_path / "model.pt")
    (tmp_path / "model.pt").write_bytes((tmp_path / "model.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match="model.pt: not a readable torch checkpoint"):
        load_weights(tmp_path / "model.pt")


def test_ckpt_diff_refuses_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "unit", "data": {"tr": {"shards": "nowhere"}}, "model": MODEL,
                                        "defaults": {"train": ["tr"], "losses": {"si_sdr_pit": 1.0}},
                                        "phases": [{"name": "a"}]}))
    ckpt = hostile(tmp_path / "model.pt", marker)
    assert main(["ckpt", "diff", str(ckpt), str(pipeline), "--phase", "a"]) != 0
    assert "refused" in capsys.readouterr().err and not marker.exists()


def test_infer_refuses_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from raytrain.config import load_config

    marker = tmp_path / "ran"
    cfg = load_config(raw={"name": "unit", "data": {"tr": {"shards": "nowhere"}}, "model": MODEL,
                           "defaults": {"train": ["tr"], "losses": {"si_sdr_pit": 1.0}}, "phases": [{"name": "a"}]})
    run = tmp_path / "runs" / "unit" / "1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    ckpt = hostile(run / "a" / "best" / "model.pt", marker)
    (run / "summary.json").write_text(json.dumps({"pipeline": "p", "run_id": "r", "phases": {"a": {"status": "finished", "best_checkpoint": str(ckpt)}}}))
    wav = tmp_path / "mix.wav"
    sf.write(str(wav), np.zeros(8000, dtype=np.float32), 8000)
    assert main(["infer", str(run), str(wav), "-o", str(tmp_path / "out")]) != 0
    assert "refused" in capsys.readouterr().err and not marker.exists()
