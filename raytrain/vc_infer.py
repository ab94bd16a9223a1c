"""`raytrain infer` with a voice-conversion model (`vc_flow`): every source file spoken in the voice of `--ref`.

    raytrain infer runs/vc_flow_tiny/<id> --ref target.wav a.wav b.flac -o out/ [--steps N]
    raytrain infer runs/vc_flow_tiny/<id>/export/model.int8.onnx --ref target.wav a.wav -o out/

The reference's speaker embedding (resemblyzer's, as the `embed` cache phase computes it) conditions the flow;
each source is converted in one call (content encoder, the flow's Euler steps, Griffin-Lim) and written as
`<out>/<source stem>_to_<ref stem>.wav` at the model's rate. Printed per file: the SECS of the output to the
reference, the source's own SECS to it, and the real-time factor (conversion seconds / audio seconds). A
source that is missing, not audio, silent or too short is one line on stderr, naming the file; the others are
still converted. A bad reference stops before any conversion: nothing could be converted to it.

An exported `.onnx` (the `export` phase's sampler) runs on onnxruntime with Griffin-Lim after it, sized from the
file's metadata; its step count is fixed at export, so `--steps` is refused for it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

# InputError: a source or reference file that cannot be converted (one line naming the file and the reason)
from raytrain.infer import InputError as InputError
from raytrain.infer import open_audio as open_audio

# resemblyzer's shortest window (partials of 1.6 s): a shorter clip is zero-padded and embeds mostly silence
MIN_SECONDS = 1.6


@dataclass
class Converted:
    source: Path
    output: Path
    secs: float
    secs_source: float
    rtf: float


def read_speech(path: str | Path, sample_rate: int, what: str, min_seconds: float = MIN_SECONDS,
                needs: str = "the speaker encoder needs") -> np.ndarray:
    """Mono float32 audio at `sample_rate`; InputError if missing, empty, not audio, of more than two channels,
    silent or shorter than `min_seconds` (1.6 s: resemblyzer's shortest window; the message says who `needs`
    it)."""
    p = Path(path)
    wave, sr = open_audio(p, what)
    mono = wave.mean(axis=1)
    if len(mono) == 0 or not np.any(np.abs(mono) > 1e-4):
        raise InputError(f"{p}: {what} is silent ({len(mono) / sr:.2f} s with no sample above -80 dBFS)")
    if len(mono) / sr < min_seconds:
        raise InputError(f"{p}: {what} is {len(mono) / sr:.2f} s long; {needs} at least {min_seconds:g} s of "
                         "speech")
    if sr != sample_rate:
        mono = AF.resample(torch.from_numpy(np.ascontiguousarray(mono)), sr, sample_rate).numpy()
    return np.asarray(mono, dtype=np.float32)


def embedding(wave: np.ndarray, sample_rate: int, path: Path, what: str) -> np.ndarray:
    from raytrain.metrics.voice import NoSpeechError, speaker_embedding

    try:
        return speaker_embedding(wave, sample_rate)
    except NoSpeechError as exc:
        raise InputError(f"{path}: {what}: {exc}") from None


def source_noise(model: Any, samples: int, seed: int = 0) -> torch.Tensor:
    """The sampler's starting noise (1, frames, n_mels) for one source of ``samples`` samples, seeded."""
    frames = samples // model.hop + 1
    return torch.randn(1, frames, model.n_mels, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def convert_file(model: Any, source: Path, ref: dict[str, torch.Tensor], out_dir: Path, ref_stem: str,
                 seed: int = 0) -> Converted:
    sr = int(model.sample_rate)
    wave = read_speech(source, sr, "source")
    src_emb = embedding(wave, sr, source, "source")
    t0 = time.perf_counter()
    audio = torch.from_numpy(wave)[None]
    mel = model.convert(audio, ref, source_noise(model, audio.shape[1], seed))
    out = model.griffin_lim(mel)[0, : audio.shape[1]].numpy()
    rtf = (time.perf_counter() - t0) / (len(wave) / sr)
    out = out / (np.abs(out).max() + 1e-8) * 0.9
    path = out_dir / f"{source.stem}_to_{ref_stem}.wav"
    sf.write(str(path), out, sr, subtype="PCM_16")
    from raytrain.metrics.voice import similarity

    ref_emb = ref["ref_emb"][0].numpy()
    try:
        secs = similarity(embedding(out, sr, path, "output"), ref_emb)
    except InputError:
        secs = 0.0  # the model made silence: the worst score, as the secs metric gives it
    return Converted(source, path, secs, similarity(src_emb, ref_emb), rtf)


class OnnxConverter:
    """An exported vc_flow sampler (`model.onnx` / `model.int8.onnx`) with the interface `convert_file` uses:
    `convert` on onnxruntime, `griffin_lim` from the vocoder sizes in the file's metadata."""

    def __init__(self, onnx: Any) -> None:
        import json

        from raytrain.export import META_PREFIX
        from raytrain.models.vc import META_STEPS, META_VOCODER, REF_STATS, MelGriffinLim

        meta = onnx.metadata
        try:
            voc = json.loads(meta[META_PREFIX + META_VOCODER])
            self.sample_steps = int(meta[META_PREFIX + META_STEPS])
        except KeyError as exc:
            raise ValueError(f"{onnx.path}: not a vc_flow export (its metadata lacks {exc.args[0]})") from None
        self.onnx = onnx
        self.sample_rate, self.hop, self.n_mels = int(voc["sample_rate"]), int(voc["hop_length"]), int(voc["n_mels"])
        self.vocoder = MelGriffinLim(**voc)
        self.reference_stats = REF_STATS in onnx.export_spec.inputs  # what reference_inputs gives it

    def convert(self, audio: torch.Tensor, ref: dict[str, torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        from raytrain.models.vc import sampler_batch

        return self.onnx(sampler_batch(audio, ref, noise))["mel"]

    def griffin_lim(self, logmel: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.vocoder(logmel, lengths)


def is_vc_export(onnx: Any) -> bool:
    from raytrain.export import META_PREFIX
    from raytrain.models.vc import META_VOCODER

    return META_PREFIX + META_VOCODER in getattr(onnx, "metadata", {})


def run(model: Any, ref: str | Path, sources: list[str], out_dir: str | Path, steps: int | None = None) -> int:
    """Converts every source; prints a line per file; returns 0, 1 when some source failed and others were
    converted, 2 when none was (or the reference is bad)."""
    if steps is not None:
        if steps < 1:
            print(f"error: --steps must be >= 1, got {steps}", file=sys.stderr)
            return 2
        if isinstance(model, OnnxConverter):
            print(f"error: {model.onnx.path} samples in {model.sample_steps} step(s), fixed at export; drop --steps "
                  "(or convert with the run's weights)", file=sys.stderr)
            return 2
        model.sample_steps = steps
    sr = int(model.sample_rate)
    ref = Path(ref)
    from raytrain.models.vc import reference_inputs

    try:
        wave = read_speech(ref, sr, "reference")
        ref_inputs = reference_inputs(model, wave, embedding(wave, sr, ref, "reference"))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"converting {len(sources)} file(s) to the voice of {ref} ({model.sample_steps} sampling steps)")
    failed = 0
    for src in sources:
        try:
            c = convert_file(model, Path(src), ref_inputs, out, ref.stem)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{c.output}  SECS {c.secs:.3f} (source {c.secs_source:.3f})  RTF {c.rtf:.3f}")
    if sources and failed == len(sources):  # nothing converted: the error lines are all there is to say
        return 2
    if failed:
        print(f"{failed} of {len(sources)} file(s) not converted (see above)", file=sys.stderr)
    return 1 if failed else 0
