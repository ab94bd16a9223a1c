"""Speaker loss for voice conversion: cosine distance of resemblyzer's embedding of the predicted mel to
the target speaker's embedding, differentiable in the mel.

``speaker_cosine`` reads ``outputs["mel"]``: a predicted natural-log mel power spectrogram
(batch, frames, 80) with the recipes' front end (16 kHz, torchaudio ``MelSpectrogram`` defaults: n_fft
1024, 25 ms Hann window, 10 ms hop, HTK mel scale from 0 to 8 kHz, no filter norm, centred frames; the
``+ 1e-6`` floor of ``raytrain.models.vc.LogMel`` is left in: it is ~1e-6 of a speech frame's power),
``outputs["mel_lengths"]`` (batch,), and ``batch["ref_emb"]`` (batch, 256): resemblyzer's embedding of
the target speaker (``raytrain.metrics.voice.speaker_embedding``). The encoder is resemblyzer's
``VoiceEncoder`` (frozen, eval mode, one copy per device and process); nothing of it trains.

resemblyzer's front end is librosa's mel spectrogram of the waveform (slaney scale and norm, n_fft 400,
hop 160, 40 bands, power, not log) after ``preprocess_wav`` (volume raised to -30 dBFS if quieter, long
silences cut by a VAD). ``embedding_from_logmel`` rebuilds it from the 80-band mel:

1. mel power ``exp(mel)`` -> linear STFT power (513 bins) by the pseudo-inverse of the 80-band
   filterbank, clamped at 0; -> the 201 bins of a 400-point FFT (linear interpolation: the same 25 ms
   window, so the same spectrum sampled more coarsely) -> resemblyzer's 40-band slaney filterbank;
2. the volume normalisation: the clip's mean square from the band power (Parseval), the 40 bands
   scaled up to -30 dBFS when it is quieter (differentiable);
3. for the VAD, leading and trailing frames more than 40 dB below the clip's loudest frame are cut
   (chosen without gradient);
4. ``embed_utterance``'s partial windows (160 frames at 1.3 per second, the last zero-padded if it is
   at least 75% covered): each through the encoder (``VoiceEncoder.forward``'s LSTM, linear, ReLU and L2
   norm, with an epsilon so a silent window has a finite gradient), averaged, L2-normalised.

Checked on espeak-ng speech (5 voices x 4 sentences of 1-4 s, each as synthesised and 40 dB quieter):
cosine with ``speaker_embedding`` of the waveform (``preprocess_wav`` + ``embed_utterance``) 0.968-0.9998,
mean 0.993 (0.982-0.9998 on the clips as synthesised; without the edge cut 0.963-0.9998). The whole
utterance through the LSTM at once instead of partial windows gave 0.85-0.95, so partial windows it is.
What is left is where the VAD cuts: the same path on the mel of the VAD-cut waveform scores >= 0.995.
On CUDA the LSTM runs without cuDNN (its RNN backward refuses eval mode); not yet run on a GPU.

``speaker_cosine`` embeds one window per row, the middle 160 frames (1.6 s), not all partial windows:
the encoder's LSTM costs its time in windows (forward and backward on 2 CPU threads: 32 windows 459 ms,
16 windows 226 ms). A 2 s training crop has up to two partial windows (often one once the quiet edges are
cut): vc_flow's phase 1b went from 1.70 to 2.1-2.2 steps a second. On 5 voices
x 4 sentences of 1-4 s (as synthesised and 40 dB quieter), cosine with ``speaker_embedding``: middle window
0.940-0.991, mean 0.961; all windows 0.960-0.9998, mean 0.988.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raytrain.data.columns import reads_keys
from raytrain.metrics.voice import MIN_COVERAGE, PARTIAL_RATE

SAMPLE_RATE = 16000
N_FFT, WIN, HOP, N_MELS = 1024, 400, 160, 80  # the predicted mel's STFT
ENC_N_FFT, ENC_MELS = 400, 40  # resemblyzer's
TARGET_MEAN_SQUARE = 10 ** (-30 / 10)  # preprocess_wav raises the volume to -30 dBFS
EDGE_DB = 40.0  # edge frames this far below the loudest are cut (resemblyzer's VAD stands in)
MAX_LOG_MEL = 30.0  # exp() of a wild prediction stays finite


@functools.cache
def _matrices(device: str) -> tuple[Tensor, Tensor]:
    """(pinv (80, 513): 80-band power -> linear power, to40 (513, 40): linear power -> resemblyzer's bands),
    float32 on ``device``."""
    import torchaudio

    n_bins = N_FFT // 2 + 1
    fb80 = torchaudio.functional.melscale_fbanks(n_bins, 0.0, SAMPLE_RATE / 2, N_MELS, SAMPLE_RATE,
                                                 norm=None, mel_scale="htk").double()  # (513, 80)
    fb40 = torchaudio.functional.melscale_fbanks(ENC_N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, ENC_MELS, SAMPLE_RATE,
                                                 norm="slaney", mel_scale="slaney").double()  # (201, 40)
    pinv = torch.linalg.pinv(fb80)  # (80, 513): x @ pinv maps (.., 80) band power to (.., 513) bins
    pos = np.linspace(0, n_bins - 1, ENC_N_FFT // 2 + 1)  # the 201 bins' frequencies on the 513-bin grid
    interp = np.zeros((ENC_N_FFT // 2 + 1, n_bins))
    lo = np.minimum(np.floor(pos).astype(int), n_bins - 2)
    interp[np.arange(len(pos)), lo] = 1 - (pos - lo)
    interp[np.arange(len(pos)), lo + 1] = pos - lo
    to40 = torch.from_numpy(interp).T @ fb40  # (513, 40)
    return pinv.float().to(device), to40.float().to(device)


# Parseval: the sum over all N_FFT bins of |X|^2 is N_FFT * sum((x * w)^2) ~ N_FFT * sum(w^2) * mean square;
# the HTK triangles sum to 1 at every bin between the first and last centres, so the 80 bands sum to the
# one-sided power (half the two-sided). Within 0.5% of the waveform's mean square on speech.
_MS_PER_BAND_POWER = 2.0 / (N_FFT * float((torch.hann_window(WIN, dtype=torch.float64) ** 2).sum()))


def resemblyzer_mel(mel: Tensor, lengths: Tensor | None = None) -> list[Tensor]:
    """Per row, resemblyzer's 40-band mel (frames', 40) from the 80-band log-mel (batch, frames, 80):
    steps 1-3 of the module docstring (the edges cut, the frames beyond ``lengths`` dropped)."""
    if mel.ndim != 3 or mel.shape[-1] != N_MELS:
        raise ValueError(f"speaker loss: outputs['mel'] must be (batch, frames, {N_MELS}), got {tuple(mel.shape)}")
    pinv, to40 = _matrices(str(mel.device))
    frames = mel.shape[1]
    n = [frames] * mel.shape[0] if lengths is None else [min(int(x), frames) for x in lengths.tolist()]
    power = torch.exp(mel.float().clamp(max=MAX_LOG_MEL))
    linear = (power @ pinv).clamp_min(0.0)  # (batch, frames, 513)
    bands = linear @ to40  # (batch, frames, 40)
    frame_ms = power.sum(-1) * _MS_PER_BAND_POWER  # (batch, frames)
    out = []
    for i, count in enumerate(n):
        count = max(count, 1)
        ms = frame_ms[i, :count].mean()
        gain = (TARGET_MEAN_SQUARE / ms.clamp_min(1e-20)).clamp_min(1.0)
        loud = power[i, :count].detach().sum(-1)
        keep = torch.nonzero(loud > loud.max() * 10 ** (-EDGE_DB / 10)).flatten().tolist() or [0]
        out.append(bands[i, keep[0]: keep[-1] + 1] * gain)
    return out


def encode_partials(rows: list[Tensor], windows: str = "all") -> Tensor:
    """(batch, 256) embeddings of 40-band mels (frames_i, 40) as ``embed_utterance`` makes them: partial
    windows through the frozen encoder, averaged per row, L2-normalised. Differentiable in ``rows``.
    ``windows="middle"``: one window per row, its middle 160 frames (a shorter row zero-padded at the end,
    as ``embed_utterance`` pads), at the cost of one window instead of all of them."""
    from raytrain.metrics.voice import voice_encoder

    if windows not in ("all", "middle"):
        raise ValueError(f"encode_partials: windows must be 'all' or 'middle', got {windows!r}")
    device = rows[0].device
    encoder = voice_encoder(str(device))  # imports resemblyzer (its import warning silenced)
    from resemblyzer import VoiceEncoder
    from resemblyzer.hparams import partials_n_frames
    chunks: list[Tensor] = []
    owner: list[int] = []
    for i, m in enumerate(rows):
        if windows == "middle":
            start = max(0, (m.shape[0] - partials_n_frames) // 2)
            slices = [slice(start, start + partials_n_frames)]
        else:
            _, slices = VoiceEncoder.compute_partial_slices((m.shape[0] - 1) * HOP, PARTIAL_RATE, MIN_COVERAGE)
        stop = slices[-1].stop
        if stop > m.shape[0]:
            m = F.pad(m, (0, 0, 0, stop - m.shape[0]))
        chunks.extend(m[s] for s in slices)
        owner.extend([i] * len(slices))
    x = torch.stack(chunks)  # (windows, 160, 40)
    # cuDNN's RNN backward refuses eval mode; without cuDNN the (dropout-free) LSTM is the same function
    with torch.backends.cudnn.flags(enabled=False):
        _, (hidden, _) = encoder.lstm(x)
    partial = F.normalize(encoder.relu(encoder.linear(hidden[-1])), dim=1, eps=1e-8)
    index = torch.tensor(owner, device=device)
    total = torch.zeros(len(rows), partial.shape[1], device=device, dtype=partial.dtype).index_add(0, index, partial)
    return F.normalize(total, dim=1, eps=1e-8)


def embedding_from_logmel(mel: Tensor, lengths: Tensor | None = None, windows: str = "all") -> Tensor:
    """(batch, 256) resemblyzer embedding of an 80-band natural-log mel power (batch, frames, 80), in
    float32 (autocast off), differentiable in ``mel``; ``windows``: see ``encode_partials``."""
    with torch.autocast(device_type=mel.device.type, enabled=False):
        return encode_partials(resemblyzer_mel(mel, lengths), windows)


@reads_keys("ref_emb")
def speaker_cosine(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """Scalar loss ``mean_b (1 - cos(E(outputs["mel"][b]), batch["ref_emb"][b]))``, in [0, 2] (resemblyzer's
    embeddings are non-negative, so in practice [0, 1]). E hears the middle 1.6 s partial window of each row
    (see the module docstring)."""
    emb = embedding_from_logmel(outputs["mel"], outputs.get("mel_lengths"), windows="middle")
    ref = batch["ref_emb"].to(device=emb.device, dtype=emb.dtype)
    if ref.shape != emb.shape:
        raise ValueError(f"speaker_cosine: batch['ref_emb'] must be {tuple(emb.shape)}, got {tuple(ref.shape)}")
    return (1.0 - F.cosine_similarity(emb, ref, dim=-1, eps=1e-8)).mean()

