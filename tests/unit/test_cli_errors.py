"""Every user error of the CLI is one line on stderr naming the file or key and the fix, exit code 2, no
traceback; `--debug` raises it instead. Real files throughout: wavs written by soundfile, checkpoints by
torch.save, a run folder as the pipeline leaves it (no Ray: the run cases stop before it would start)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from raytrain.checkpoints import CheckpointError
from raytrain.cli import main
from raytrain.config import load_config
from raytrain.infer import InputError
from raytrain.models import build_model

REPO = Path(__file__).resolve().parents[2]
SR = 8000
MODEL = {"name": "convtasnet", "args": {
    "sample_rate": SR, "num_sources": 2, "enc_kernel_size": 16, "enc_num_feats": 8, "msk_kernel_size": 3,
    "msk_num_feats": 8, "msk_num_hidden_feats": 16, "msk_num_layers": 1, "msk_num_stacks": 1}}
FIX_AUDIO = "give a WAV, FLAC or OGG file"
RESAVE = "give a model.pt/state.pt that a run wrote (torch.save(model.state_dict(), 'model.pt'))"


def pipeline(tmp_path: Path, **top: Any) -> dict[str, Any]:
    return {"name": "unit", "data": {"tr": {"shards": str(tmp_path / "shards" / "tr")}}, "model": MODEL,
            "runs_dir": str(tmp_path / "runs"), "defaults": {"train": ["tr"], "losses": {"si_sdr_pit": 1.0}},
            "phases": [{"name": "a", "max_steps": 2}], **top}


def write_yaml(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr, checked to be exactly one `error: ...` line, without its `error: `."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0].removeprefix("error: ")


def wav(path: Path, seconds: float = 0.5, channels: int = 1) -> Path:
    t = np.arange(int(seconds * SR)) / SR
    sf.write(str(path), np.stack([0.3 * np.sin(2 * np.pi * 220 * t)] * channels, axis=1), SR, subtype="PCM_16")
    return path


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each `run` case must stop before Ray starts: starting it is a failure of the test."""
    import raytrain.pipeline
    import raytrain.session

    def refuse() -> None:
        raise AssertionError("Ray was started: the error should have been found before")

    monkeypatch.setattr(raytrain.pipeline, "ray_init", refuse)
    monkeypatch.setattr(raytrain.session, "ray_init", refuse)  # a sweep imports it when it starts


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder as the pipeline leaves it: config.yaml, summary.json, phase `a`'s best weights."""
    cfg = load_config(raw=pipeline(tmp_path))
    run = tmp_path / "runs" / "unit" / "20261203-000000"
    weights = run / "a" / "best" / "model.pt"
    weights.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_model(MODEL["name"], dict(MODEL["args"])).state_dict(), weights)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (run / "summary.json").write_text(json.dumps({"pipeline": "unit", "run_id": run.name, "phases": {
        "a": {"status": "finished", "best_checkpoint": str(weights)}}}))
    return run


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- 1. infer: inputs --------------------------------------------------------------------------------------

def _bad_input(tmp_path: Path, case: str) -> tuple[Path, str]:
    p = tmp_path / f"{case}.wav"
    if case == "missing":
        return p, f"{p}: input not found"
    if case == "empty":
        p.write_bytes(b"")
        return p, f"{p}: input is an empty file (0 bytes); {FIX_AUDIO}"
    if case == "text":
        p.write_text("these are notes, not audio\n")
        return p, f"{p}: input is not an audio file soundfile can read (Format not recognised); {FIX_AUDIO}"
    if case == "no_samples":
        sf.write(str(p), np.zeros((0, 1), dtype=np.float32), SR)
        return p, f"{p}: input has no samples (a WAV file of 0 s); give a recording"
    assert case == "three_channels"
    return wav(p, channels=3), (f"{p}: input has 3 channels; the model takes mono audio and mixes down only "
                                "stereo: give a mono or stereo file (e.g. one of its channels)")


@pytest.mark.parametrize("case", ["missing", "empty", "text", "no_samples", "three_channels"])
def test_infer_bad_input_is_one_line_and_nothing_is_written(run_dir, tmp_path, capsys, case) -> None:
    bad, message = _bad_input(tmp_path, case)
    good = wav(tmp_path / "good.wav")
    out = tmp_path / "out"
    assert main(["infer", str(run_dir), str(good), str(bad), "-o", str(out)]) == 2
    assert one_error_line(capsys) == message
    assert not out.exists()  # every input is checked before the first is separated


def test_infer_takes_mono_and_stereo(run_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["infer", str(run_dir), str(wav(tmp_path / "m.wav")), str(wav(tmp_path / "st.wav", channels=2)),
                 "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["m_s1.wav", "m_s2.wav", "st_s1.wav", "st_s2.wav"]
    assert capsys.readouterr().err == ""


def test_infer_output_that_is_a_file(run_dir, tmp_path, capsys) -> None:
    taken = tmp_path / "out.txt"
    taken.write_text("x")
    assert main(["infer", str(run_dir), str(wav(tmp_path / "m.wav")), "-o", str(taken)]) == 2
    assert one_error_line(capsys) == f"-o {taken}: is a file; give the folder to write the outputs to"


def test_asr_manifest_and_its_audio_are_checked_before_decoding(tmp_path) -> None:
    from raytrain.asr_infer import read_inputs

    tsv = tmp_path / "m.tsv"
    tsv.write_text(f"id\taudio\ttgt_text\nu1\t{wav(tmp_path / 'u1.wav')}\thi\nu2\tgone.wav\tho\n")
    with pytest.raises(InputError) as info:
        read_inputs([str(tsv)])
    assert str(info.value) == f"{tmp_path / 'gone.wav'}: audio of utterance u2 in {tsv} not found"
    bad = tmp_path / "bad.tsv"
    bad.write_text("name\tpath\nu1\tu1.wav\n")
    with pytest.raises(InputError, match=r"bad.tsv: header \['name', 'path'\] lacks \['id', 'audio'\]"):
        read_inputs([str(bad)])
    with pytest.raises(InputError, match="none.tsv: manifest not found"):
        read_inputs([str(tmp_path / "none.tsv")])


def test_av_mixture_that_is_empty(tmp_path) -> None:
    from raytrain.av_infer import AVInputError, read_mixture

    (tmp_path / "mix.wav").write_bytes(b"")
    with pytest.raises(AVInputError, match=rf"mix.wav: mixture is an empty file \(0 bytes\); {FIX_AUDIO}$"):
        read_mixture(tmp_path / "mix.wav", SR)


def test_vc_with_every_source_bad_exits_2_with_one_line(tmp_path, capsys) -> None:
    """A vc_flow run and a good reference: a missing only source is one line and exit 2 (with others converted
    it would be 1, and a count line)."""
    exe = shutil.which("espeak-ng")
    assert exe, "espeak-ng is installed by `make test` (apt); install it to run these tests"
    ref = tmp_path / "ref.wav"
    subprocess.run([exe, "-v", "en+f3", "-w", str(ref), "please call stella and ask her to bring these things"],
                   check=True, capture_output=True)
    from raytrain import vc_infer

    torch.manual_seed(0)
    model = build_model("vc_flow", {"hidden": 16, "layers": 2, "content_hidden": 16, "content_layers": 1,
                                    "content_dim": 8, "griffin_lim_iters": 4, "sample_steps": 2}).eval()
    assert vc_infer.run(model, ref, [str(tmp_path / "gone.wav")], tmp_path / "out") == 2
    assert one_error_line(capsys) == f"{tmp_path / 'gone.wav'}: source not found"


# ---- 3. infer: the run folder ------------------------------------------------------------------------------

def test_infer_source_that_is_not_a_usable_run(run_dir, tmp_path, capsys) -> None:
    good = str(wav(tmp_path / "good.wav"))
    nowhere = tmp_path / "nowhere"
    assert main(["infer", str(nowhere), good]) == 2
    assert one_error_line(capsys) == (f"{nowhere}: no such run folder or checkpoint; give a run folder "
                                      "runs/<pipeline>/<run_id>, a phase folder or model.pt in one, or an exported "
                                      ".onnx")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert main(["infer", str(plain), good]) == 2
    assert one_error_line(capsys).startswith(f"{plain}: not inside a raytrain run folder (no summary.json in it "
                                             "or above it); give a run folder")
    (run_dir / "summary.json").unlink()  # a run that stopped before its first phase
    assert main(["infer", str(run_dir), good]) == 2
    assert one_error_line(capsys) == (f"{run_dir}: a run folder without summary.json: the run stopped before its "
                                      "first phase started, so it has no weights; give a run whose phases finished")


def test_infer_damaged_summary_unknown_phase_and_bad_onnx(run_dir, tmp_path, capsys) -> None:
    good = str(wav(tmp_path / "good.wav"))
    assert main(["infer", str(run_dir), good, "--phase", "b"]) == 2
    assert one_error_line(capsys) == f"--phase b: {run_dir} has no such phase; its phases: a"
    (run_dir / "summary.json").write_text('{"pipeline": "unit", "run_id": ')  # cut short
    assert main(["infer", str(run_dir), good]) == 2
    assert one_error_line(capsys).startswith(f"{run_dir / 'summary.json'}: not a raytrain summary.json (Invalid "
                                             "JSON")
    onnx = tmp_path / "model.onnx"
    onnx.write_text("not a model")
    assert main(["infer", str(onnx), good]) == 2
    assert one_error_line(capsys).startswith(f"{onnx}: not an ONNX model onnxruntime can load (")


# ---- 2. ckpt diff: checkpoints -----------------------------------------------------------------------------

def _checkpoint(tmp_path: Path, case: str) -> tuple[Path, str]:
    p = tmp_path / f"{case}.pt"
    if case == "truncated":
        torch.save(build_model(MODEL["name"], dict(MODEL["args"])).state_dict(), p)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        return p, (f"{p}: not a readable torch checkpoint (cut short: it starts as torch's zip format but its end "
                   f"is missing); copy it again if it was cut short, or {RESAVE}")
    if case == "empty":
        p.write_bytes(b"")
        return p, (f"{p}: not a readable torch checkpoint: an empty file (0 bytes); copy it again, or give a "
                   "model.pt/state.pt that a run wrote")
    if case == "zip":
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("notes.txt", "a zip, not a checkpoint")
        return p, (f"{p}: not a readable torch checkpoint (a zip archive, but not one torch.save wrote: file in "
                   f"archive is not in a subdirectory: notes.txt); copy it again if it was cut short, or {RESAVE}")
    if case == "random":
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        return p, f"{p}: not a readable torch checkpoint (neither torch's zip format nor a pickle it reads: "
    if case == "list":
        torch.save([torch.zeros(2), 3, "x"], p)
        return p, (f"{p}: not a state dict checkpoint (a mapping of parameter names to tensors): it holds a list "
                   f"of 3 items; {RESAVE}")
    assert case == "missing"
    return p, f"checkpoint {p} does not exist"


@pytest.mark.parametrize("case", ["truncated", "empty", "zip", "random", "list", "missing"])
def test_ckpt_diff_bad_checkpoint_is_one_line(tmp_path, capsys, case) -> None:
    config = write_yaml(tmp_path / "p.yaml", pipeline(tmp_path))
    ckpt, message = _checkpoint(tmp_path, case)
    assert main(["ckpt", "diff", str(ckpt), str(config), "--phase", "a"]) == 2
    assert one_error_line(capsys).startswith(message)
    assert capsys.readouterr().out == ""


# ---- 4. run / plan: datasets -------------------------------------------------------------------------------

def test_run_with_an_unprepared_dataset_stops_before_ray(tmp_path, capsys, no_ray) -> None:
    config = write_yaml(tmp_path / "p.yaml", pipeline(tmp_path))
    shards = tmp_path / "shards" / "tr"
    fix = "prepare it first (raytrain prep configs/prep/<name>.yaml), or point data.tr.shards at a prepared " \
          "folder (-o data.tr.shards=PATH)"
    assert main(["run", str(config)]) == 2
    assert one_error_line(capsys) == f"data.tr.shards: {shards} does not exist: not a prepared dataset; {fix}"
    shards.mkdir(parents=True)  # a prep that was interrupted: no manifest
    assert main(["run", str(config)]) == 2
    assert one_error_line(capsys) == f"data.tr.shards: {shards} has no _manifest.json: not a prepared dataset; {fix}"
    assert not (tmp_path / "runs").exists()  # no run folder was started
    assert main(["plan", str(config)]) == 0  # plan shows it as NOT PREPARED
    assert "NOT PREPARED" in capsys.readouterr().out


def test_a_prepared_pipeline_passes_the_checks(tmp_path, monkeypatch) -> None:
    """The checks let a good run through: its runner is built (run folder, sqlite MLflow store), Ray not started."""
    from raytrain.pipeline import PipelineRunner

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for k in range(8):
        speaker = tmp_path / "raw" / f"spk{k % 4}"
        speaker.mkdir(parents=True, exist_ok=True)
        wav(speaker / f"u{k}.wav", seconds=1.0)
    assert main(["prep", "--input", str(tmp_path / "raw"), "--format", "speaker-dirs", "--output-dir",
                 str(tmp_path / "shards" / "tr"), "--workers", "0"]) == 0
    raw = pipeline(tmp_path)
    raw["phases"][0]["transforms"] = [{"name": "dynamic_mix", "args": {"num_speakers": 2, "crop_seconds": 0.5}}]
    runner = PipelineRunner(load_config(raw=raw))
    assert runner.run_dir.parent == tmp_path / "runs" / "unit" and (runner.run_dir / "config.yaml").is_file()
    assert runner.tracker.uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"


def test_a_manifest_that_is_not_json_is_one_line_in_plan_and_run(tmp_path, capsys, no_ray) -> None:
    config = write_yaml(tmp_path / "p.yaml", pipeline(tmp_path))
    shards = tmp_path / "shards" / "tr"
    shards.mkdir(parents=True)
    (shards / "_manifest.json").write_text("{not json")
    for command in ("plan", "run"):
        assert main([command, str(config)]) == 2
        assert one_error_line(capsys).startswith(f"data.tr.shards: {shards}/_manifest.json is not a manifest (")


# ---- 5. run: MLflow server and bucket ----------------------------------------------------------------------

def test_unreachable_mlflow_server_is_one_line_before_ray(tmp_path, capsys, monkeypatch, no_ray) -> None:
    for var in ("MLFLOW_TRACKING_URI", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # the probe goes straight to the loopback port
    uri = f"http://127.0.0.1:{free_port()}"
    config = write_yaml(tmp_path / "p.yaml", pipeline(tmp_path, tracking={"uri": uri}))
    t0 = time.monotonic()
    assert main(["run", str(config)]) == 2
    assert time.monotonic() - t0 < 10  # one short request, not MLflow's minutes of retries
    line = one_error_line(capsys)
    assert line.startswith(f"tracking.uri: no MLflow server answers at {uri} (") and "Connection refused" in line
    assert line.endswith("; start the server (mlflow server --host ... --port ...), fix tracking.uri, or set "
                         "tracking.enabled: false (or leave tracking.uri out for the sqlite store in runs_dir)")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the variable wins over the config: the error names it
    config = write_yaml(tmp_path / "p.yaml", pipeline(tmp_path))
    assert main(["run", str(config)]) == 2
    assert one_error_line(capsys).startswith(f"MLFLOW_TRACKING_URI: no MLflow server answers at {uri} (")
    assert not (tmp_path / "runs").exists()


def test_tune_checks_the_mlflow_server_before_the_sweep_starts(tmp_path, capsys, monkeypatch, no_ray) -> None:
    for var in ("MLFLOW_TRACKING_URI", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # the shipped config's relative runs_dir
    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["tune", str(REPO / "configs" / "pipelines" / "separation_tiny.yaml"), "--sweep",
                 str(REPO / "configs" / "sweeps" / "separation_tiny.yaml"), "-o", f"tracking.uri={uri}"]) == 2
    assert one_error_line(capsys).startswith(f"tracking.uri: no MLflow server answers at {uri} (")
    assert not (tmp_path / "runs").exists()  # no sweep folder either


def test_unreachable_bucket_is_one_line_before_ray(tmp_path, capsys, monkeypatch, no_ray) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # an S3 endpoint on loopback that nothing serves
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    config = write_yaml(tmp_path / "p.yaml", pipeline(tmp_path, storage="s3://raytrain-unit/runs"))
    t0 = time.monotonic()
    assert main(["run", str(config)]) == 2
    assert time.monotonic() - t0 < 60  # pyarrow's few bounded retries
    line = one_error_line(capsys)
    assert line.startswith("storage: s3://raytrain-unit/runs cannot be reached (") and "127.0.0.1" in line
    assert line.endswith(f"; check the bucket name, AWS_ENDPOINT_URL (now {endpoint}) and the AWS_* credentials, "
                         "or remove storage: to keep the run in runs_dir only")
    assert not (tmp_path / "runs").exists()
    # data in that bucket: `plan` (which reads the manifests) says so in one line too
    config = write_yaml(tmp_path / "p.yaml", pipeline(tmp_path, data={"tr": {"shards": "s3://raytrain-unit/tr"}}))
    assert main(["plan", str(config)]) == 2
    line = one_error_line(capsys)
    assert line.startswith("data.tr.shards: s3://raytrain-unit/tr cannot be reached (") and line.endswith(
        f"; check the bucket name, AWS_ENDPOINT_URL (now {endpoint}) and the AWS_* credentials")


# ---- --debug and the real process --------------------------------------------------------------------------

def test_debug_raises_with_the_traceback_before_or_after_the_subcommand(run_dir, tmp_path, capsys) -> None:
    gone = str(tmp_path / "gone.wav")
    with pytest.raises(InputError, match="gone.wav: input not found"):
        main(["--debug", "infer", str(run_dir), gone])
    with pytest.raises(InputError, match="gone.wav: input not found"):
        main(["infer", str(run_dir), gone, "--debug"])
    config = write_yaml(tmp_path / "p.yaml", pipeline(tmp_path))
    ckpt, _ = _checkpoint(tmp_path, "empty")
    with pytest.raises(CheckpointError, match="an empty file"):
        main(["ckpt", "diff", str(ckpt), str(config), "--phase", "a", "--debug"])
    assert capsys.readouterr().err == ""


def test_the_command_prints_one_line_and_exits_2(run_dir, tmp_path) -> None:
    """As a user runs it: a separate process, whatever the libraries print on stderr counts too."""
    bad, message = _bad_input(tmp_path, "text")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "raytrain.cli", "infer", str(run_dir), str(bad), "-o",
                          str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 2 and res.stderr == f"error: {message}\n", res.stderr
    res = subprocess.run([sys.executable, "-m", "raytrain.cli", "--debug", "infer", str(run_dir), str(bad)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 1 and "Traceback" in res.stderr and res.stderr.rstrip().endswith(
        f"raytrain.infer.InputError: {message}")
