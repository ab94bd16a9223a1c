"""`raytrain infer`: separate audio files with a trained model (a run folder, a checkpoint or an exported .onnx)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
import yaml

from raytrain.checkpoints import load_weights
from raytrain.config.schema import ModelConfig, PipelineConfig
from raytrain.export import OnnxModel
from raytrain.models import build_model
from raytrain.runs import SUMMARY_FILE, SummaryError, read_summary

SOURCE_FIX = "give a run folder runs/<pipeline>/<run_id>, a phase folder or model.pt in one, or an exported .onnx"
AUDIO_FIX = "give a WAV, FLAC or OGG file"


class InputError(ValueError):
    """An input of `raytrain infer` it cannot use (a missing, empty or unreadable file, a run folder without
    its records); the message is one line naming the file, what is wrong and what to do."""


def check_audio(path: str | Path, what: str = "input", error: type[ValueError] = InputError,
                max_channels: int | None = 2) -> sf._SoundFileInfo:
    """The header of an audio file (nothing decoded); `error` naming the file and `what` it is when it is
    missing, empty, not audio soundfile can read, without samples, or of more than `max_channels` channels
    (the models take mono: a stereo file is mixed down; more channels are refused rather than averaged)."""
    p = Path(path)
    if not p.exists():
        raise error(f"{p}: {what} not found")
    if p.is_dir():
        raise error(f"{p}: {what} is a folder; {AUDIO_FIX}")
    if p.stat().st_size == 0:
        raise error(f"{p}: {what} is an empty file (0 bytes); {AUDIO_FIX}")
    try:
        info = sf.info(str(p))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise error(f"{p}: {what} is not an audio file soundfile can read ({_sf_reason(exc)}); {AUDIO_FIX}") from None
    if info.frames == 0:
        raise error(f"{p}: {what} has no samples (a {info.format} file of 0 s); give a recording")
    if max_channels is not None and info.channels > max_channels:
        raise error(f"{p}: {what} has {info.channels} channels; the model takes mono audio and mixes down only "
                    "stereo: give a mono or stereo file (e.g. one of its channels)")
    return info


def open_audio(path: Path, what: str, error: type[ValueError] = InputError,
               max_channels: int | None = 2) -> tuple[np.ndarray, int]:
    """float32 (samples, channels) and the rate of an audio file; `error` as `check_audio` says."""
    check_audio(path, what, error, max_channels)
    try:
        wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise error(f"{path}: {what} is not an audio file soundfile can read ({_sf_reason(exc)}); "
                    f"{AUDIO_FIX}") from None
    return wave, int(sr)


def _sf_reason(exc: Exception) -> str:
    """libsndfile's reason (`Format not recognised`) without the `Error opening '<path>':` it starts with."""
    reason = getattr(exc, "error_string", None) or str(exc).split(": ", 1)[-1]
    return str(reason).strip().rstrip(".") or type(exc).__name__


def run_folder(source: str | Path) -> tuple[Path, PipelineConfig]:
    """The run folder `source` (a run folder, a phase folder or a file in one) lies in, and its pipeline."""
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such run folder or checkpoint; {SOURCE_FIX}")
    run_dir = next((p for p in [src, *src.parents] if (p / SUMMARY_FILE).exists()), None)
    if run_dir is None:
        if src.is_dir() and (src / "config.yaml").is_file():
            raise InputError(f"{src}: a run folder without {SUMMARY_FILE}: the run stopped before its first "
                             "phase started, so it has no weights; give a run whose phases finished")
        raise InputError(f"{src}: not inside a raytrain run folder (no {SUMMARY_FILE} in it or above it); "
                         f"{SOURCE_FIX}")
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise InputError(f"{run_dir}: a run folder without config.yaml (it says which model its weights are "
                         "for); copy the run folder whole")
    try:
        return run_dir, PipelineConfig.model_validate(yaml.safe_load(config.read_text()))
    except (yaml.YAMLError, ValueError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{config}: not the config.yaml a run writes ({why}); copy the run folder whole") from None


def locate(source: str | Path, phase: str | None = None) -> tuple[Path, ModelConfig]:
    """(weights file, model config) from a run folder, a phase folder, or a model.pt inside a run."""
    src = Path(source)
    run_dir, pipe = run_folder(src)
    try:
        summary = read_summary(run_dir)
    except SummaryError as exc:
        raise InputError(str(exc)) from None
    names = [p.name for p in pipe.phases]
    if phase is not None and phase not in names:
        raise InputError(f"--phase {phase}: {run_dir} has no such phase; its phases: {', '.join(names)}")
    if src.is_file():
        weights = src
        phase = phase or src.parent.parent.name
    else:
        if phase is None:
            if src != run_dir:
                phase = src.name
            else:
                done = [n for n, e in summary.phases.items() if e.best_checkpoint]
                if not done:
                    raise FileNotFoundError(f"{run_dir}: no phase has finished yet")
                phase = done[-1]
        entry = summary.entry(phase)
        if not entry.best_checkpoint:
            raise FileNotFoundError(f"{run_dir}: phase {phase!r} has no checkpoint (status: {entry.status})")
        weights = Path(entry.best_checkpoint)
        if not weights.exists() and entry.best_checkpoint_uri:
            # a run with `storage:` resumed elsewhere (or this folder copied without its weights): the weights
            # are in the storage; fetch them to where the summary says they belong
            from datasets_prep.storage import download_file, exists

            uri = entry.best_checkpoint_uri
            if not exists(uri):
                raise FileNotFoundError(f"{run_dir}: phase {phase!r}: its best weights are neither at {weights} "
                                        f"nor at {uri}")
            print(f"{phase}: fetching its best weights from {uri}")
            download_file(uri, weights)
    return weights, pipe.phase_model(pipe.phase(phase)) if phase in [p.name for p in pipe.phases] else pipe.model


def from_weights(mcfg: ModelConfig, weights: str | Path) -> torch.nn.Module:
    """The model `mcfg` describes with the weights of a `model.pt` (or `state.pt`), on the CPU, in eval mode."""
    model = build_model(mcfg.name, dict(mcfg.args), mcfg.adapter)
    model.load_state_dict(load_weights(weights))
    return model.eval()


class Separator(Protocol):
    """What `separate_file` calls: a torch separation model or an `OnnxModel` of one."""

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def load_onnx(path: str | Path) -> OnnxModel:
    """An exported separation or vc_flow model (`raytrain.export.export_onnx`), with as many threads as torch
    would use."""
    if not Path(path).is_file():
        raise InputError(f"{path}: no such ONNX file; {SOURCE_FIX}")
    try:
        model = OnnxModel(path, intra_op_num_threads=torch.get_num_threads())
    except Exception as exc:  # onnxruntime's errors derive from Exception only (InvalidProtobuf, Fail, ...)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"{path}: not an ONNX model onnxruntime can load ({reason}); give a .onnx that the "
                         "export phase wrote (runs/<pipeline>/<run_id>/<phase>/...)") from None
    spec = model.export_spec
    from raytrain.vc_infer import is_vc_export

    if is_vc_export(model):
        return model
    if "mix" not in spec.inputs or "est_sources" not in spec.outputs:
        raise InputError(f"{path}: raytrain infer runs exported separation (mix -> est_sources) and vc_flow "
                         f"models; this file takes {list(spec.inputs)} and returns {list(spec.outputs)}")
    return model


def load_model(source: str | Path, phase: str | None = None) -> torch.nn.Module | OnnxModel:
    """The model of a run folder / phase folder / model.pt, or an exported `.onnx` file (then `phase` must be None)."""
    if str(source).endswith(".onnx"):
        if phase is not None:
            raise InputError(f"{source}: an exported .onnx file has no phases (drop --phase {phase})")
        return load_onnx(source)
    weights, mcfg = locate(source, phase)
    return from_weights(mcfg, weights)


@torch.no_grad()
def separate_file(model: Separator, path: str | Path, out_dir: str | Path) -> list[Path]:
    """Writes `<stem>_s1.wav` … at the input's own sample rate; returns the paths. InputError (one line naming
    the file) for a file that is missing, empty, not audio or of more than two channels."""
    wave, sr = open_audio(Path(path), "input")
    mono = torch.from_numpy(wave.mean(axis=1))
    model_sr = int(getattr(model, "sample_rate", None) or sr)
    x = AF.resample(mono, sr, model_sr) if sr != model_sr else mono
    est = model({"mix": x[None], "lengths": torch.tensor([x.shape[-1]])})["est_sources"][0]  # (sources, time)
    if sr != model_sr:
        est = AF.resample(est, model_sr, sr)
    est = est[:, : mono.shape[-1]]
    peak_in = float(mono.abs().max()) or 1.0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, src in enumerate(est):
        s = src.numpy()
        s = s / (np.abs(s).max() + 1e-8) * min(0.9, peak_in)  # SI-SDR training leaves the scale free
        p = out_dir / f"{Path(path).stem}_s{i + 1}.wav"
        sf.write(str(p), s, sr, subtype="PCM_16")
        paths.append(p)
    return paths
