"""`raytrain infer`'s run-folder lookup (`raytrain.infer.locate`) on real run folders and a storage folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from raytrain.config import load_config
from raytrain.infer import load_model, locate
from raytrain.models import build_model

MODEL = {"name": "convtasnet", "args": {
    "sample_rate": 8000, "num_sources": 2, "enc_kernel_size": 16, "enc_num_feats": 8, "msk_kernel_size": 3,
    "msk_num_feats": 8, "msk_num_hidden_feats": 16, "msk_num_layers": 1, "msk_num_stacks": 1}}


def _run(tmp_path: Path, **entry: str) -> Path:
    """A run folder as the pipeline leaves it: config.yaml and summary.json, phase `a` finished."""
    cfg = load_config(raw={"name": "unit", "data": {"tr": {"shards": "nowhere"}}, "model": MODEL,
                           "defaults": {"train": ["tr"], "losses": {"si_sdr_pit": 1.0}}, "phases": [{"name": "a"}]})
    run = tmp_path / "runs" / "unit" / "20261203-000000"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (run / "summary.json").write_text(json.dumps({"pipeline": "p", "run_id": "r", "phases": {"a": {"status": "finished", **entry}}}))
    return run


def test_weights_missing_here_are_fetched_from_the_runs_storage(tmp_path: Path) -> None:
    torch.manual_seed(5)
    state = build_model(MODEL["name"], dict(MODEL["args"])).state_dict()
    stored = tmp_path / "bucket" / "unit" / "20261203-000000" / "a" / "best" / "model.pt"
    stored.parent.mkdir(parents=True)
    torch.save(state, stored)
    run = _run(tmp_path, best_checkpoint=str(tmp_path / "elsewhere" / "a" / "best" / "model.pt"),
               best_checkpoint_uri=str(stored))
    weights, _ = locate(run)
    assert weights == tmp_path / "elsewhere" / "a" / "best" / "model.pt" and weights.read_bytes() == stored.read_bytes()
    model = load_model(run)  # now from the local copy
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_weights_in_neither_place_name_both(tmp_path: Path) -> None:
    here, there = tmp_path / "gone" / "model.pt", tmp_path / "bucket" / "model.pt"
    run = _run(tmp_path, best_checkpoint=str(here), best_checkpoint_uri=str(there))
    with pytest.raises(FileNotFoundError, match="neither at .*gone/model.pt nor at .*bucket/model.pt"):
        locate(run)
