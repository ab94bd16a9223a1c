"""A deterministic multi-speaker English corpus spoken by espeak-ng (no downloads needed).

Why: tests, demos and the ``*_tiny`` recipes need many labelled speakers and
transcripts offline. espeak-ng is byte-identical across runs, about 100x faster than
real time, and its base voices (accents) x variants (timbre) x pitch x speed give
hundreds of distinguishable "speakers". Speech is robotic: fine for separation,
speaker labels and pipeline tests, weak for meaningful WER.

Held-out evaluation mirrors wsj0-2mix: ``split_voices`` gives dev speakers whose
variants no train speaker uses, and ``make_sentences`` over disjoint vocabulary
slices gives dev sentences whose words never occur in training.

Layout written by ``generate_corpus``: ``<raw_dir>/<speaker>/<stem>.wav`` (mono PCM16
at the requested rate) + ``<stem>.txt`` (the transcript) + ``<raw_dir>/_corpus.json``
(the parameters, so a changed config does not silently reuse stale files).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import soundfile as sf

from datasets_prep.shards import encode_pcm16

# accents (espeak-ng "language" voices; mbrola voices are excluded: a separate package)
BASES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
# timbres (files in espeak-ng-data/voices/!v); klatt6 and caleb are left out: identical to klatt
VARIANTS = {
    **{v: "M" for v in ("m1 m2 m3 m4 m5 m6 m7 m8 croak klatt klatt2 klatt3 klatt4 klatt5 Andy Storm whisper "
                        "Gene Mike max iven john Lee norbert").split()},
    **{v: "F" for v in "f1 f2 f3 f4 f5 Annie Alicia Andrea belinda linda steph anika whisperf".split()},
}
PITCHES = (40, 60)  # espeak -p (0-99, default 50)
SPEEDS = (150, 175)  # espeak -s words per minute (default 175)
ESPEAK_RATE = 22050
WORDS_FILE = Path(__file__).with_name("_words.txt")
CORPUS_FILE = "_corpus.json"
_MISSING = "espeak-ng not found on PATH: install it: apt-get install espeak-ng, or run `make demo` which installs it"


@dataclass(frozen=True)
class VoiceSpec:
    """One synthetic speaker: accent + timbre + pitch + speed."""

    base: str
    variant: str
    pitch: int
    speed: int

    @property
    def id(self) -> str:  # stable, usable as a folder name, e.g. "en-us+f5_p60_s150"
        return f"{self.base}+{self.variant}_p{self.pitch}_s{self.speed}"

    @property
    def gender(self) -> str:
        return VARIANTS.get(self.variant, "?")

    def espeak_args(self) -> list[str]:
        return ["-v", f"{self.base}+{self.variant}", "-p", str(self.pitch), "-s", str(self.speed)]


Ints = tuple[int, ...] | list[int]


def voice_pool(bases: tuple[str, ...] | list[str] | None = None, pitches: Ints | None = None,
               speeds: Ints | None = None) -> list[VoiceSpec]:
    """All speaker specs, in a fixed order (8 English accents x 37 timbres x 2 pitches x 2 speeds = 1184).

    ``bases``: other espeak-ng languages/accents instead (``espeak-ng --voices`` lists them, e.g.
    ``fr``, ``de``, ``es``, ``cmn``); every timbre variant applies to any language. ``pitches`` (espeak
    ``-p``, 0-99) and ``speeds`` (``-s``, words per minute) widen or narrow the pool.
    """
    return [VoiceSpec(b, v, p, s) for b in (bases or BASES) for v in VARIANTS for p in (pitches or PITCHES)
            for s in (speeds or SPEEDS)]


def _spread(items: list[VoiceSpec], key) -> list[VoiceSpec]:
    """Reorder so each key value appears once before any appears twice (keeps relative order)."""
    seen: dict = {}
    ranked = []
    for pos, it in enumerate(items):
        k = key(it)
        ranked.append((seen.get(k, 0), pos, it))
        seen[k] = seen.get(k, 0) + 1
    return [it for _, _, it in sorted(ranked, key=lambda t: (t[0], t[1]))]


def _diverse(pool: list[VoiceSpec], rng: random.Random) -> list[VoiceSpec]:
    pool = list(pool)
    rng.shuffle(pool)
    pool = _spread(pool, key=lambda v: (v.variant, v.base))  # new accent before a new pitch/speed
    return _spread(pool, key=lambda v: v.variant)  # every timbre before any repeats


def split_voices(n_train: int, n_dev: int, seed: int, dev_variant_fraction: float = 0.2,
                 bases: tuple[str, ...] | list[str] | None = None, pitches: Ints | None = None,
                 speeds: Ints | None = None) -> tuple[list[VoiceSpec], list[VoiceSpec]]:
    """(train, dev) speakers; dev speakers use timbres (variants) that no train speaker uses.

    About ``dev_variant_fraction`` of the variants of each gender are held out for dev.
    Both lists are ordered for diversity: every variant appears before one repeats.
    """
    rng = random.Random(f"split_voices:{seed}")
    held: set[str] = set()
    for g in ("M", "F"):
        names = sorted(v for v, gv in VARIANTS.items() if gv == g)
        rng.shuffle(names)
        held.update(names[: max(1, round(dev_variant_fraction * len(names)))])
    pool = voice_pool(bases, pitches, speeds)
    train_pool = [v for v in pool if v.variant not in held]
    dev_pool = [v for v in pool if v.variant in held]
    if n_train > len(train_pool) or n_dev > len(dev_pool):
        raise ValueError(f"asked for {n_train} train / {n_dev} dev voices, the espeak pool has "
                         f"{len(train_pool)} / {len(dev_pool)} (dev_variant_fraction={dev_variant_fraction})")
    return _diverse(train_pool, rng)[:n_train], _diverse(dev_pool, rng)[:n_dev]


SYSTEM_WORDS = "/usr/share/dict/words"  # Debian's wamerican (installed by `make sysdeps`)
_WORD = re.compile(r"^[a-z]{2,12}$")


@cache
def vocabulary(words: str | None = None, size: int | None = None) -> tuple[str, ...]:
    """The word list in a fixed shuffled order, so any slice mixes frequent and rare words.

    ``words``: a word-list file (one word per line, e.g. ``/usr/share/dict/words``) instead of the
    497 common words shipped with raytrain; only lowercase a-z words of 2-12 letters are kept
    (no names, no possessives), and ``size`` of them are drawn. Many distinct words are what lets
    an ASR model learn to spell words it never heard in training.
    """
    if words is None:
        pool = [w.strip() for w in WORDS_FILE.read_text().splitlines() if w.strip()]
    else:
        path = Path(words)
        if not path.is_file():
            hint = " (install Debian's wamerican: make sysdeps)" if words == SYSTEM_WORDS else ""
            raise FileNotFoundError(f"generator.words: no word list at {words}{hint}")
        pool = sorted({w.strip() for w in path.read_text(encoding="utf-8", errors="replace").splitlines()
                       if _WORD.match(w.strip())})
    random.Random("raytrain-vocabulary").shuffle(pool)
    if size is not None:
        if size > len(pool):
            raise ValueError(f"generator.vocabulary_size={size}: the word list {words or WORDS_FILE.name} has "
                             f"{len(pool)} usable words")
        pool = pool[:size]
    return tuple(pool)


def vocab_split(dev_fraction: float = 0.2) -> tuple[tuple[float, float], tuple[float, float]]:
    """(train_slice, dev_slice) of the vocabulary: disjoint, so dev words never occur in training."""
    return (0.0, 1.0 - dev_fraction), (1.0 - dev_fraction, 1.0)


def make_sentences(n: int, seed: int, vocab_slice: tuple[float, float] = (0.0, 1.0),
                   min_words: int = 4, max_words: int = 10, vocab: tuple[str, ...] | None = None) -> list[str]:
    """``n`` distinct lowercase sentences of 4-10 words drawn from a fraction range of ``vocab``
    (default ``vocabulary()``)."""
    vocab = vocab or vocabulary()
    lo, hi = round(vocab_slice[0] * len(vocab)), round(vocab_slice[1] * len(vocab))
    words = vocab[lo:hi]
    if len(words) < max_words:
        raise ValueError(f"vocab_slice={vocab_slice} keeps {len(words)} words; need at least {max_words}")
    rng = random.Random(f"make_sentences:{seed}:{lo}:{hi}")
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        s = " ".join(rng.sample(words, rng.randint(min_words, max_words)))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


# Spanish spelling is phonemic, so any string of these syllables is read the same way by every
# Spanish voice: pseudo-words that give a second language without a word list.
_ONSETS = ("b", "d", "f", "g", "j", "l", "m", "n", "p", "r", "s", "t", "v", "ch", "ll")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("n", "s", "r")  # no "l": "l" + "ll" would spell a triple l


@cache
def syllable_vocabulary(size: int = 800, exclude: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """``size`` distinct pseudo-Spanish words of 2-3 CV/CVC syllables, in a fixed order (like
    ``vocabulary``: any slice mixes short and long words); words in ``exclude`` (a real word list) never
    occur, so held-out words stay held out across languages."""
    rng = random.Random("raytrain-syllables")
    words: list[str] = []
    seen = set(exclude)
    while len(words) < size:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if rng.random() < 0.3 else "")
                    for _ in range(rng.randint(2, 3)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return tuple(words)


def make_syllable_sentences(n: int, seed: int, vocab_slice: tuple[float, float] = (0.0, 1.0),
                            min_words: int = 4, max_words: int = 10,
                            exclude: frozenset[str] = frozenset()) -> list[str]:
    """``make_sentences`` over ``syllable_vocabulary(exclude=exclude)``: ``vocab_split`` slices of it
    hold syllable-words out for dev as they do English words."""
    return make_sentences(n, seed, vocab_slice, min_words, max_words, vocab=syllable_vocabulary(exclude=exclude))


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(_MISSING)
    return exe


def _check_variants(exe: str, voices: list[VoiceSpec]) -> None:
    """espeak-ng silently ignores an unknown variant; catch it here instead."""
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"Data at:\s*(\S+)", out)
    if not m:
        return
    missing = sorted({v.variant for v in voices if not (Path(m.group(1)) / "voices" / "!v" / v.variant).exists()})
    if missing:
        raise ValueError(f"espeak-ng at {exe} has no voice variants {missing} (looked in {m.group(1)}/voices/!v)")


def resample(wave: np.ndarray, orig: int, new: int) -> np.ndarray:
    """float32 (T,) at ``orig`` Hz -> float32 (ceil(T * new / orig),) at ``new`` Hz (the resample step's)."""
    from datasets_prep.steps.audio import resample_wave

    return resample_wave(wave, orig, new)


PHONEME_MODES = {"mnemonic": "-x", "ipa": "--ipa"}


def phonemize(exe: str, voice: VoiceSpec, text: str, mode: str = "ipa") -> str:
    """The phonemes espeak-ng speaks for ``text`` with ``voice``: its mnemonics (``-x``) or IPA."""
    if mode not in PHONEME_MODES:
        raise ValueError(f"phonemes {mode!r}: use one of {sorted(PHONEME_MODES)}")
    proc = subprocess.run([exe, "-q", PHONEME_MODES[mode], *voice.espeak_args(), text], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"espeak-ng {PHONEME_MODES[mode]} failed for {text!r}: {proc.stderr.strip()}")
    return " ".join(proc.stdout.split())


def _synthesize(exe: str, voice: VoiceSpec, text: str, wav: Path, sample_rate: int,
                phonemes: str | None = None) -> None:
    """espeak-ng -> resample -> PCM16 wav, written via temp + rename (the wav marks the utterance done);
    the transcript goes to ``<stem>.txt`` and, with ``phonemes``, the phonemes to ``<stem>.phn``."""
    raw = wav.with_name(f".{wav.stem}.espeak.tmp")
    proc = subprocess.run([exe, *voice.espeak_args(), "-w", str(raw), text], capture_output=True, text=True)
    if proc.returncode != 0 or not raw.exists():
        raise RuntimeError(f"espeak-ng failed for {wav} (voice {voice.id}): rc={proc.returncode} {proc.stderr.strip()}")
    wave, sr = sf.read(str(raw), dtype="float32", always_2d=True)
    raw.unlink()
    if wave.shape[0] == 0:
        raise RuntimeError(f"espeak-ng produced no audio for {wav} (voice {voice.id}, text {text!r})")
    pcm = np.frombuffer(encode_pcm16(resample(wave[:, 0].copy(), sr, sample_rate)), dtype="<i2")
    txt = wav.with_suffix(".txt")
    tmp_txt = txt.with_name(f".{txt.name}.tmp")
    tmp_txt.write_text(text + "\n")
    os.replace(tmp_txt, txt)
    if phonemes:
        phn = wav.with_suffix(".phn")
        tmp_phn = phn.with_name(f".{phn.name}.tmp")
        tmp_phn.write_text(phonemize(exe, voice, text, phonemes) + "\n", encoding="utf-8")
        os.replace(tmp_phn, phn)
    tmp = wav.with_name(f".{wav.name}.tmp")
    sf.write(str(tmp), pcm, sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, wav)


def _sync_params(raw_dir: Path, params: dict) -> None:
    """Write ``_corpus.json``; if an older corpus with other parameters is there, delete its files."""
    path = raw_dir / CORPUS_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if old == params:
            return
        removed = 0
        for spk in old.get("voices", []):
            d = raw_dir / spk
            for f in list(d.glob("*.wav")) + list(d.glob("*.txt")) + list(d.glob("*.phn")) + list(d.glob(".*.tmp")):
                f.unlink()
                removed += 1
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        print(f"[espeak] {raw_dir}: parameters changed, removed {removed} old files", file=sys.stderr)
    raw_dir.mkdir(parents=True, exist_ok=True)
    tmp = raw_dir / f".{CORPUS_FILE}.tmp"
    tmp.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp, path)


def generate_corpus(raw_dir: str | os.PathLike, voices: list[VoiceSpec], sentences_per_voice: int,
                    sentences: list[str], sample_rate: int, seed: int, workers: int = 2,
                    phonemes: str | None = None) -> dict:
    """Speak a seeded subset of ``sentences`` with every voice; skip utterances already on disk.

    Utterance stems are ``s<sentence index>`` (e.g. ``s00042``), so the same sentence read by
    two speakers shares a stem. Returns {"utterances", "generated", "skipped", "seconds"}.
    """
    t0 = time.perf_counter()
    raw_dir = Path(raw_dir)
    if sentences_per_voice > len(sentences):
        raise ValueError(f"sentences_per_voice={sentences_per_voice} > {len(sentences)} sentences available")
    exe = _espeak()
    _check_variants(exe, voices)
    params = {"voices": [v.id for v in voices], "sentences_per_voice": sentences_per_voice, "seed": seed,
              "sample_rate": sample_rate,
              "sentences_sha256": hashlib.sha256("\n".join(sentences).encode()).hexdigest()}
    if phonemes:
        params["phonemes"] = phonemes
    _sync_params(raw_dir, params)
    jobs = []
    for voice in voices:
        d = raw_dir / voice.id
        d.mkdir(parents=True, exist_ok=True)
        for leftover in d.glob(".*.tmp"):
            leftover.unlink()
        rng = random.Random(f"corpus:{seed}:{voice.id}")
        for i in sorted(rng.sample(range(len(sentences)), sentences_per_voice)):
            wav = d / f"s{i:05d}.wav"
            if not wav.exists():
                jobs.append((voice, sentences[i], wav))
    total = len(voices) * sentences_per_voice
    from tqdm import tqdm

    with tqdm(total=len(jobs), desc=f"espeak-ng {raw_dir.name}", unit="utt", disable=not sys.stderr.isatty()) as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        futures = [ex.submit(_synthesize, exe, v, text, wav, sample_rate, phonemes) for v, text, wav in jobs]
        try:
            for fut in as_completed(futures):
                fut.result()
                bar.update(1)
        except BaseException:
            ex.shutdown(wait=True, cancel_futures=True)
            raise
    return {"utterances": total, "generated": len(jobs), "skipped": total - len(jobs),
            "seconds": round(time.perf_counter() - t0, 2)}
