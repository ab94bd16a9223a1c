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
from raytrain.runs import read_summary


def run_folder(source: str | Path) -> tuple[Path, PipelineConfig]:
    """The run folder `source` (a run folder, a phase folder or a file in one) lies in, and its pipeline."""
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such run folder or checkpoint")
    run_dir = next((p for p in [src, *src.parents] if (p / "summary.json").exists()), None)
    if run_dir is None:
        raise FileNotFoundError(f"{src}: not inside a raytrain run folder (no summary.json above it); "
                                "give the run folder runs/<pipeline>/<run_id> or a model.pt inside it")
    return run_dir, PipelineConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))


def locate(source: str | Path, phase: str | None = None) -> tuple[Path, ModelConfig]:
    """(weights file, model config) from a run folder, a phase folder, or a model.pt inside a run."""
    src = Path(source)
    run_dir, pipe = run_folder(src)
    summary = read_summary(run_dir)
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
    model = OnnxModel(path, intra_op_num_threads=torch.get_num_threads())
    spec = model.export_spec
    from raytrain.vc_infer import is_vc_export

    if is_vc_export(model):
        return model
    if "mix" not in spec.inputs or "est_sources" not in spec.outputs:
        raise ValueError(f"{path}: raytrain infer runs exported separation (mix -> est_sources) and vc_flow models; "
                         "this file takes "
                         f"{list(spec.inputs)} and returns {list(spec.outputs)}")
    return model


def load_model(source: str | Path, phase: str | None = None) -> torch.nn.Module | OnnxModel:
    """The model of a run folder / phase folder / model.pt, or an exported `.onnx` file (then `phase` must be None)."""
    if str(source).endswith(".onnx"):
        if phase is not None:
            raise ValueError(f"{source}: an exported .onnx file has no phases (drop --phase {phase})")
        return load_onnx(source)
    weights, mcfg = locate(source, phase)
    return from_weights(mcfg, weights)


@torch.no_grad()
def separate_file(model: Separator, path: str | Path, out_dir: str | Path) -> list[Path]:
    """Writes `<stem>_s1.wav` … at the input's own sample rate; returns the paths."""
    wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
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
