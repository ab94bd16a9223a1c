"""CTC speech recognition with a swappable encoder: Conformer (full context) or Emformer (streaming).

``CTCASR`` maps ``batch["audio"]`` (batch, samples) at ``sample_rate`` to log-probabilities of
two CTC heads: characters (``asr_ctc``) and phonemes (``phone_ctc``). Parameter names are
stable across encoders, so a checkpoint's heads load into a model with the other encoder:

- ``frontend``: log-mel (25 ms windows, 10 ms hop, no centring, so a stream of chunks gives
  exactly the frames of the whole utterance); no parameters; SpecAugment masks in training;
- ``encoder.input``: ``stack`` consecutive frames stacked (4: 40 ms per encoder frame),
  LayerNorm, Linear to ``d_model``; with the Emformer, ``encoder.causal``: a residual causal
  depthwise convolution (``causal_kernel`` frames, default 7) that gives the Emformer the frame
  order it otherwise lacks; ``encoder.body``: ``torchaudio.models.Conformer`` or
  ``torchaudio.models.Emformer``;
- ``asr_ctc``, ``phone_ctc``: Linear ``d_model`` -> vocabulary + blank.

Streaming (Emformer only): ``stream()`` gives a ``Streamer`` that takes audio in pieces and
returns the new frames' log-probabilities, carrying the feature buffer, the convolution's past
frames and Emformer's state, so ``Streamer`` over chunks equals ``forward`` over the whole
utterance (tested to 1e-4).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from raytrain.data.text import CHARS, PHONES, Vocab


class LogMel(nn.Module):
    """(batch, samples) -> (batch, frames, n_mels) natural-log mel power; frames = 1 + (T - win) // hop."""

    window: Tensor
    fb: Tensor

    def __init__(self, sample_rate: int, n_mels: int = 80, win_ms: float = 25.0, hop_ms: float = 10.0) -> None:
        super().__init__()
        self.win, self.hop = int(sample_rate * win_ms / 1000), int(sample_rate * hop_ms / 1000)
        self.n_fft = self.win  # frames span exactly the window, so chunks need no extra context
        with torch.device("cpu"):  # real values even when the model is built on `meta` (raytrain plan)
            window = torch.hann_window(self.win)
            fb = torchaudio.functional.melscale_fbanks(self.n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate)
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("fb", fb, persistent=False)  # (freqs, n_mels)

    def frames(self, samples: Tensor) -> Tensor:
        """Frame counts (any shape of sample counts)."""
        return torch.clamp(torch.div(samples - self.win, self.hop, rounding_mode="floor") + 1, min=0)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] < self.win:
            return x.new_zeros(x.shape[0], 0, self.fb.shape[1])
        spec = torch.stft(x.float(), self.n_fft, self.hop, self.win, self.window, center=False,
                          return_complex=True)  # (batch, freqs, frames)
        power = spec.real.square() + spec.imag.square()
        return torch.log(torch.matmul(power.transpose(1, 2), self.fb) + 1e-6)


class SpecAugment(nn.Module):
    """Frequency and time masks on (batch, frames, n_mels), drawn per example, training only."""

    def __init__(self, freq_masks: int = 2, freq_width: int = 15, time_masks: int = 2, time_width: int = 20) -> None:
        super().__init__()
        self.freq = [torchaudio.transforms.FrequencyMasking(freq_width, iid_masks=True)] * freq_masks if freq_width else []
        self.time = [torchaudio.transforms.TimeMasking(time_width, iid_masks=True)] * time_masks if time_width else []

    def forward(self, feats: Tensor) -> Tensor:
        if not self.training or not (self.freq or self.time):
            return feats
        x = feats.transpose(1, 2).unsqueeze(1)  # (batch, 1, n_mels, frames)
        for m in [*self.freq, *self.time]:
            x = m(x)
        return x.squeeze(1).transpose(1, 2)


class CausalConv(nn.Module):
    """Residual depthwise convolution over past frames only: (batch, frames, d) -> same shape.

    torchaudio's Emformer has no positional encoding and no convolution, so inside a segment its
    attention sees the frames as an unordered set; this gives each frame the order of the
    ``kernel - 1`` frames before it without adding look-ahead. ``forward(x, past)`` takes the
    previous call's last ``kernel - 1`` input frames (zeros at the start) and returns them for
    the next call, so chunk-by-chunk equals whole-sequence.
    """

    def __init__(self, d_model: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.norm = nn.LayerNorm(d_model)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel, groups=d_model)
        self.pointwise = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, past: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if past is None:
            past = x.new_zeros(x.shape[0], self.kernel - 1, x.shape[2])
        full = torch.cat([past, x], dim=1)  # (batch, kernel - 1 + frames, d)
        h = self.depthwise(self.norm(full).transpose(1, 2)).transpose(1, 2)  # (batch, frames, d)
        return x + self.pointwise(F.gelu(h)), full[:, full.shape[1] - (self.kernel - 1):]


class Encoder(nn.Module):
    """Stacked log-mel frames -> (batch, frames // stack, d_model) with a Conformer or an Emformer."""

    def __init__(self, kind: Literal["conformer", "emformer"], n_mels: int, stack: int, d_model: int,
                 num_heads: int, ffn_dim: int, num_layers: int, dropout: float, conv_kernel: int,
                 segment_length: int, left_context_length: int, right_context_length: int,
                 causal_kernel: int = 0) -> None:
        super().__init__()
        self.kind, self.stack = kind, stack
        self.input = nn.Sequential(nn.LayerNorm(n_mels * stack), nn.Linear(n_mels * stack, d_model))
        self.causal = CausalConv(d_model, causal_kernel) if causal_kernel > 1 else None
        self.right = right_context_length if kind == "emformer" else 0
        self.segment = segment_length
        self.body: nn.Module
        if kind == "conformer":
            self.body = torchaudio.models.Conformer(input_dim=d_model, num_heads=num_heads, ffn_dim=ffn_dim,
                                                    num_layers=num_layers, depthwise_conv_kernel_size=conv_kernel,
                                                    dropout=dropout)
        elif kind == "emformer":
            self.body = torchaudio.models.Emformer(input_dim=d_model, num_heads=num_heads, ffn_dim=ffn_dim,
                                                   num_layers=num_layers, segment_length=segment_length,
                                                   dropout=dropout, left_context_length=left_context_length,
                                                   right_context_length=right_context_length)
        else:
            raise ValueError(f"encoder {kind!r}: use 'conformer' or 'emformer'")

    def project(self, feats: Tensor, past: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(batch, frames, n_mels) -> (batch, frames // stack, d_model); leftover frames are dropped.
        ``past``/the second output: the causal convolution's carried frames (None without one)."""
        b, t, m = feats.shape
        t = t - t % self.stack
        x = self.input(feats[:, :t].reshape(b, t // self.stack, m * self.stack))
        return self.causal(x, past) if self.causal is not None else (x, None)

    def forward(self, feats: Tensor, frame_lengths: Tensor) -> tuple[Tensor, Tensor]:
        x, _ = self.project(feats)
        lengths = torch.clamp(torch.div(frame_lengths, self.stack, rounding_mode="floor"), max=x.shape[1])
        if self.kind == "emformer":
            # Zeros to a whole number of segments, then the last segment's right context: exactly what a
            # stream sees at its end (Streamer.finish), so streamed and full-utterance outputs are equal.
            t = x.shape[1]
            out, out_lengths = self.body(F.pad(x, (0, 0, 0, (-t) % self.segment + self.right)), lengths)
            return out[:, :t], out_lengths
        return self.body(x, lengths)


class CTCASR(nn.Module):
    """Log-mel -> Conformer/Emformer -> character and phoneme CTC heads.

    ``forward(batch)`` reads ``audio`` (batch, samples) and ``lengths`` (batch,), returns
    ``asr_ctc`` and ``phone_ctc`` log-probabilities (batch, frames, classes) and ``enc_lengths``.
    """

    reads: ClassVar[tuple[str, ...]] = ("audio",)  # the batch keys forward reads (raytrain.data.columns)

    def __init__(self, *, sample_rate: int = 16000, encoder: Literal["conformer", "emformer"] = "conformer",
                 n_mels: int = 80, stack: int = 4, d_model: int = 144, num_heads: int = 4, ffn_dim: int = 576,
                 num_layers: int = 4, dropout: float = 0.1, conv_kernel: int = 15, segment_length: int = 16,
                 left_context_length: int = 32, right_context_length: int = 4, chars: str = CHARS,
                 phones: str = PHONES, spec_augment: dict[str, int] | None = None,
                 causal_kernel: int | None = None) -> None:
        super().__init__()
        self.sample_rate = int(sample_rate)
        self.chars, self.phones = Vocab(chars), Vocab(phones, lowercase=False)
        self.frontend = LogMel(sample_rate, n_mels)
        self.spec_augment = SpecAugment(**(spec_augment if spec_augment is not None else {}))
        self.encoder = Encoder(encoder, n_mels, stack, d_model, num_heads, ffn_dim, num_layers, dropout,
                               conv_kernel, segment_length, left_context_length, right_context_length,
                               (7 if encoder == "emformer" else 0) if causal_kernel is None else causal_kernel)
        self.asr_ctc = nn.Linear(d_model, len(self.chars))
        self.phone_ctc = nn.Linear(d_model, len(self.phones))

    def encode(self, audio: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(batch, samples) -> encoder output (batch, frames, d_model) and its lengths (batch,)."""
        if lengths is None:
            lengths = torch.full((audio.shape[0],), audio.shape[-1], dtype=torch.long, device=audio.device)
        feats = self.spec_augment(self.frontend(audio))
        return self.encoder(feats, self.frontend.frames(lengths))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        enc, enc_lengths = self.encode(batch["audio"], batch.get("lengths"))
        return {"asr_ctc": F.log_softmax(self.asr_ctc(enc).float(), dim=-1),
                "phone_ctc": F.log_softmax(self.phone_ctc(enc).float(), dim=-1), "enc_lengths": enc_lengths}

    @torch.no_grad()
    def transcribe(self, audio: Tensor, lengths: Tensor | None = None) -> list[str]:
        """Greedy character transcripts of a batch (full utterances)."""
        out = self.forward({"audio": audio} if lengths is None else {"audio": audio, "lengths": lengths})
        best = out["asr_ctc"].argmax(-1)
        return [self.chars.greedy(best[i, : int(n)]) for i, n in enumerate(out["enc_lengths"])]

    def stream(self) -> Streamer:
        if self.encoder.kind != "emformer":
            raise ValueError("streaming needs the Emformer encoder (model args: encoder: emformer); "
                             "the Conformer attends to the whole utterance")
        return Streamer(self)


class Streamer:
    """Chunk-by-chunk recognition of one utterance with an Emformer ``CTCASR`` (eval mode).

    ``push(samples)`` buffers audio and runs the encoder on every complete segment (segment +
    right-context frames available); ``finish()`` pads the right context with zeros and flushes.
    Both return the new frames' character log-probabilities (frames, classes); ``text()`` is the
    greedy transcript of everything so far. Encoder latency: one segment plus its right context.
    """

    def __init__(self, model: CTCASR) -> None:
        self.m, self.enc = model, model.encoder
        self.audio = torch.zeros(0)
        self.feats = torch.zeros(0, int(model.frontend.fb.shape[1]))  # mel frames not yet stacked
        self.proj = torch.zeros(0, model.asr_ctc.in_features)  # projected frames not yet encoded
        self.states: Any = None
        self.past: Tensor | None = None  # the causal convolution's last input frames
        self.best: list[Tensor] = []

    @torch.no_grad()
    def push(self, samples: Tensor) -> Tensor:
        fe = self.m.frontend
        self.audio = torch.cat([self.audio, samples.float().reshape(-1)])
        n = int(fe.frames(torch.tensor(self.audio.numel())))
        if n:
            self.feats = torch.cat([self.feats, fe(self.audio[None, : (n - 1) * fe.hop + fe.win])[0]])
            self.audio = self.audio[n * fe.hop:]
        k = self.feats.shape[0] - self.feats.shape[0] % self.enc.stack
        if k:
            new, self.past = self.enc.project(self.feats[None, :k], self.past)
            self.proj = torch.cat([self.proj, new[0]])
            self.feats = self.feats[k:]
        return self._run(final=False)

    @torch.no_grad()
    def finish(self) -> Tensor:
        return self._run(final=True)

    def _run(self, final: bool) -> Tensor:
        seg, right = self.enc.segment, self.enc.right
        outs = []
        while self.proj.shape[0] >= seg + right or (final and self.proj.shape[0] > 0):
            valid = min(seg, self.proj.shape[0])
            chunk = F.pad(self.proj[: seg + right], (0, 0, 0, seg + right - min(seg + right, self.proj.shape[0])))
            # infer's lengths count the right context too; zeros past `valid` (the end) are masked
            infer: Any = self.enc.body.infer
            out, lengths, self.states = infer(chunk[None], torch.tensor([valid + right]), self.states)
            outs.append(out[0, : int(lengths[0])])
            self.proj = self.proj[valid:]
        if not outs:
            return torch.zeros(0, len(self.m.chars))
        logp = F.log_softmax(self.m.asr_ctc(torch.cat(outs)), dim=-1)
        self.best.append(logp.argmax(-1))
        return logp

    def text(self) -> str:
        return self.m.chars.greedy(torch.cat(self.best)) if self.best else ""
