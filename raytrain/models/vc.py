"""Voice conversion by conditional flow matching on log-mel frames (`vc_flow`).

The model converts a source utterance into the voice of a target speaker given by a speaker
embedding (``ref_emb``: resemblyzer's 256-d embedding of a reference utterance of the target).

- **Content**: the source's log-mel, normalised per utterance and channel over time (which removes
  the long-term spectral envelope that carries much of a voice), through a convolutional encoder
  into a narrow bottleneck (``content_dim``). It is trained end to end on *parallel* pairs (the
  target voice speaking the source's sentence, time-warped onto the source's frames), so what it
  keeps is what the target's frames need from the source: the words and their timing, not the
  source's voice.
- **Flow**: a velocity field ``v(x_t, t | content, speaker)`` over normalised log-mel frames, a stack
  of dilated residual 1-D convolutions modulated (FiLM) by the time step and the speaker. Training
  (``train_mode: flow``) is conditional flow matching with the optimal-transport path
  ``x_t = (1 - (1 - sigma_min) t) x_0 + t x_1``; sampling is Euler integration from noise in
  ``sample_steps`` steps, from noise scaled by ``temperature`` (below 1 trades variety for cleaner frames;
  Matcha-TTS samples at 0.667: on 16 dev rows of the tiny recipe, 0.4 and 0.7 both gave +0.016 SECS and
  6% lower MCD than 1.0). A distilled student (``train_mode: sample``) samples in training too, so its
  few-step output can be trained against the teacher's many-step one.
- **Reference statistics** (``reference_stats: true``): beside the embedding, the per-bin mean and spread
  of the reference's log-mel over its voiced frames (``ref_stats``, 160 values, computed by the cache phase:
  ``speaker_encoder`` with ``stats: true``) condition the flow. A speaker embedding names a voice; these
  describe its envelope directly, which is what a voice unseen in training needs: on the tiny recipe's dev
  voices (none heard in training) they took phase 1b from SECS 0.777 and an MCD ratio of 0.802 to 0.789 and
  0.783, at equal steps (bench runs of the same configuration without and with them).
- **Audio**: in eval mode the sampled mel is turned into a waveform with Griffin-Lim
  (``vocoder: griffin_lim``, torchaudio) for the metrics; ``vocoder: none`` leaves audio out.

Batch keys: ``audio`` (source, (batch, time)) and ``lengths``; ``ref_emb`` (batch, 256); ``ref_stats``
(batch, 160) with ``reference_stats``; in training
``target_mel`` (batch, frames, n_mels) on the source's frames; optionally ``noise`` (batch, frames,
n_mels, the ``flow_noise`` transform: teacher and student then start from the same noise) and
``audio_reverb`` (the source with a room's reverberation, the ``room_reverb`` transform: the content
is taken from it and ``content_clean`` is returned for the ``ir_consistency`` loss).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrain.export import ExportSpec

SPEAKER_DIM = 256  # resemblyzer's embedding
N_MELS, N_FFT, WIN_LENGTH, HOP_LENGTH = 80, 1024, 400, 160  # the log-mel's default sizes
REF_STATS = "ref_stats"  # the batch key (and column) of a reference's log-mel statistics (reference_stats)
VOICED_DB = 30.0  # frames this far below a reference's loudest count as voiced for its statistics
META_VOCODER, META_STEPS = "vc.vocoder", "vc.sample_steps"  # export metadata keys (stored after "raytrain.")


def frame_mask(lengths: Tensor, frames: int) -> Tensor:
    """(batch, frames) bool: frames that hold audio."""
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


class LogMel(nn.Module):
    """Natural-log mel power, (batch, time) -> (batch, frames, n_mels): exactly the prep `features` step's
    (``datasets_prep.steps.audio.features``: torchaudio's MelSpectrogram, centred frames, + 1e-6)."""

    def __init__(self, sample_rate: int, n_fft: int, win: int, hop: int, n_mels: int) -> None:
        super().__init__()
        import torchaudio

        self.hop = hop
        with torch.device("cpu"):  # its filterbank is computed (`raytrain plan` builds models on `meta`)
            self.mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, win_length=win,
                                                            hop_length=hop, n_mels=n_mels, power=2.0)

    def frames(self, samples: Tensor) -> Tensor:
        return torch.div(samples, self.hop, rounding_mode="floor") + 1

    def forward(self, audio: Tensor) -> Tensor:
        return torch.log(self.mel(audio.float()) + 1e-6).transpose(1, 2)


class Block(nn.Module):
    """Residual dilated conv, FiLM-modulated by a conditioning vector."""

    def __init__(self, hidden: int, cond: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, hidden)
        self.conv = nn.Conv1d(hidden, 2 * hidden, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation)
        self.film = nn.Linear(cond, 2 * hidden)
        self.out = nn.Conv1d(hidden, hidden, 1)

    def forward(self, x: Tensor, c: Tensor, mask: Tensor) -> Tensor:
        scale, shift = self.film(c).unsqueeze(-1).chunk(2, dim=1)
        h = self.norm(x) * (1 + scale) + shift
        a, b = self.conv(h).chunk(2, dim=1)
        return (x + self.out(torch.tanh(a) * torch.sigmoid(b))) * mask


class ContentEncoder(nn.Module):
    def __init__(self, n_mels: int, hidden: int, out: int, layers: int, kernel: int) -> None:
        super().__init__()
        self.inp = nn.Conv1d(n_mels, hidden, kernel, padding=kernel // 2)
        self.blocks = nn.ModuleList(nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2) for _ in range(layers))
        self.norms = nn.ModuleList(nn.GroupNorm(1, hidden) for _ in range(layers))
        self.proj = nn.Conv1d(hidden, out, 1)

    def forward(self, logmel: Tensor, mask: Tensor) -> Tensor:
        """(batch, frames, n_mels) -> (batch, out, frames)."""
        m = mask[:, None, :].to(logmel.dtype)
        x = logmel.transpose(1, 2) * m
        count = m.sum(-1, keepdim=True).clamp_min(1.0)
        mean = x.sum(-1, keepdim=True) / count
        std = ((((x - mean) * m) ** 2).sum(-1, keepdim=True) / count).clamp_min(1e-5).sqrt()
        h = self.inp((x - mean) / std * m)
        for conv, norm in zip(self.blocks, self.norms, strict=True):
            h = (h + conv(F.gelu(norm(h)))) * m
        return self.proj(h) * m


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of flow time t in [0, 1], (batch,) -> (batch, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def _flow_reads(args: dict[str, Any]) -> tuple[str, ...]:
    return ("audio", "ref_emb", "target_mel", *((REF_STATS,) if args.get("reference_stats") else ()))


def voiced_stats(logmel: Tensor, floor_db: float = VOICED_DB) -> Tensor:
    """(2 * n_mels,): per-bin mean and standard deviation of one clip's log-mel frames (frames, n_mels) over
    its voiced frames: those within ``floor_db`` of its loudest frame, by total power."""
    energy = torch.logsumexp(logmel, dim=-1)
    voiced = logmel[energy >= energy.max() - floor_db / 10.0 * math.log(10.0)]
    return torch.cat([voiced.mean(0), voiced.var(0, unbiased=False).clamp_min(1e-5).sqrt()])


class VCFlow(nn.Module):
    """See the module docstring. ``sample_steps``: Euler steps of the sampler in eval (and of a student
    with ``train_mode: sample`` in training)."""

    reads = _flow_reads  # batch keys (raytrain.data.columns): + ``reference`` with reference_stats

    def __init__(self, *, sample_rate: int = 16000, n_mels: int = N_MELS, n_fft: int = N_FFT,
                 win_length: int = WIN_LENGTH, hop_length: int = HOP_LENGTH, hidden: int = 192, layers: int = 8, kernel: int = 5,
                 dilations: tuple[int, ...] | list[int] = (1, 2, 4, 8), content_hidden: int = 192,
                 content_layers: int = 4, content_dim: int = 64, sample_steps: int = 10, sigma_min: float = 1e-4,
                 mel_mean: float = -5.0, mel_std: float = 3.5, temperature: float = 1.0, train_mode: str = "flow",
                 vocoder: str = "griffin_lim", griffin_lim_iters: int = 32, reference_stats: bool = False) -> None:
        super().__init__()
        if train_mode not in ("flow", "sample"):
            raise ValueError(f"vc_flow: train_mode must be 'flow' or 'sample', got {train_mode!r}")
        if vocoder not in ("griffin_lim", "none"):
            raise ValueError(f"vc_flow: vocoder must be 'griffin_lim' or 'none', got {vocoder!r}")
        if sample_steps < 1:
            raise ValueError(f"vc_flow: sample_steps must be >= 1, got {sample_steps}")
        self.sample_rate, self.n_mels, self.hop = int(sample_rate), n_mels, hop_length
        self.n_fft, self.win_length = n_fft, win_length
        self.sample_steps, self.sigma_min, self.train_mode = sample_steps, sigma_min, train_mode
        self.mel_mean, self.mel_std = mel_mean, mel_std
        if not 0.0 <= temperature <= 2.0:
            raise ValueError(f"vc_flow: temperature must be in [0, 2], got {temperature}")
        self.temperature = float(temperature)  # scales the sampler's starting noise (training noise stays N(0, 1))
        self.vocoder, self.griffin_lim_iters = vocoder, griffin_lim_iters
        self.logmel = LogMel(sample_rate, n_fft, win_length, hop_length, n_mels)
        self.content = ContentEncoder(n_mels, content_hidden, content_dim, content_layers, kernel)
        self.speaker = nn.Sequential(nn.Linear(SPEAKER_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.reference_stats = bool(reference_stats)
        if self.reference_stats and (n_mels, n_fft, win_length, hop_length) != (N_MELS, N_FFT, WIN_LENGTH, HOP_LENGTH):
            raise ValueError("vc_flow: reference_stats needs the default mel sizes (n_mels 80, n_fft 1024, "
                             "win_length 400, hop_length 160): the statistics are computed with those")
        if self.reference_stats:
            self.ref_stats = nn.Sequential(nn.Linear(2 * n_mels, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.time = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Conv1d(n_mels + content_dim, hidden, 1)
        self.blocks = nn.ModuleList(Block(hidden, hidden, kernel, dilations[i % len(dilations)])
                                    for i in range(layers))
        self.out = nn.Conv1d(hidden, n_mels, 1)
        nn.init.zeros_(self.out.weight)  # the flow starts at v = 0: no random velocity to unlearn
        assert self.out.bias is not None
        nn.init.zeros_(self.out.bias)
        self._hidden = hidden
        self._vocoders: dict[str, nn.Module] = {}  # built on first use; a dict keeps it out of the state dict

    # ---- parts ---------------------------------------------------------------------------------------
    def normalize(self, logmel: Tensor) -> Tensor:
        return (logmel - self.mel_mean) / self.mel_std

    def denormalize(self, x: Tensor) -> Tensor:
        return x * self.mel_std + self.mel_mean

    def condition(self, batch: dict[str, Tensor], source: str = "audio") -> dict[str, Tensor]:
        """What the velocity field is conditioned on: content (batch, content_dim, frames), the speaker
        vector (batch, hidden) and the frame mask (batch, frames) of ``batch[source]``."""
        audio = batch[source]
        if audio.ndim != 2:
            raise ValueError(f"vc_flow: batch[{source!r}] must be (batch, time), got shape {tuple(audio.shape)}")
        lengths = batch.get("lengths")
        if lengths is None:
            lengths = torch.full((audio.shape[0],), audio.shape[1], dtype=torch.long, device=audio.device)
        logmel = self.logmel(audio)
        mask = frame_mask(self.logmel.frames(lengths.to(audio.device)).clamp_max(logmel.shape[1]), logmel.shape[1])
        emb = batch["ref_emb"].float()
        if emb.shape != (audio.shape[0], SPEAKER_DIM):
            raise ValueError(f"vc_flow: batch['ref_emb'] must be (batch, {SPEAKER_DIM}), got {tuple(emb.shape)}")
        speaker = self.speaker(emb)
        if self.reference_stats:
            stats = batch.get(REF_STATS)
            if stats is None:
                raise KeyError(f"vc_flow: reference_stats is set but the batch has no {REF_STATS!r}: compute it in "
                               f"the cache phase (model speaker_encoder, args {{stats: true}}, columns {REF_STATS})")
            stats = stats.float()
            if stats.shape != (audio.shape[0], 2 * self.n_mels):
                raise ValueError(f"vc_flow: batch[{REF_STATS!r}] must be (batch, {2 * self.n_mels}), "
                                 f"got {tuple(stats.shape)}")
            speaker = speaker + self.ref_stats(torch.cat([self.normalize(stats[:, :self.n_mels]),
                                                          stats[:, self.n_mels:] / self.mel_std], dim=-1))
        return {"content": self.content(logmel, mask), "speaker": speaker, "mask": mask, "source_mel": logmel}

    def velocity(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """v(x_t, t): x (batch, frames, n_mels) normalised, t (batch,) -> (batch, frames, n_mels)."""
        m = cond["mask"][:, None, :].to(x.dtype)
        c = cond["speaker"] + self.time(timestep_embedding(t, self._hidden))
        h = self.inp(torch.cat([x.transpose(1, 2), cond["content"]], dim=1)) * m
        for block in self.blocks:
            h = block(h, c, m)
        return (self.out(h) * m).transpose(1, 2)

    def sample(self, cond: dict[str, Tensor], noise: Tensor, steps: int | None = None) -> Tensor:
        """Euler integration of the flow from ``noise`` (batch, frames, n_mels) in ``steps`` steps;
        returns normalised mel frames."""
        n = int(steps or self.sample_steps)
        x = noise
        for i in range(n):
            t = torch.full((x.shape[0],), i / n, device=x.device, dtype=x.dtype)
            x = x + self.velocity(x, t, cond) / n
        return x * cond["mask"][:, :, None].to(x.dtype)

    def _noise(self, batch: dict[str, Tensor], like: Tensor) -> Tensor:
        noise = batch.get("noise")
        if noise is None:
            return torch.randn_like(like)
        frames = like.shape[1]
        noise = noise[:, :frames].to(like)
        if noise.shape[1] < frames:
            noise = F.pad(noise, (0, 0, 0, frames - noise.shape[1]))
        return noise

    def griffin_lim(self, logmel: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Waveform from natural-log mel power (batch, frames, n_mels) (:class:`MelGriffinLim`)."""
        key = f"{logmel.device}:{self.griffin_lim_iters}"
        if key not in self._vocoders:
            self._vocoders[key] = MelGriffinLim(**self.vocoder_args()).to(logmel.device)
        return self._vocoders[key](logmel, lengths)

    def vocoder_args(self) -> dict[str, int]:
        """The sizes :class:`MelGriffinLim` needs to turn this model's mels into audio."""
        return {"sample_rate": self.sample_rate, "n_fft": self.n_fft, "win_length": self.win_length,
                "hop_length": self.hop, "n_mels": self.n_mels, "iters": self.griffin_lim_iters}

    # ---- batch interface ------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        reverb = self.training and "audio_reverb" in batch
        cond = self.condition(batch, "audio_reverb" if reverb else "audio")
        out: dict[str, Tensor] = {"mel_lengths": cond["mask"].sum(-1), "frame_mask": cond["mask"]}
        if reverb:
            out["content"] = cond["content"]
            with torch.no_grad():
                out["content_clean"] = self.content(self.logmel(batch["audio"]), cond["mask"])
        target = batch.get("target_mel")
        frames = cond["mask"].shape[1]
        if target is not None:
            x1 = self.normalize(target[:, :frames].float())
            if x1.shape[1] < frames:
                x1 = F.pad(x1, (0, 0, 0, frames - x1.shape[1]))
            x1 = x1 * cond["mask"][:, :, None]
            out["target"] = x1
            if self.train_mode == "flow" or not self.training:
                x0 = self._noise(batch, x1)
                t = torch.rand(x1.shape[0], device=x1.device)
                tt = t[:, None, None]
                xt = (1 - (1 - self.sigma_min) * tt) * x0 + tt * x1
                v = self.velocity(xt, t, cond)
                out["v_pred"], out["v_target"] = v, x1 - (1 - self.sigma_min) * x0
                out["x1_pred"] = xt + (1 - tt) * v  # one-step estimate of the clean frames
                if self.training:  # what the speaker loss hears (speaker_cosine reads "mel")
                    out["mel"] = self.denormalize(out["x1_pred"])
        if not self.training or self.train_mode == "sample":
            like = torch.zeros(cond["mask"].shape[0], frames, self.n_mels, device=cond["content"].device)
            x = self.sample(cond, self.temperature * self._noise(batch, like))
            out["sample"] = x
            out["mel"] = self.denormalize(x)
            if not self.training:
                self._vocode(out, batch)
        return out

    def _vocode(self, out: dict[str, Tensor], batch: Mapping[str, Tensor]) -> None:
        """``audio_out`` (and its lengths) from ``out["mel"]`` with the configured vocoder, in place."""
        if self.vocoder != "griffin_lim":
            return
        with torch.no_grad():
            lengths = batch.get("lengths")
            audio = self.griffin_lim(out["mel"].detach(), out["mel_lengths"])
            out["audio_out"] = audio[:, : batch["audio"].shape[1]]
            out["audio_out_lengths"] = (lengths if lengths is not None else
                                        torch.full_like(out["mel_lengths"], batch["audio"].shape[1]))

    # ---- export and inference ---------------------------------------------------------------------------
    @property
    def export_spec(self) -> ExportSpec:
        """The sampler: ``audio`` (batch, time), ``lengths`` (batch,), ``ref_emb`` (batch, 256) and ``noise``
        (batch, frames, n_mels; cut or zero-padded to the source's frames) in, the converted log-mel ``mel``
        (batch, frames, n_mels) out. The vocoder stays outside the graph (:meth:`export_finish`)."""
        stats = (REF_STATS,) if self.reference_stats else ()
        return ExportSpec(inputs=("audio", "lengths", "ref_emb", *stats, "noise"), outputs=("mel",),
                          untimed=("lengths", "ref_emb", *stats), min_time=self.n_fft // 2 + 1)

    def export_forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """What the exported graph computes: forward's sampled ``mel`` in eval mode, no vocoder. The noise is
        fitted to the frames by concatenating zeros and cutting (no branch on its length, so a graph holds for
        every noise length)."""
        cond = self.condition(batch)
        frames = cond["mask"].shape[1]
        noise = batch["noise"].float()
        noise = torch.cat([noise, noise.new_zeros(noise.shape[0], frames, noise.shape[2])], dim=1)[:, :frames]
        return {"mel": self.denormalize(self.sample(cond, self.temperature * noise))}

    def export_finish(self, out: dict[str, Tensor], batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """An exported graph's ``mel`` completed as forward returns it in eval mode: frame lengths and mask,
        and the vocoder's audio."""
        audio = batch["audio"]
        lengths = batch.get("lengths")
        if lengths is None:
            lengths = torch.full((audio.shape[0],), audio.shape[1], dtype=torch.long)
        mel = out["mel"]
        mel_lengths = self.logmel.frames(lengths).clamp_max(mel.shape[1])
        done = {**out, "mel_lengths": mel_lengths, "frame_mask": frame_mask(mel_lengths, mel.shape[1])}
        self._vocode(done, batch)
        return done

    def export_metadata(self) -> dict[str, Any]:
        """For runtimes of the exported file: the vocoder's sizes and the sampler's step count."""
        return {META_VOCODER: json.dumps(self.vocoder_args(), sort_keys=True), META_STEPS: self.sample_steps,
                "vc.temperature": self.temperature}

    def convert(self, audio: Tensor, ref: dict[str, Tensor], noise: Tensor) -> Tensor:
        """Converted log-mel (batch, frames, n_mels) of whole sources (no padding) to the voice of ``ref``
        (:func:`reference_inputs`)."""
        return self.export_forward(sampler_batch(audio, ref, noise))["mel"]


def sampler_batch(audio: Tensor, ref: dict[str, Tensor], noise: Tensor) -> dict[str, Tensor]:
    """The sampler's inputs (``VCFlow.export_spec``) for whole sources (batch, time): every row its full length;
    ``ref``: ``ref_emb`` and, for a model with ``reference_stats``, ``ref_stats`` (:func:`reference_inputs`)."""
    lengths = torch.full((audio.shape[0],), audio.shape[1], dtype=torch.long)
    return {"audio": audio, "lengths": lengths, **ref, "noise": noise}


@functools.cache
def _stats_logmel(sample_rate: int) -> LogMel:
    return LogMel(sample_rate, N_FFT, WIN_LENGTH, HOP_LENGTH, N_MELS)


@torch.no_grad()
def reference_stats(audio: Tensor, lengths: Tensor | None = None, sample_rate: int = 16000) -> Tensor:
    """(batch, 2 * n_mels) float32: :func:`voiced_stats` of references (batch, time) with the log-mel of a
    ``vc_flow`` model of default sizes: the target voice's average spectral envelope and its spread, which
    a model with ``reference_stats`` is conditioned on beside the speaker embedding."""
    logmel = _stats_logmel(int(sample_rate))
    rows = []
    for i in range(audio.shape[0]):  # each row on its own samples: the padding of a batch changes nothing
        wave = audio[i, : int(lengths[i]) if lengths is not None else audio.shape[1]].float().cpu()
        rows.append(voiced_stats(logmel(wave[None])[0]))
    return torch.stack(rows)


def reference_inputs(model: Any, wave: np.ndarray, ref_emb: np.ndarray) -> dict[str, Tensor]:
    """What ``convert`` takes of one reference (a 1-D wave at the model's rate): ``ref_emb`` (1, 256) and,
    when the model is conditioned on them, ``ref_stats``."""
    out = {"ref_emb": torch.from_numpy(np.asarray(ref_emb, dtype=np.float32))[None]}
    if getattr(model, "reference_stats", False):
        out[REF_STATS] = reference_stats(torch.from_numpy(np.asarray(wave, dtype=np.float32))[None],
                                         sample_rate=int(model.sample_rate))
    return out


class MelGriffinLim(nn.Module):
    """Waveform from natural-log mel power (batch, frames, n_mels): the mel filterbank's pseudo-inverse
    (clamped at 0) to a linear magnitude, then torchaudio's Griffin-Lim with ``iters`` iterations."""

    def __init__(self, sample_rate: int, n_fft: int, win_length: int, hop_length: int, n_mels: int,
                 iters: int = 32) -> None:
        super().__init__()
        import torchaudio

        self.hop = hop_length
        fb = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate)
        self.inverse: Tensor
        self.register_buffer("inverse", torch.linalg.pinv(fb), persistent=False)  # (n_mels, freqs)
        self.gl = torchaudio.transforms.GriffinLim(n_fft=n_fft, win_length=win_length, hop_length=hop_length,
                                                   power=1.0, n_iter=iters)

    def forward(self, logmel: Tensor, lengths: Tensor | None = None) -> Tensor:
        power = torch.clamp(torch.exp(logmel) - 1e-6, min=0.0) @ self.inverse.to(logmel)  # (batch, frames, freqs)
        wave = self.gl(power.clamp_min(0.0).sqrt().transpose(1, 2))
        if lengths is not None:
            wave = wave * (torch.arange(wave.shape[-1], device=wave.device)[None] < lengths[:, None] * self.hop)
        return wave


def describe(model: VCFlow) -> dict[str, Any]:
    """Sizes for logs: parameters of the content encoder and of the flow."""
    content = sum(p.numel() for p in model.content.parameters())
    return {"content_params": content, "flow_params": sum(p.numel() for p in model.parameters()) - content}


def _speaker_reads(args: dict[str, Any]) -> tuple[str, ...]:
    return (str(args.get("column", "reference")),)


class SpeakerEncoder(nn.Module):
    """resemblyzer's pretrained speaker encoder (weights shipped in its wheel) over an audio column:
    ``{"ref_emb": (batch, 256)}``, L2-normalised, one per row from its valid samples; with ``stats: true``
    also ``ref_stats`` (batch, 160), :func:`reference_stats` of the same audio. A `cache` phase runs it once
    over a dataset's ``reference`` column so that training reads the embedding."""

    reads = _speaker_reads  # the batch key forward reads: the configured column (raytrain.data.columns)

    def __init__(self, column: str = "reference", sample_rate: int = 16000, stats: bool = False) -> None:
        super().__init__()
        self.column, self.sample_rate, self.stats = column, int(sample_rate), bool(stats)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        from raytrain.metrics.voice import NoSpeechError, speaker_embeddings

        audio = batch[self.column]
        lengths = batch.get(f"{self.column}_lengths")
        if lengths is None and self.column in ("audio", "mix"):
            lengths = batch.get("lengths")
        waves = [audio[i, : int(lengths[i]) if lengths is not None else audio.shape[1]].float().cpu().numpy()
                 for i in range(audio.shape[0])]
        rows = []
        for i, emb in enumerate(speaker_embeddings(waves, self.sample_rate)):
            if emb is None:
                raise NoSpeechError(f"speaker_encoder: {self.column!r} row {i} holds no speech")
            rows.append(torch.from_numpy(emb))
        out = {"ref_emb": torch.stack(rows).to(audio.device)}
        if self.stats:
            out[REF_STATS] = reference_stats(audio, lengths, self.sample_rate).to(audio.device)
        return out
