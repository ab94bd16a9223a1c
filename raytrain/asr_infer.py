"""`raytrain infer` for CTC speech recognition: transcripts, streaming vs full-utterance agreement,
per-chunk latency and real-time factor.

Inputs are audio files or TSV manifests (``id audio ... tgt_text``): with a manifest the
references are known, so CER/WER of both modes are printed too. Streaming runs the Emformer
model chunk by chunk (``CTCASR.stream``: the feature buffer and Emformer's state carried
between chunks) on one thread, as a device would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import torch
import torchaudio.functional as AF

from raytrain.infer import InputError, check_audio, open_audio


@dataclass
class Utterance:
    id: str
    path: str
    reference: str | None = None
    what: str = "input"  # how an error names it: an input file, or a manifest's utterance


@dataclass
class StreamResult:
    full: str
    streamed: str
    chunk_ms: list[float] = field(default_factory=list)  # compute time of each chunk
    audio_s: float = 0.0
    compute_s: float = 0.0


def read_inputs(paths: list[str]) -> list[Utterance]:
    """Audio files as they are; a ``.tsv`` expands to its rows (with ``tgt_text`` as the reference). Every
    audio file's header is checked here, before anything is decoded: InputError (one line naming the file)
    for a manifest or audio file that cannot be used."""
    from datasets_prep.readers.manifests import ReaderError, list_items

    out = []
    for p in paths:
        if p.endswith(".tsv"):
            if not Path(p).is_file():
                raise InputError(f"{p}: manifest not found")
            try:
                items = list_items("tsv", p)
            except ReaderError as exc:  # names the file (and line) and what it expected
                raise InputError(str(exc)) from None
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"{p}: not a UTF-8 TSV manifest ({exc}); give a tab-separated file with a header "
                                 "line (id, audio, tgt_text)") from None
            out += [Utterance(str(it["id"]), str(it["audio"]), str(it.get("text") or "") or None,
                              f"audio of utterance {it['id']} in {p}") for it in items]
        else:
            out.append(Utterance(Path(p).stem, p))
    for u in out:
        check_audio(u.path, u.what)
    return out


def load_audio(path: str, rate: int, what: str = "input") -> torch.Tensor:
    """Mono (a stereo file mixed down) float32 at `rate`; InputError for a file it cannot use."""
    wave, sr = open_audio(Path(path), what)
    x = torch.from_numpy(np.ascontiguousarray(wave.mean(axis=1)))
    return AF.resample(x, sr, rate) if sr != rate else x


@torch.no_grad()
def recognize(model: Any, x: torch.Tensor, chunk_s: float | None) -> StreamResult:
    """Full-utterance transcript and, with ``chunk_s`` (an Emformer model), the streamed one."""
    full = model.transcribe(x[None])[0]
    if chunk_s is None:
        return StreamResult(full, "", audio_s=x.numel() / model.sample_rate)
    step = max(1, int(chunk_s * model.sample_rate))
    stream, times = model.stream(), []
    for i in range(0, x.numel(), step):
        t0 = time.perf_counter()
        stream.push(x[i:i + step])
        times.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    stream.finish()
    times.append((time.perf_counter() - t0) * 1000)
    return StreamResult(full, stream.text(), times, x.numel() / model.sample_rate, sum(times) / 1000)


def run(model: Any, inputs: list[str], chunk_s: float | None, out: Any = print) -> dict[str, Any]:
    """Recognize every input, print one line each and a summary; returns the figures."""
    from raytrain.data.text import Vocab

    norm = Vocab(model.chars.symbols).normalize
    utts = read_inputs(inputs)
    rows, refs = [], []
    for u in utts:
        r = recognize(model, load_audio(u.path, model.sample_rate, u.what), chunk_s)
        rows.append(r)
        refs.append(norm(u.reference) if u.reference else None)
        line = f"{u.id}\t{r.streamed if chunk_s else r.full}"
        if chunk_s and r.streamed != r.full:
            line += f"\t(full utterance: {r.full})"
        out(line)
    figures: dict[str, Any] = {"utterances": len(rows)}
    if chunk_s:
        chunks = [t for r in rows for t in r.chunk_ms]
        figures.update(agreement=float(np.mean([r.streamed == r.full for r in rows])),
                       chunk_s=chunk_s, chunk_ms_median=float(np.median(chunks)),
                       chunk_ms_p95=float(np.percentile(chunks, 95)),
                       rtf=sum(r.compute_s for r in rows) / max(sum(r.audio_s for r in rows), 1e-9))
        out(f"streaming: {figures['agreement']:.1%} of {len(rows)} transcripts equal the full-utterance ones; "
            f"chunks of {chunk_s * 1000:.0f} ms took {figures['chunk_ms_median']:.1f} ms (median, "
            f"p95 {figures['chunk_ms_p95']:.1f} ms); real-time factor {figures['rtf']:.3f}")
    known = [r for r in refs if r]
    if rows and len(known) == len(rows):
        for mode in (["full", "streamed"] if chunk_s else ["full"]):
            hyps = [getattr(r, mode) for r in rows]
            figures[f"cer_{mode}"] = jiwer.cer(known, hyps)
            figures[f"wer_{mode}"] = jiwer.wer(known, hyps)
            out(f"{mode}: CER {figures[f'cer_{mode}']:.3f}, WER {figures[f'wer_{mode}']:.3f} on {len(rows)} references")
    return figures
