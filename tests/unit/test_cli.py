"""`raytrain plan` through the CLI entry point: exit codes, stdout table, stderr errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import yaml

from datasets_prep.shards import read_manifest
from raytrain.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
TINY = dict(sample_rate=8000, enc_kernel_size=16, enc_num_feats=32, msk_num_feats=32, msk_num_hidden_feats=64,
            msk_num_layers=2, msk_num_stacks=1)


def write_config(tmp_path: Path, mutate: Any = None) -> Path:
    raw: dict[str, Any] = {
        "name": "cli_test",
        "data": {"train": {"shards": str(tmp_path / "shards" / "train")}},
        "model": {"name": "convtasnet", "args": dict(TINY)},
        "defaults": {"train": ["train"], "losses": {"si_sdr_pit": 1.0}, "optim": {"lr": 1e-3}},
        "phases": [{"name": "first", "max_steps": 20}, {"name": "second", "init_from": "first", "max_steps": 10}],
    }
    if mutate:
        mutate(raw)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_plan_prints_table(tmp_path, capsys) -> None:
    path = write_config(tmp_path)
    assert main(["plan", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("pipeline cli_test (seed 0, 2 phases)\n")
    assert "[0] first  (train)" in out and "[1] second  (train)" in out
    assert "    train    train x1: NOT PREPARED (no _manifest.json)" in out
    assert "    init     phase first (best)" in out
    assert "20 steps" in out and "10 steps" in out


def test_plan_with_overrides(tmp_path, capsys) -> None:
    path = write_config(tmp_path)
    code = main(["plan", str(path), "-o", "phases.second.max_steps=33", "--override", "phases.0.optim.lr=3e-4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "33 steps" in out and "adamw lr 0.0003" in out


def test_misspelt_key_exits_2_naming_the_key(tmp_path, capsys) -> None:
    path = write_config(tmp_path, lambda r: r["phases"][1].update(max_step=5))
    assert main(["plan", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error: {path}: invalid config (1 problem)")
    assert "phases[1](second).max_step: unknown key. Did you mean 'max_steps'?" in err


def test_misspelt_override_exits_2(tmp_path, capsys) -> None:
    path = write_config(tmp_path)
    assert main(["plan", str(path), "-o", "phases.0.optim.lrr=1"]) == 2
    assert "phases[0](first).optim.lrr: unknown key. Did you mean 'lr'?" in capsys.readouterr().err
    assert main(["plan", str(path), "-o", "phases.secnd.max_steps=1"]) == 2
    assert "no list entry named 'secnd'; did you mean 'second'?" in capsys.readouterr().err


def test_freeze_pattern_matching_nothing_exits_2(tmp_path, capsys) -> None:
    path = write_config(tmp_path, lambda r: r["phases"][1].update(freeze=["net.encodr.*"]))
    assert main(["plan", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: the pipeline has problems:")
    assert "phases[1](second).freeze: pattern 'net.encodr.*' matches no parameter" in err


def test_missing_config_file_exits_2(tmp_path, capsys) -> None:
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    assert f"error: {tmp_path / 'nope.yaml'}: config file not found" in capsys.readouterr().err


def test_plan_shipped_tiny_pipeline(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # relative data paths resolve here: never prepared
    assert main(["plan", str(REPO / "configs" / "pipelines" / "separation_tiny.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pipeline separation_tiny (seed 1234, 3 phases)\n")
    assert "[0] short  (train)" in out and "[1] long  (train)" in out and "[2] export  (export)" in out
    assert "    init     phase short (best)" in out
    assert "    optim    adam lr 0.002, warmup 50, constant" in out
    assert "    gates    eval/si_sdri >=5" in out
    assert "NOT PREPARED" in out


def test_parser_needs_a_command(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([])
    assert info.value.code == 2
    args = build_parser().parse_args(["plan", "x.yaml", "-o", "a=1", "-o", "b=2"])
    assert args.config == "x.yaml" and args.override == ["a=1", "b=2"]


def test_prep_split_writes_one_manifest_per_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "m.jsonl"
    src.write_text("".join(f'{{"idx": {k}, "audio_path": "{k}.wav", "speaker": "s{k % 4}"}}\n' for k in range(40)))
    assert main(["prep", "split", str(src), "--ratios", "valid=0.25", "--by", "speaker", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "m.valid.jsonl" in out and "m.train.jsonl" in out
    assert len((tmp_path / "m.valid.jsonl").read_text().splitlines()) == 10  # one of 4 equal speakers


def test_prep_flag_form_names_what_is_missing(capsys: pytest.CaptureFixture) -> None:
    assert main(["prep", "--format", "jsonl"]) == 2
    assert "--input, --output-dir missing" in capsys.readouterr().err
    assert main(["prep", "--input", "x", "--format", "kaldi", "--output-dir", "o", "--workers", "0"]) == 2
    assert "--format: Input should be 'speaker-dirs', 'jsonl', 'tsv' or 'wsj0-2mix'" in capsys.readouterr().err
    assert main(["prep", "--input", "x", "--format", "tsv", "--output-dir", "o", "--steps", "resample"]) == 2
    assert "resample needs sample_rate" in capsys.readouterr().err


def test_prep_flag_form_splits_by_speaker(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for k in range(8):
        spk = tmp_path / "raw" / f"spk{k % 4}"
        spk.mkdir(parents=True, exist_ok=True)
        sf.write(str(spk / f"u{k}.wav"), 0.1 * np.sin(np.arange(4000) * (0.05 + 0.01 * k)), 8000, subtype="PCM_16")
    assert main(["prep", "--input", str(tmp_path / "raw"), "--format", "speaker-dirs", "--output-dir",
                 str(tmp_path / "out"), "--split", "train=0.75,test=0.25", "--split-by", "speaker", "--workers",
                 "0"]) == 0
    test = read_manifest(tmp_path / "out" / "test")
    assert test["rows"] == 2 and test["num_speakers"] == 1 and read_manifest(tmp_path / "out" / "train")["rows"] == 6
    assert "test" in capsys.readouterr().out


def test_infer_takes_files_after_options_and_none_for_a_song() -> None:
    import argparse

    from raytrain.cli import infer_args

    def parse(*argv: str) -> argparse.Namespace:
        return infer_args(argparse.ArgumentParser()).parse_intermixed_args(list(argv))

    args = parse("runs/x", "--ref", "r.wav", "a.wav", "b.wav", "-o", "out")
    assert (args.source, args.inputs, args.ref, args.output) == ("runs/x", ["a.wav", "b.wav"], "r.wav", "out")
    song = parse("runs/x", "--lyrics", "[verse] la", "--prompt", "p.wav", "-o", "s.wav")
    assert (song.source, song.inputs, song.lyrics, song.prompt) == ("runs/x", [], "[verse] la", "p.wav")


def test_infer_without_inputs_or_with_half_a_song_exits_2(tmp_path, capsys) -> None:
    assert main(["infer", str(tmp_path)]) == 2
    assert "give input audio files" in capsys.readouterr().err
    assert main(["infer", str(tmp_path), "--lyrics", "la"]) == 2
    assert "both --lyrics and --prompt" in capsys.readouterr().err
