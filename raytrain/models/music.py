"""The models of the `music_lora` recipe: song generation from lyrics, a melody sketch and a style prompt.

It follows the plan of SongBloom-style systems, sized to train on a CPU in minutes:

- ``music_ae`` — a mel autoencoder (the "VAE"): log-mel frames (100/s) through strided convolutions into a
  small latent sequence (``latent_dim`` values at 25 frames a second, a mean and a log-variance per frame,
  a KL term keeps it near a unit Gaussian), and back to log-mels; Griffin-Lim makes audio of them. In
  ``mode: encode`` (the `cache` phase) it returns the latent means of ``audio`` and the prompt embedding of
  ``prompt`` (the mean and spread of the prompt's latent frames).
- ``sketch_vq`` — the sketch codebook: a melody feature of the audio (the log-mel's low band, 60 Hz to
  1.1 kHz where the sung melody and the bass are, each frame taken relative to its loudest bin, pooled to
  the latent rate) projected and vector-quantised (``vector_quantize_pytorch``: k-means initialisation,
  EMA codebook, dead codes revived from the batch), trained to reconstruct the feature. Its codes at 25
  frames a second are the ``sketch`` tokens, one per latent frame.
- ``music_generator`` — a transformer that predicts the latent frames: per frame the sketch token's
  embedding plus a position plus the prompt embedding, self-attention over the frames and cross-attention
  to the lyrics (characters and section tags, ``lyrics_tokens``). Sketch tokens are dropped (replaced by a
  null token) for a share of training rows, so the model also generates from lyrics and a prompt alone.
  Its attention and feed-forward projections are plain ``nn.Linear`` layers (no ``nn.MultiheadAttention``,
  whose fused path skips LoRA adapters), which a `lora:` phase adapts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrain.data.transforms import TRANSFORMS
from raytrain.models.vc import LogMel, MelGriffinLim, frame_mask

N_MELS, N_FFT, WIN_LENGTH, HOP_LENGTH, DOWN = 64, 1024, 400, 160, 4  # 100 mel frames/s, latents at 25/s
MEL_SHIFT, MEL_SCALE = 5.0, 4.0  # log-mel -> about zero mean, unit spread (natural-log power of peak-normalised audio)
TAGS = ("[intro]", "[verse]", "[chorus]", "[bridge]", "[outro]")
LYRIC_CHARS = " abcdefghijklmnopqrstuvwxyz'"  # + the tags: token ids 1.. (0 pads)


def latent_frames(samples: Tensor | int, hop: int = HOP_LENGTH, down: int = DOWN) -> Any:
    """Latent frames of ``samples`` of audio: ceil(mel frames / down), mel frames = samples // hop + 1."""
    if isinstance(samples, Tensor):
        return torch.div(torch.div(samples, hop, rounding_mode="floor") + 1 + down - 1, down, rounding_mode="floor")
    return (int(samples) // hop + 1 + down - 1) // down


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each frame of (batch, channels, frames): unlike a GroupNorm over the
    whole clip, a row's frames are normalised alike whatever padding its batch gives it."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ResBlock(nn.Module):
    def __init__(self, hidden: int, kernel: int = 5, dilation: int = 1) -> None:
        super().__init__()
        self.norm = ChannelNorm(hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel, padding=dilation * (kernel // 2), dilation=dilation)
        self.out = nn.Conv1d(hidden, hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.out(F.gelu(self.conv(F.gelu(self.norm(x)))))


class MusicAE(nn.Module):
    """Mel autoencoder with a Gaussian latent (see the module docstring).

    Training (``mode: train``) returns ``mel`` (the normalised log-mel target), ``mel_hat``, ``frame_mask``,
    ``latent_mean``, ``latent_logvar``, ``latent_mask`` (for the ``ae_recon`` and ``ae_kl`` losses);
    ``vocode`` makes audio of a log-mel (Griffin-Lim). ``mode: encode`` returns ``latent`` (batch, frames,
    latent_dim) with ``latent_lengths``, and ``prompt_emb`` (batch, 2 * latent_dim) when the batch has
    ``prompt``."""

    def __init__(self, *, sample_rate: int = 16000, n_mels: int = N_MELS, hidden: int = 128, latent_dim: int = 16,
                 blocks: int = 2, mode: str = "train", griffin_lim_iters: int = 32) -> None:
        super().__init__()
        if mode not in ("train", "encode"):
            raise ValueError(f"music_ae: mode must be 'train' or 'encode', got {mode!r}")
        self.sample_rate, self.n_mels, self.latent_dim, self.mode = int(sample_rate), n_mels, latent_dim, mode
        self.hop, self.down = HOP_LENGTH * sample_rate // 16000, DOWN
        win, n_fft = WIN_LENGTH * sample_rate // 16000, N_FFT * sample_rate // 16000
        self.logmel = LogMel(sample_rate, n_fft, win, self.hop, n_mels)
        self.enc_in = nn.Conv1d(n_mels, hidden, 5, padding=2)
        self.enc_blocks = nn.ModuleList(ResBlock(hidden) for _ in range(blocks))
        self.enc_down = nn.ModuleList(nn.Conv1d(hidden, hidden, 3, stride=2, padding=1) for _ in range(2))
        self.enc_latent = nn.ModuleList(ResBlock(hidden, dilation=d) for d in (1, 2)[:blocks])
        self.enc_out = nn.Conv1d(hidden, 2 * latent_dim, 1)
        self.decoder = nn.Sequential(
            nn.Conv1d(latent_dim, hidden, 3, padding=1), *[ResBlock(hidden, dilation=d) for d in (1, 2)[:blocks]],
            nn.ConvTranspose1d(hidden, hidden, 4, stride=2, padding=1), nn.GELU(),
            nn.ConvTranspose1d(hidden, hidden, 4, stride=2, padding=1), nn.GELU(),
            *[ResBlock(hidden) for _ in range(blocks)], nn.Conv1d(hidden, n_mels, 5, padding=2))
        self._vocoder_args = {"sample_rate": sample_rate, "n_fft": n_fft, "win_length": win, "hop_length": self.hop,
                              "n_mels": n_mels, "iters": griffin_lim_iters}
        self._vocoder: MelGriffinLim | None = None

    @staticmethod
    def reads(args: Mapping[str, Any]) -> tuple[str, ...]:
        return ("audio",)

    def mel(self, audio: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        """Normalised log-mel (batch, frames, n_mels) and its frame mask."""
        x = (self.logmel(audio) + MEL_SHIFT) / MEL_SCALE
        if lengths is None:
            lengths = torch.full((audio.shape[0],), audio.shape[1], device=audio.device)
        return x, frame_mask(self.logmel.frames(lengths), x.shape[1])

    def encode(self, audio: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(latent mean, log-variance) (batch, latent frames, latent_dim), the latent mask and lengths."""
        x, mask = self.mel(audio, lengths)
        m = mask[:, None].to(x.dtype)  # every layer's output is masked: padding never reaches a row's frames
        h = self.enc_in(x.transpose(1, 2) * m) * m
        for block in self.enc_blocks:
            h = block(h) * m
        for down in self.enc_down:
            m = F.max_pool1d(m, 2, ceil_mode=True)  # the frames a stride-2 conv (kernel 3, padding 1) keeps
            h = F.gelu(down(h)) * m
        for block in self.enc_latent:
            h = block(h) * m
        mean, logvar = (self.enc_out(h) * m).transpose(1, 2).chunk(2, dim=-1)
        lat_mask = m[:, 0] > 0
        return mean, logvar.clamp(-10.0, 10.0), lat_mask, lat_mask.sum(1)

    def decode(self, latent: Tensor) -> Tensor:
        """Latent frames (batch, frames, latent_dim) -> normalised log-mel (batch, down * frames, n_mels)."""
        return self.decoder(latent.transpose(1, 2)).transpose(1, 2)

    def to_logmel(self, mel: Tensor) -> Tensor:
        return mel * MEL_SCALE - MEL_SHIFT

    def vocode(self, mel: Tensor, frames: Tensor | None = None) -> Tensor:
        """Waveforms of normalised log-mels (Griffin-Lim)."""
        if self._vocoder is None:
            self._vocoder = MelGriffinLim(**self._vocoder_args).to(mel.device)
        return self._vocoder(self.to_logmel(mel), frames)

    def prompt_embedding(self, prompt: Tensor, lengths: Tensor | None) -> Tensor:
        """(batch, 2 * latent_dim): mean and spread of the prompt's latent frames."""
        mean, _, mask, n = self.encode(prompt, lengths)
        m = mask[..., None].to(mean.dtype)
        count = n.clamp_min(1)[:, None].to(mean.dtype)
        mu = (mean * m).sum(1) / count
        sd = ((((mean - mu[:, None]) * m) ** 2).sum(1) / count).clamp_min(1e-6).sqrt()
        return torch.cat([mu, sd], dim=-1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        audio, lengths = batch["audio"], batch.get("lengths")
        if self.mode == "encode":
            mean, _, _, n = self.encode(audio, lengths)
            out = {"latent": mean, "latent_lengths": n}
            if "prompt" in batch:
                out["prompt_emb"] = self.prompt_embedding(batch["prompt"], batch.get("prompt_lengths"))
            return out
        x, mask = self.mel(audio, lengths)
        mean, logvar, lat_mask, _ = self.encode(audio, lengths)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if self.training else mean
        mel_hat = self.decode(z * lat_mask[..., None])[:, : x.shape[1]]
        return {"mel": x, "mel_hat": mel_hat, "frame_mask": mask, "latent_mean": mean, "latent_logvar": logvar,
                "latent_mask": lat_mask}


class SketchVQ(nn.Module):
    """The sketch codebook (see the module docstring). ``forward``: ``sketch`` (batch, frames) int64 codes with
    ``sketch_lengths``; in training also ``feature``, ``feature_hat``, ``sketch_mask`` and ``vq_commit`` for
    the ``vq_recon`` and ``vq_commit`` losses."""

    def __init__(self, *, sample_rate: int = 16000, codebook_size: int = 64, dim: int = 32, n_mels: int = 128,
                 f_min: float = 60.0, f_max: float = 1100.0, decay: float = 0.9, dead_code_threshold: float = 2.0,
                 commitment_weight: float = 1.0) -> None:
        super().__init__()
        import torchaudio
        from vector_quantize_pytorch import VectorQuantize

        self.sample_rate, self.codebook_size = int(sample_rate), int(codebook_size)
        self.hop, self.down = HOP_LENGTH * sample_rate // 16000, DOWN
        n_fft, win = N_FFT * sample_rate // 16000, WIN_LENGTH * sample_rate // 16000
        with torch.device("cpu"):
            self.mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, win_length=win,
                                                            hop_length=self.hop, n_mels=n_mels, power=2.0)
            fb = self.mel.mel_scale.fb  # (freqs, n_mels): keep the bands whose centre lies in [f_min, f_max]
            freqs = torch.linspace(0, sample_rate / 2, fb.shape[0])
            centre = (fb * freqs[:, None]).sum(0) / fb.sum(0).clamp_min(1e-9)
        keep = ((centre >= f_min) & (centre <= f_max)).nonzero().flatten()
        if len(keep) < 4:
            raise ValueError(f"sketch_vq: only {len(keep)} mel bands lie in {f_min}-{f_max} Hz; raise n_mels")
        self.band: Tensor
        self.register_buffer("band", keep, persistent=False)
        self.features = int(len(keep))
        self.proj = nn.Sequential(nn.Linear(self.features, 64), nn.GELU(), nn.Linear(64, dim))
        self.vq = VectorQuantize(dim=dim, codebook_size=codebook_size, decay=decay, kmeans_init=True,
                                 kmeans_iters=10, threshold_ema_dead_code=dead_code_threshold,
                                 commitment_weight=commitment_weight)
        self.unproj = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, self.features))

    @staticmethod
    def reads(args: Mapping[str, Any]) -> tuple[str, ...]:
        return ("audio",)

    def feature(self, audio: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Melody feature (batch, latent frames, bands), its mask and lengths."""
        power = self.mel(audio.float()).index_select(1, self.band)  # (batch, bands, frames)
        db = 10 * torch.log10(power + 1e-8)
        db = (db - db.amax(1, keepdim=True)).clamp_min(-60.0) / 30.0 + 1.0  # each frame against its loudest band
        frames = torch.div(lengths, self.hop, rounding_mode="floor") + 1 if lengths is not None else \
            torch.full((audio.shape[0],), db.shape[-1], device=audio.device)
        m = frame_mask(frames, db.shape[-1]).to(db.dtype)[:, None]
        pooled = F.avg_pool1d(db * m, self.down, ceil_mode=True)
        weight = F.avg_pool1d(m, self.down, ceil_mode=True)
        feat = (pooled / weight.clamp_min(1e-6)).transpose(1, 2)
        n = latent_frames(lengths, self.hop, self.down) if lengths is not None else \
            torch.full((audio.shape[0],), feat.shape[1], device=audio.device)
        return feat, frame_mask(n, feat.shape[1]), n

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        feat, mask, n = self.feature(batch["audio"], batch.get("lengths"))
        h = self.proj(feat)
        q, codes, commit = self.vq(h, mask=mask)
        return {"sketch": torch.where(mask, codes, torch.zeros_like(codes)), "sketch_lengths": n, "feature": feat,
                "feature_hat": self.unproj(q), "sketch_mask": mask, "vq_commit": commit.reshape(())}


# ---- lyrics ------------------------------------------------------------------------------------------
_TAG_RE = re.compile(r"\[[a-z]+\]")


def lyrics_ids(text: str) -> np.ndarray:
    """Lyrics -> int64 token ids: section tags (``[verse]``) are one token each, then characters of
    ``LYRIC_CHARS`` (lowercased; others dropped; spaces collapsed). 0 is padding."""
    ids: list[int] = []
    text = str(text).lower()
    pos = 0
    for m in [*_TAG_RE.finditer(text), None]:
        chunk = text[pos: m.start() if m else len(text)]
        words = "".join(c for c in chunk if c in LYRIC_CHARS).split()
        for w in words:
            if ids and ids[-1] != 0 and ids[-1] <= len(LYRIC_CHARS):
                ids.append(1)  # the space between words
            ids.extend(LYRIC_CHARS.index(c) + 1 for c in w)
        if m is not None:
            tag = m.group(0)
            if tag in TAGS:
                ids.append(len(LYRIC_CHARS) + 1 + TAGS.index(tag))
            pos = m.end()
    return np.asarray(ids or [1], dtype=np.int64)


LYRIC_VOCAB = len(LYRIC_CHARS) + len(TAGS) + 1


def word_starts(ids: np.ndarray) -> list[int]:
    """Positions in ``lyrics_ids`` where each word (a run of characters, tags and spaces excluded) starts."""
    chars = (ids > 1) & (ids <= len(LYRIC_CHARS))
    return [i for i in range(len(ids)) if chars[i] and (i == 0 or not chars[i - 1])]


def parse_word_times(text: str) -> list[tuple[float, float]]:
    """``"0.000-0.420 0.420-0.850"`` -> [(0.0, 0.42), (0.42, 0.85)]."""
    out = []
    for part in str(text or "").split():
        start, _, end = part.partition("-")
        out.append((float(start), float(end)))
    return out


def frame_words(ids: np.ndarray, times: list[tuple[float, float]] | None, frames: int, rate: float,
                start: float = 0.0) -> np.ndarray:
    """(frames,) int64: for each frame (at ``rate``, the first at ``start`` seconds) 1 + the position in ``ids``
    of the first character of the word sung then, 0 where none is. Without ``times`` the words share the frames
    evenly (what inference without word times has)."""
    starts = word_starts(ids)
    out = np.zeros(frames, dtype=np.int64)
    if not starts:
        return out
    if not times:
        idx = np.minimum((np.arange(frames) * len(starts)) // max(frames, 1), len(starts) - 1)
        return np.asarray(starts, dtype=np.int64)[idx] + 1
    if len(times) != len(starts):
        raise ValueError(f"word_times has {len(times)} words, the lyrics {len(starts)}")
    t = start + (np.arange(frames) + 0.5) / rate
    for pos, (a, b) in zip(starts, times, strict=True):
        out[(t >= a) & (t < b)] = pos + 1
    return out


@TRANSFORMS.register("lyrics_tokens")
class LyricsTokens:
    """Numpy batch transform: the ``text`` column (lyrics with section tags) -> ``lyrics`` token ids
    (object array of int64 arrays; the collate pads them and adds ``lyrics_lengths``). With ``align: true``
    and a ``word_times`` column (the sung corpus writes when each word is sung) also ``frame_word``: per
    frame of the ``frames_of`` column (at ``rate`` frames a second; from ``crop_start`` when an
    ``aligned_crop`` ran before) 1 + the position of the word sung then in ``lyrics``, 0 for none."""

    reads: tuple[str, ...] = ()

    @staticmethod
    def makes(args: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {"lyrics": ("text",)}
        if args.get("align"):
            out["frame_word"] = ("text", "word_times", str(args.get("frames_of", "latent")))
        return out

    def __init__(self, align: bool = False, frames_of: str = "latent", rate: float = 25.0, *, sample_rate: int,
                 seed: int) -> None:
        self.align, self.frames_of, self.rate = bool(align), frames_of, float(rate)

    def __call__(self, batch: dict[str, np.ndarray], epoch: int = 0) -> dict[str, np.ndarray]:
        out = np.empty(len(batch["text"]), dtype=object)
        for i, text in enumerate(batch["text"]):
            out[i] = lyrics_ids(str(text) if text is not None else "")
        batch = {**batch, "lyrics": out}
        if self.align:
            for need in ("word_times", self.frames_of):
                if need not in batch:
                    raise KeyError(f"lyrics_tokens with align: the batch has no {need!r} column (it has {sorted(batch)})")
            fw = np.empty(len(out), dtype=object)
            starts = batch.get("crop_start", np.zeros(len(out)))
            for i, ids in enumerate(out):
                fw[i] = frame_words(ids, parse_word_times(str(batch["word_times"][i])), len(batch[self.frames_of][i]),
                                    self.rate, float(starts[i]))
            batch["frame_word"] = fw
        return batch


# ---- generator -----------------------------------------------------------------------------------------
def sinusoid(n: int, dim: int, device: torch.device) -> Tensor:
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    out = torch.zeros(n, dim, device=device)
    out[:, 0::2], out[:, 1::2] = torch.sin(pos * freqs), torch.cos(pos * freqs)
    return out


class Attention(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: Tensor) -> Tensor:
            return y.view(b, -1, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(ctx)), split(self.v(ctx)),
                                           attn_mask=ctx_mask[:, None, None, :])
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class Layer(nn.Module):
    """Pre-norm transformer layer: self-attention, optional cross-attention, feed-forward."""

    def __init__(self, d_model: int, heads: int, ff: int, cross: bool, dropout: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d_model), Attention(d_model, heads)
        self.cross = Attention(d_model, heads) if cross else None
        self.norm2 = nn.LayerNorm(d_model) if cross else None
        self.norm3 = nn.LayerNorm(d_model)
        self.ff1, self.ff2 = nn.Linear(d_model, ff), nn.Linear(ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor, ctx: Tensor | None = None, ctx_mask: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, mask))
        if self.cross is not None and self.norm2 is not None and ctx is not None and ctx_mask is not None:
            x = x + self.drop(self.cross(self.norm2(x), ctx, ctx_mask))
        return x + self.drop(self.ff2(self.drop(F.gelu(self.ff1(self.norm3(x))))))


class MusicGenerator(nn.Module):
    """Latent frames from lyrics, sketch tokens and a prompt embedding (see the module docstring).

    Batch: ``lyrics`` (batch, tokens) with ``lyrics_lengths`` (the ``lyrics_tokens`` transform), ``sketch``
    (batch, frames) codes with ``sketch_lengths``, ``prompt_emb`` (batch, prompt_dim), and in training the
    target ``latent`` (batch, frames, latent_dim). Output: ``latent_pred`` and ``frame_mask``. Without
    ``sketch`` it needs ``frames`` (batch,) — how many latent frames to generate — and uses the null token.
    With ``aligned_lyrics`` each frame also hears the lyrics encoder's state at the word sung then
    (``frame_word``, the ``lyrics_tokens`` transform with ``align: true``), besides attending to all of them."""

    def __init__(self, *, latent_dim: int = 16, codebook_size: int = 64, d_model: int = 128, layers: int = 4,
                 text_layers: int = 2, heads: int = 4, ff: int = 256, dropout: float = 0.1,
                 sketch_dropout: float = 0.2, aligned_lyrics: bool = False) -> None:
        super().__init__()
        self.aligned_lyrics = bool(aligned_lyrics)
        if d_model % heads:
            raise ValueError(f"music_generator: d_model {d_model} is not a multiple of heads {heads}")
        self.latent_dim, self.codebook_size, self.d_model = latent_dim, codebook_size, d_model
        self.sketch_dropout = float(sketch_dropout)
        self.text_emb = nn.Embedding(LYRIC_VOCAB, d_model, padding_idx=0)
        self.text_layers = nn.ModuleList(Layer(d_model, heads, ff, False, dropout) for _ in range(text_layers))
        self.text_norm = nn.LayerNorm(d_model)
        self.sketch_emb = nn.Embedding(codebook_size + 1, d_model)  # the last: no sketch
        self.word = nn.Linear(d_model, d_model)  # the lyrics encoder's state at the word sung in a frame
        self.prompt = nn.Linear(2 * latent_dim, d_model)
        self.layers = nn.ModuleList(Layer(d_model, heads, ff, True, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, latent_dim)

    @staticmethod
    def reads(args: Mapping[str, Any]) -> tuple[str, ...]:
        return ("lyrics", "sketch", "prompt_emb", "latent", *(("frame_word",) if args.get("aligned_lyrics") else ()))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        lyrics = batch["lyrics"]
        b = lyrics.shape[0]
        device = lyrics.device
        tlen = batch.get("lyrics_lengths", torch.full((b,), lyrics.shape[1], device=device))
        tmask = frame_mask(tlen, lyrics.shape[1])
        t = self.text_emb(lyrics) + sinusoid(lyrics.shape[1], self.d_model, device)
        for layer in self.text_layers:
            t = layer(t, tmask)
        t = self.text_norm(t)
        if "sketch" in batch:
            sketch = batch["sketch"].long().clamp(0, self.codebook_size - 1)
            n = batch.get("sketch_lengths", torch.full((b,), sketch.shape[1], device=device))
            if self.training and self.sketch_dropout > 0:
                drop = torch.rand(b, device=device) < self.sketch_dropout
                sketch = torch.where(drop[:, None], torch.full_like(sketch, self.codebook_size), sketch)
        else:
            n = batch["frames"].long()
            sketch = torch.full((b, int(n.max())), self.codebook_size, dtype=torch.long, device=device)
        frames = sketch.shape[1]
        if "latent" in batch:  # training: the target's frames decide the length
            frames = min(frames, batch["latent"].shape[1])
            sketch = sketch[:, :frames]
            n = torch.minimum(n, batch.get("latent_lengths", n))
        mask = frame_mask(n.clamp(max=frames), frames)
        x = self.sketch_emb(sketch) + sinusoid(frames, self.d_model, device) + self.prompt(batch["prompt_emb"])[:, None]
        if self.aligned_lyrics and "frame_word" in batch:  # the word sung in each frame, from the lyrics encoder
            fw = batch["frame_word"][:, :frames].long()
            fw = F.pad(fw, (0, frames - fw.shape[1]))
            state = torch.gather(t, 1, (fw - 1).clamp(min=0)[..., None].expand(-1, -1, self.d_model))
            x = x + self.word(state) * (fw > 0)[..., None]
        for layer in self.layers:
            x = layer(x, mask, t, tmask)
        pred = self.head(self.norm(x)) * mask[..., None]
        return {"latent_pred": pred, "frame_mask": mask}
