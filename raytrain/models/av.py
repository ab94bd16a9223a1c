"""Audio-visual target-speaker extraction and recognition (the ``av_tse_asr`` recipe).

``AVTSEASR`` takes a 2-talker mixture (``mix``, batch x samples) and the target talker's lip video
(``video``, batch x frames x H x W x C, uint8 at 25 frames a second) and returns the extracted
target (``est_sources``, batch x 1 x samples) and character CTC log-probabilities of what the
target says (``asr_ctc``, with ``enc_lengths``). Parameter names group the parts that the recipe's
steps freeze and train:

- ``visual``: the visual front end. A 3-D convolution over (time, height, width), then a small 2-D
  residual network per frame, its last map flattened into one embedding per video frame (``visual_dim``).
- ``separator``: a time-frequency separator. The mixture's STFT (real, imaginary, log-magnitude)
  is merged into sub-bands of ``band`` bins. Transformer blocks then attend along time within each
  band and along frequency within each frame. Before each block, the visual embedding (through the
  separator's own ``separator.visual`` adapter) scales and shifts every band of its frames (FiLM).
  A complex mask per bin, times the mixture's STFT, gives the target's STFT, then iSTFT.
- ``encoder``: the audio-visual encoder. Log-mel of the extracted audio (4 frames stacked: 40 ms,
  the video's frame period) and the visual embedding, concatenated, projected and fused by a
  ``torchaudio`` Conformer.
- ``ctc``: a linear character head (``raytrain.data.text.CHARS`` + blank).

``asr_input: clean`` feeds the clean target (``sources``, from the dataset's ``s1`` column) to the
encoder instead of the separator's output: the recipe's step 0 pre-trains the encoder and its head
on clean speech + video, as the seed starts from a pre-trained AV-HuBERT. ``outputs`` selects the
branches that run: ``separation`` (step 1, only the extraction, so the frozen recogniser costs
nothing), ``asr`` or ``all``. ``modality_dropout: {video: p, audio: p}`` zeroes the encoder's video
or audio stream for that share of training batches (never both in one batch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datasets_prep.av import VIDEO_FPS
from raytrain.data.text import CHARS, Vocab
from raytrain.models.asr import LogMel, SpecAugment
from raytrain.models.separation import zero_beyond

STACK = 4  # log-mel frames (10 ms) per encoder frame: 40 ms, one video frame


class _Block2d(nn.Module):
    """Residual 3x3 block, no normalisation: the mouth's size and darkness are what the frames tell, and a
    per-frame norm would take them out. The shortcut average-pools, then projects with a 1x1 convolution of
    stride 1: oneDNN's backward pass of a strided 1x1 convolution with fewer input channels than its block
    (uxlfoundation/oneDNN#6035) writes past its workspace on AVX2/AVX-512 CPUs and crashed training here."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.silu(self.conv1(x)))
        short = F.avg_pool2d(x, self.stride, ceil_mode=True) if self.stride > 1 else x
        return F.silu(h + self.skip(short))


class VisualFrontEnd(nn.Module):
    """uint8 video (batch, frames, H, W, C) -> (batch, frames, dim); frames beyond ``lengths`` are zeros. Stride-2
    blocks halve the frames to at most 8x8; the last feature map is flattened, not pooled, so where in the frame
    a feature is (the lips' opening) reaches ``out``."""

    def __init__(self, size: int, channels: tuple[int, int, int] = (8, 16, 32), dim: int = 64) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.conv3d = nn.Conv3d(1, c1, (5, 3, 3), padding=(2, 1, 1))
        blocks, side = [_Block2d(c1, c2, 2), _Block2d(c2, c3, 2)], math.ceil(math.ceil(size / 2) / 2)
        while side > 8:  # larger frames (88x88 lip crops) are halved further, so `out` stays small
            blocks.append(_Block2d(c3, c3, 2))
            side = math.ceil(side / 2)
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Linear(c3 * side * side, dim)

    def forward(self, video: Tensor, lengths: Tensor | None = None) -> Tensor:
        if video.ndim != 5:
            raise ValueError(f"video must be (batch, frames, height, width, channels), got {tuple(video.shape)}")
        b, t = video.shape[:2]
        x = video.float().mean(-1, keepdim=True) / 255.0  # grey
        x = (x - 0.5) / 0.25
        if lengths is not None:  # padded frames stay zeros after normalising, as they were before
            x = zero_beyond(x.permute(0, 2, 3, 4, 1), lengths).permute(0, 4, 1, 2, 3)
        h = F.silu(self.conv3d(x.permute(0, 4, 1, 2, 3)))  # (b, c1, t, H, W)
        h = self.blocks(h.transpose(1, 2).reshape(b * t, h.shape[1], *h.shape[3:]))
        emb = self.out(h.flatten(1)).reshape(b, t, -1)
        return zero_beyond(emb.transpose(1, 2), lengths).transpose(1, 2)


class _Attention(nn.Module):
    """Pre-norm self-attention + feed-forward over (sequences, length, dim) with a key mask."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(n, length, dim)))
        return x + self.drop(self.ff(self.norm2(x)))


class _TFBlock(nn.Module):
    """Along time within each band (a depthwise convolution gives the order), then along frequency."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 5, padding=2, groups=dim)
        self.time = _Attention(dim, heads, ff, dropout)
        self.freq = _Attention(dim, heads, ff, dropout)

    def forward(self, x: Tensor, frame_mask: Tensor) -> Tensor:
        b, nb, t, c = x.shape
        h = x.reshape(b * nb, t, c)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.time(h, frame_mask.repeat_interleave(nb, dim=0))
        h = h.reshape(b, nb, t, c).transpose(1, 2).reshape(b * t, nb, c)
        h = self.freq(h)
        return h.reshape(b, t, nb, c).transpose(1, 2)


class TFSeparator(nn.Module):
    """Mixture + visual embedding -> the target's waveform (see the module docstring)."""

    window: Tensor

    def __init__(self, *, sample_rate: int, visual_dim: int, n_fft: int = 256, hop: int = 128, band: int = 8,
                 dim: int = 32, blocks: int = 2, heads: int = 4, ff: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.sample_rate, self.n_fft, self.hop, self.band = sample_rate, n_fft, hop, band
        bins = n_fft // 2 + 1
        self.bands = -(-bins // band)
        with torch.device("cpu"):
            self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.inp = nn.Conv2d(3, dim, (band, 3), stride=(band, 1), padding=(0, 1))
        self.band_emb = nn.Parameter(torch.zeros(1, self.bands, 1, dim))
        self.visual = nn.Sequential(nn.Linear(visual_dim, dim), nn.SiLU())
        self.visual_conv = nn.Conv1d(dim, dim, 5, padding=2)
        films = [nn.Linear(dim, 2 * dim) for _ in range(blocks)]
        for film in films:  # FiLM starts as the identity
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)
        self.film = nn.ModuleList(films)
        self.blocks = nn.ModuleList(_TFBlock(dim, heads, ff, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        self.mask = nn.Linear(dim, 2 * band)

    def stft_frames(self, samples: Tensor) -> Tensor:
        return torch.div(samples, self.hop, rounding_mode="floor") + 1

    def forward(self, mix: Tensor, lengths: Tensor, visual: Tensor) -> Tensor:
        b, samples = mix.shape
        valid = zero_beyond(mix.float(), lengths)
        rms = (valid.square().sum(-1) / lengths.clamp_min(1)).sqrt().clamp_min(1e-5)[:, None]
        spec = torch.stft(valid / rms, self.n_fft, self.hop, window=self.window, center=True,
                          return_complex=True)  # (b, bins, t)
        bins, t = spec.shape[1:]
        feats = torch.stack([spec.real, spec.imag, torch.log1p(spec.abs())], dim=1)  # (b, 3, bins, t)
        feats = F.pad(feats, (0, 0, 0, self.bands * self.band - bins))
        x = self.inp(feats).permute(0, 2, 3, 1) + self.band_emb  # (b, bands, t, dim)
        frame_mask = torch.arange(t, device=mix.device)[None, :] < self.stft_frames(lengths)[:, None]
        # the video frame of each STFT frame (frame k's centre is at k * hop samples)
        idx = (torch.arange(t, device=mix.device) * self.hop * VIDEO_FPS / self.sample_rate).long()
        v = self.visual(visual)
        v = v + self.visual_conv(v.transpose(1, 2)).transpose(1, 2)
        v = v[:, idx.clamp(max=v.shape[1] - 1)] if v.shape[1] else v.new_zeros(b, t, v.shape[-1])
        for film, block in zip(self.film, self.blocks, strict=True):
            scale, shift = film(v).chunk(2, dim=-1)  # (b, t, dim)
            x = x * (1 + scale[:, None]) + shift[:, None]
            x = block(x, frame_mask)
        m = self.mask(self.norm(x)).reshape(b, self.bands, t, self.band, 2)
        m = m.permute(0, 1, 3, 2, 4).reshape(b, self.bands * self.band, t, 2)[:, :bins]
        est = torch.istft(torch.complex(m[..., 0], m[..., 1]) * spec, self.n_fft, self.hop, window=self.window,
                          center=True, length=samples)
        return zero_beyond(est * rms, lengths)


class AVEncoder(nn.Module):
    """Log-mel of the audio (stacked to 40 ms frames) + the visual embedding -> Conformer frames."""

    def __init__(self, *, sample_rate: int, visual_dim: int, n_mels: int = 40, d_model: int = 144, heads: int = 4,
                 ffn: int = 576, layers: int = 4, conv_kernel: int = 15, dropout: float = 0.1,
                 spec_augment: Mapping[str, int] | None = None) -> None:
        super().__init__()
        import torchaudio

        self.frontend = LogMel(sample_rate, n_mels)
        self.spec_augment = SpecAugment(**(spec_augment if spec_augment is not None else
                                           {"freq_masks": 1, "freq_width": 8, "time_masks": 1, "time_width": 10}))
        self.audio = nn.Sequential(nn.LayerNorm(n_mels * STACK), nn.Linear(n_mels * STACK, d_model))
        self.video = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, d_model))
        self.fuse = nn.Linear(2 * d_model, d_model)
        self.body = torchaudio.models.Conformer(input_dim=d_model, num_heads=heads, ffn_dim=ffn, num_layers=layers,
                                                depthwise_conv_kernel_size=conv_kernel, dropout=dropout)

    def forward(self, audio: Tensor, lengths: Tensor, visual: Tensor,
                drop: Literal["audio", "video"] | None = None) -> tuple[Tensor, Tensor]:
        feats = self.spec_augment(self.frontend(audio))
        b, frames, m = feats.shape
        n = frames // STACK
        a = self.audio(feats[:, : n * STACK].reshape(b, n, m * STACK))
        enc_lengths = torch.clamp(torch.div(self.frontend.frames(lengths), STACK, rounding_mode="floor"), 0, n)
        v = F.pad(visual, (0, 0, 0, max(0, n - visual.shape[1])))[:, :n]
        v = self.video(v)
        if drop == "audio":
            a = torch.zeros_like(a)
        elif drop == "video":
            v = torch.zeros_like(v)
        x = self.fuse(torch.cat([a, v], dim=-1))
        if n == 0:
            return x, enc_lengths
        out, out_lengths = self.body(x, enc_lengths.clamp_min(1))
        return out, torch.minimum(out_lengths, enc_lengths)


class AVTSEASR(nn.Module):
    """Visual front end -> TF separator -> audio-visual encoder -> CTC (see the module docstring)."""

    def __init__(self, *, sample_rate: int = 8000, video_size: int = 24, video_channels: int = 1,
                 visual_channels: tuple[int, int, int] = (8, 16, 32), visual_dim: int = 64,
                 separator: Mapping[str, Any] | None = None, encoder: Mapping[str, Any] | None = None,
                 asr_input: Literal["separated", "clean"] = "separated",
                 outputs: Literal["all", "separation", "asr"] = "all",
                 modality_dropout: Mapping[str, float] | None = None, chars: str = CHARS) -> None:
        super().__init__()
        if asr_input not in ("separated", "clean"):
            raise ValueError(f"av_tse_asr: asr_input must be 'separated' or 'clean', got {asr_input!r}")
        if outputs not in ("all", "separation", "asr"):
            raise ValueError(f"av_tse_asr: outputs must be 'all', 'separation' or 'asr', got {outputs!r}")
        if asr_input == "clean" and outputs == "separation":
            raise ValueError("av_tse_asr: asr_input 'clean' runs no separator; outputs 'separation' has nothing to do")
        drop = dict(modality_dropout or {})
        if unknown := set(drop) - {"video", "audio"}:
            raise ValueError(f"av_tse_asr: modality_dropout takes video and audio, got {sorted(unknown)}")
        if not all(0.0 <= p for p in drop.values()) or sum(drop.values()) > 1.0:
            raise ValueError(f"av_tse_asr: modality_dropout shares must be >= 0 and sum to <= 1, got {drop}")
        self.sample_rate, self.video_size, self.video_channels = int(sample_rate), int(video_size), int(video_channels)
        self.asr_input, self.outputs, self.drop = asr_input, outputs, drop
        self.chars = Vocab(chars)
        self.visual = VisualFrontEnd(self.video_size, tuple(visual_channels), visual_dim)  # type: ignore[arg-type]
        self.separator = TFSeparator(sample_rate=self.sample_rate, visual_dim=visual_dim, **dict(separator or {}))
        self.encoder = AVEncoder(sample_rate=self.sample_rate, visual_dim=visual_dim, **dict(encoder or {}))
        self.ctc = nn.Linear(self.encoder.fuse.out_features, len(self.chars))

    @staticmethod
    def reads(args: Mapping[str, Any]) -> tuple[str, ...]:
        """``mix`` and ``video``; with ``asr_input: clean`` the clean target (``s1``) too."""
        return ("mix", "video", "s1") if args.get("asr_input") == "clean" else ("mix", "video")

    def _drop(self) -> Literal["audio", "video"] | None:
        if not self.training or not self.drop:
            return None
        u = float(torch.rand(()))
        video = self.drop.get("video", 0.0)
        if u < video:
            return "video"
        return "audio" if u < video + self.drop.get("audio", 0.0) else None

    def check_video(self, video: Tensor) -> None:
        size = (self.video_size, self.video_size, self.video_channels)
        if tuple(video.shape[2:]) != size:
            raise ValueError(f"video frames are {tuple(video.shape[2:])} (height, width, channels); this model "
                             f"was built for {size}")

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        mix, video = batch["mix"], batch["video"]
        if mix.ndim != 2:
            raise ValueError(f"batch['mix'] must be (batch, samples), got shape {tuple(mix.shape)}")
        self.check_video(video)
        lengths = batch.get("lengths")
        if lengths is None:
            lengths = torch.full((mix.shape[0],), mix.shape[1], dtype=torch.long, device=mix.device)
        vis = self.visual(video, batch.get("video_lengths"))
        out: dict[str, Tensor] = {}
        audio = mix
        if self.asr_input == "clean":
            if "sources" not in batch:
                raise KeyError("av_tse_asr with asr_input 'clean' needs the clean target: a dataset column s1")
            audio = batch["sources"][:, 0]
        else:
            est = self.separator(mix, lengths, vis)
            out["est_sources"] = est[:, None]
            audio = est
        if self.outputs in ("all", "asr"):
            enc, enc_lengths = self.encoder(audio, lengths, vis, self._drop())
            out["asr_ctc"] = F.log_softmax(self.ctc(enc).float(), dim=-1)
            out["enc_lengths"] = enc_lengths
        return out

    @torch.no_grad()
    def extract(self, mix: Tensor, video: Tensor) -> tuple[Tensor, str]:
        """One utterance: mixture (samples,) and uint8 video (frames, H, W, C) -> (target (samples,), transcript)."""
        out = self.forward({"mix": mix[None], "video": video[None]})
        est = out["est_sources"][0, 0] if "est_sources" in out else mix
        text = ""
        if "asr_ctc" in out:
            text = self.chars.greedy(out["asr_ctc"][0, : int(out["enc_lengths"][0])].argmax(-1))
        return est, text
