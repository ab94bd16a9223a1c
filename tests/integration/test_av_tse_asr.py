"""configs/pipelines/av_tse_asr_tiny.yaml end to end on local Ray, cut short (tests/integration/_recipes.py):
step 1 changes only the separator, step 3 leaves it bit for bit as step 2 left it, step 3's batches come from
both corpora as its weights draw them, the video checks score step 2's weights, and `raytrain infer` extracts
the target of a dev mixture with its lip video (and refuses a video of the wrong length in one line)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from datasets_prep.codecs import decode_audio
from datasets_prep.manifest import read_manifest, shard_paths
from raytrain.checkpoints import load_weights
from raytrain.config import load_config
from raytrain.data.stream import pick_source

RECIPE = "av_tse_asr_tiny"
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def av_run(recipe_run: Any) -> dict[str, Any]:
    return recipe_run(RECIPE)


def _changed(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    assert a.keys() == b.keys()
    return {k for k in a if not np.array_equal(a[k].numpy(), b[k].numpy())}


def test_step_1_trains_only_the_separator_and_step_3_leaves_it_alone(av_run: dict[str, Any]) -> None:
    phases = av_run["summary"]["phases"]
    pretrain, tse = load_weights(phases["pretrain"]["best_checkpoint"]), load_weights(phases["tse"]["last_checkpoint"])
    changed = _changed(pretrain, tse)
    assert changed and all(k.startswith("separator.") for k in changed)
    assert not any(k.startswith("separator.") for k in _changed(load_weights(phases["pretrain"]["best_checkpoint"]),
                                                                load_weights(phases["pretrain"]["last_checkpoint"])))
    multitask = load_weights(phases["multitask"]["best_checkpoint"])
    ft = load_weights(phases["ft_second_corpus"]["last_checkpoint"])
    changed = _changed(multitask, ft)
    assert changed and not any(k.startswith("separator.") for k in changed)
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("ctc.") for k in changed)


def test_step_3_draws_batches_from_both_corpora_by_weight(av_run: dict[str, Any]) -> None:
    cfg = load_config(av_run["run_dir"] / "config.yaml")
    ft = cfg.phase("ft_second_corpus")
    weights = np.array([s.weight for s in ft.train])
    metrics = av_run["summary"]["phases"]["ft_second_corpus"]["final_metrics"]
    counts = [metrics[f"data/batches/{s.name}"] for s in ft.train]
    steps = av_run["steps"]
    assert sum(counts) == steps * ft.grad_accum
    drawn = [pick_source(cfg.seed, k, weights / weights.sum()) for k in range(steps * ft.grad_accum)]
    assert counts == [drawn.count(i) for i in range(len(ft.train))]


def test_the_video_checks_score_step_2(av_run: dict[str, Any]) -> None:
    phases = av_run["summary"]["phases"]
    for name in ("swapped_video", "zero_video", "multitask_second"):
        m = phases[name]["final_metrics"]
        assert {"eval/si_sdri", "eval/cer"} <= set(m), (name, m)
    # the same weights and rows: only the video differs, so the scores do
    assert phases["swapped_video"]["final_metrics"]["eval/si_sdri"] != phases["multitask"]["final_metrics"]["eval/si_sdri"]


def test_infer_extracts_the_target_with_its_video(av_run: dict[str, Any], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from raytrain.cli import main

    dev = Path(load_config(av_run["run_dir"] / "config.yaml").data["main_dev"].shards)
    man = read_manifest(dev)
    row = pq.read_table(shard_paths(dev, man)[0]).to_pylist()[0]
    mix = decode_audio(row["mix"], man.get("audio_format", "pcm_s16le"))
    video = np.frombuffer(row["video"], dtype=np.uint8).reshape(-1, 24, 24, 1)
    sf.write(tmp_path / "mix.wav", mix, 8000)
    np.save(tmp_path / "lips.npy", video)
    assert main(["infer", str(av_run["run_dir"]), "--video", str(tmp_path / "lips.npy"), str(tmp_path / "mix.wav"),
                 "-o", str(tmp_path / "out")]) == 0
    (out, rate), info = sf.read(tmp_path / "out" / "mix_target.wav"), sf.info(tmp_path / "out" / "mix_target.wav")
    assert rate == info.samplerate == 8000 and len(out) == len(mix) and info.subtype == "PCM_16"
    assert "mix.wav ->" in capsys.readouterr().out
    np.save(tmp_path / "short.npy", video[:-3])
    assert main(["infer", str(av_run["run_dir"]), "--video", str(tmp_path / "short.npy"), str(tmp_path / "mix.wav"),
                 "-o", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "short.npy" in err[0] and str(len(video) - 3) in err[0]
