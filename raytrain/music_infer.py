"""`raytrain infer` with a song generator (`music_generator`): a song from lyrics and a style prompt.

    raytrain infer runs/music_lora_tiny/<id> --lyrics "[verse] ..." --prompt prompt.wav -o out.wav
    raytrain infer runs/music_lora_tiny/<id> --phase generator ...                 (the base model)
    raytrain infer runs/music_lora_tiny/<id> --phase generator --adapter runs/.../lora_ft/.../adapter.pt ...

The generator (by default the last finished phase that trains one: the LoRA fine-tune when it ran, whose
model.pt holds the adapters merged; `--phase` picks another; `--adapter` loads an adapter.pt unmerged on the
phase's weights) predicts latent frames from the lyrics, the prompt's embedding (the autoencoder's encoder over
the prompt, as the cache phase computes it) and, with `--sketch` (a token file: .npy, .npz or .pt), a melody
sketch; without one it generates from the null sketch. The run's autoencoder (the phase that trains
`music_ae`) decodes the latents into log-mels and Griffin-Lim makes audio of them. Length: the sketch's, else
`--seconds` (default 6).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from raytrain.config.schema import ModelConfig, PipelineConfig
from raytrain.models import build_model
from raytrain.models.music import MusicAE, MusicGenerator, frame_words, latent_frames, lyrics_ids
from raytrain.vc_infer import InputError, read_speech

DEFAULT_SECONDS = 6.0


def trained(run_dir: Path, pipe: PipelineConfig, model: str) -> list[tuple[str, ModelConfig, Path]]:
    """The run's finished phases that train a `model`, in pipeline order: (name, model config, best weights)."""
    from raytrain.runs import read_summary

    summary = read_summary(run_dir)
    out = []
    for phase in pipe.phases:
        mcfg, entry = pipe.phase_model(phase), summary.phases.get(phase.name)
        if mcfg.name == model and getattr(phase, "trains", False) and entry is not None and entry.best_checkpoint:
            out.append((phase.name, mcfg, Path(entry.best_checkpoint)))
    return out


def find_autoencoder(run_dir: Path, pipe: PipelineConfig) -> tuple[ModelConfig, Path]:
    """The run's `music_ae` phase's model config and best weights."""
    found = trained(run_dir, pipe, "music_ae")
    if not found:
        raise FileNotFoundError(f"{run_dir}: no finished phase trains a music_ae autoencoder; the generator's "
                                "latents need its decoder")
    return found[-1][1], found[-1][2]


def read_prompt(path: str | Path, sample_rate: int) -> np.ndarray:
    """Mono float32 audio at `sample_rate`, peak-normalised as the prep's normalize step does (-1 dBFS);
    InputError if missing, not audio, silent or shorter than half a second."""
    wave = read_speech(path, sample_rate, "prompt", min_seconds=0.5, needs="a style prompt needs")
    return (wave * (10 ** (-1 / 20) / float(np.abs(wave).max()))).astype(np.float32)


def read_sketch(path: str | Path) -> np.ndarray:
    from datasets_prep.steps.load import Reject, read_tokens

    try:
        tokens = read_tokens(str(path))
    except (Reject, OSError, ValueError) as exc:
        raise InputError(f"{path}: {exc}") from None
    if tokens.dtype.kind not in "biu" or tokens.ndim != 1:
        raise InputError(f"{path}: a sketch is 1-D integer tokens; the file holds {tokens.dtype} {list(tokens.shape)}")
    return tokens.astype(np.int64)


def load_generator(source: str | Path, phase: str | None, adapter: str | Path | None) -> tuple[MusicGenerator, Path,
                                                                                                 PipelineConfig, str]:
    from raytrain.checkpoints import load_data, load_weights
    from raytrain.infer import locate, run_folder

    run_dir, pipe = run_folder(source)
    if phase is None and Path(source) == run_dir:
        done = trained(run_dir, pipe, "music_generator")
        if not done:
            raise FileNotFoundError(f"{run_dir}: no phase that trains the music_generator has finished")
        phase = done[-1][0]
    weights, mcfg = locate(source, phase)
    model = build_model(mcfg.name, dict(mcfg.args), mcfg.adapter)
    if not isinstance(model, MusicGenerator):
        raise InputError(f"{weights}: a {mcfg.name} model; --lyrics and --prompt are for music_generator models "
                         "(give --phase the generator's phase)")
    base = load_weights(weights)
    label = str(phase or weights)
    if adapter is not None:
        from raytrain.lora import load_adapter

        a = Path(adapter)
        if not a.is_file():
            raise InputError(f"{a}: adapter not found")
        load_adapter(model, load_data(a), base)  # as data only (weights_only); a bad file: CheckpointError
        label += f" + adapter {a}"
    else:
        model.load_state_dict(base)
    return model.eval(), run_dir, pipe, label


@torch.no_grad()
def generate(generator: MusicGenerator, ae: MusicAE, lyrics: str, prompt: np.ndarray,
             sketch: np.ndarray | None = None, seconds: float = DEFAULT_SECONDS) -> np.ndarray:
    """A waveform at the autoencoder's rate; the same inputs give the same waveform (Griffin-Lim starts from
    seeded random phases)."""
    torch.manual_seed(0)
    emb = ae.prompt_embedding(torch.from_numpy(prompt)[None], torch.tensor([len(prompt)]))
    ids = lyrics_ids(lyrics)
    batch: dict[str, Any] = {"lyrics": torch.from_numpy(ids)[None], "prompt_emb": emb}
    if sketch is not None:
        batch["sketch"] = torch.from_numpy(sketch)[None]
        frames = len(sketch)
    else:
        frames = int(latent_frames(int(seconds * ae.sample_rate), ae.hop, ae.down))
        batch["frames"] = torch.tensor([frames])
    if generator.aligned_lyrics:  # no word times at inference: the words share the song's frames evenly
        batch["frame_word"] = torch.from_numpy(frame_words(ids, None, frames, 25.0))[None]
    latent = generator(batch)["latent_pred"]
    mel = ae.decode(latent)
    wave = ae.vocode(mel)[0].numpy()
    peak = float(np.abs(wave).max()) or 1.0
    return (wave * min(1.0, 0.89 / peak)).astype(np.float32)


def run(source: str | Path, lyrics: str, prompt: str | Path, output: str | Path, phase: str | None = None,
        adapter: str | Path | None = None, sketch: str | Path | None = None, seconds: float | None = None) -> int:
    from raytrain.infer import from_weights

    generator, run_dir, pipe, label = load_generator(source, phase, adapter)
    ae_cfg, ae_weights = find_autoencoder(run_dir, pipe)
    ae = from_weights(ae_cfg, ae_weights)
    assert isinstance(ae, MusicAE)
    if not lyrics.strip():
        raise InputError("--lyrics is empty: give the words to sing, e.g. \"[verse] light on the river\"")
    wave_prompt = read_prompt(prompt, ae.sample_rate)
    tokens = read_sketch(sketch) if sketch is not None else None
    if tokens is not None and tokens.max() >= generator.codebook_size:
        raise InputError(f"{sketch}: token {int(tokens.max())} is outside the codebook (size {generator.codebook_size})")
    t0 = time.perf_counter()
    wave = generate(generator, ae, lyrics, wave_prompt, tokens, seconds or DEFAULT_SECONDS)
    took = time.perf_counter() - t0
    out = Path(output)
    if out.suffix.lower() not in (".wav", ".flac"):
        out = out / "song.wav"
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(out), wave, ae.sample_rate)
    dur = len(wave) / ae.sample_rate
    print(f"{out}: {dur:.2f} s from {label} ({'sketch ' + str(sketch) if sketch else 'no sketch'}); "
          f"generated in {took:.2f} s (RTF {took / max(dur, 1e-9):.3f})")
    return 0
