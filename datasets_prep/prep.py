"""``raytrain prep CONFIG``: a corpus -> shard datasets, as one YAML-driven, restartable step.

A prep YAML names its source in one of two ways:

- ``input: {format, path}``: a corpus the user has (``speaker-dirs``, ``jsonl``, ``tsv``,
  ``wsj0-2mix``; see ``datasets_prep.readers.manifests``), run through ``steps`` and, with
  ``splits``, cut into one dataset folder per split under ``output_dir`` (else ``output_dir``
  is the dataset);
- ``generator: {kind: espeak, ...}``: a synthetic corpus, by ``layout``: ``separation`` writes
  ``train`` (train voices reading train sentences), ``dev_speech`` (held-out voices reading held-out
  sentences) and ``dev`` (fixed 2-speaker mixtures made only from ``dev_speech``); ``asr`` writes
  train/dev/test sets; ``vc`` writes parallel speech corpora, their parallel pairs and dev triples
  (``datasets_prep.vc``); ``songs`` writes songs sung by espeak voices over an accompaniment, one
  JSONL corpus per language (``datasets_prep.sung``), prepared like a JSONL input and split by singer;
  ``av`` writes per corpus speech of train and held-out voices and audio-visual target-speaker mixtures
  made from each (``datasets_prep.av``).

Either way the shards are written by the Ray Data executor (``datasets_prep.execute``) on
``workers`` tasks: bad files become rows of ``_rejects.parquet``, finished shards are not
rewritten, and the manifest records every step's parameters. A generator split whose manifest
already records the same parameters is skipped entirely (raw utterances are not re-synthesised).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import time
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import pyarrow.parquet as pq
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from datasets_prep.av import av_params, read_utterances, select_dev, select_train, write_av_mixtures
from datasets_prep.execute import prepare_items
from datasets_prep.mixtures import mixture_params, write_fixed_mixtures
from datasets_prep.readers.espeak import (
    VoiceSpec,
    generate_corpus,
    make_sentences,
    make_syllable_sentences,
    split_voices,
    syllable_vocabulary,
    vocab_split,
    vocabulary,
)
from datasets_prep.readers.manifests import list_items, with_audio_columns
from datasets_prep.shards import MANIFEST_NAME, decode_audio, read_manifest, shard_paths
from datasets_prep.splits import parse_ratios, split_items
from datasets_prep.steps.audio import CUTTING_STEPS, STEPS
from datasets_prep.storage import is_uri, join, upload_dataset
from datasets_prep.sung import PITCH_RANGE, choose_singers, song_params, write_sung_corpus
from datasets_prep.vc import (
    Speech,
    Triple,
    pair_params,
    possible_triples,
    read_speech,
    select_self_triples,
    select_triples,
    shards_sha256,
    triple_params,
    write_pairs,
    write_triples,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_words(key: str, words: tuple[int, int] | None) -> None:
    if words and not 1 <= words[0] <= words[1]:
        raise ValueError(f"{key}={list(words)}: give [min, max] with 1 <= min <= max")


class VcCorpus(_Strict):
    """One speech corpus of ``layout: vc``: its voices read a small sentence pool, so that most sentences
    are read by several voices (what makes parallel pairs)."""

    language: list[str] | None = Field(default=None, min_length=1)  # espeak-ng languages/accents (None: 8 English)
    voices: int = Field(ge=2)
    sentences: int = Field(ge=1)  # sentence pool
    utterances_per_voice: int = Field(ge=2)  # distinct sentences each voice reads (>= 2: one is a reference)
    text: Literal["words", "syllables"] = "words"  # syllables: pseudo-Spanish words (make_syllable_sentences)
    pitches: list[int] | None = Field(default=None, min_length=1)  # espeak -p values (None: espeak.PITCHES)
    speeds: list[int] | None = Field(default=None, min_length=1)  # espeak -s values (None: espeak.SPEEDS)
    train_words: tuple[int, int] | None = None  # (min, max) words of a sentence (None: 4-10)

    @model_validator(mode="after")
    def _fits(self) -> VcCorpus:
        if self.utterances_per_voice > self.sentences:
            raise ValueError(f"utterances_per_voice={self.utterances_per_voice} exceeds sentences ({self.sentences}): "
                             "each voice reads distinct sentences")
        if self.pitches and not all(0 <= p <= 99 for p in self.pitches):
            raise ValueError(f"pitches={self.pitches}: espeak-ng pitches are 0-99")
        _check_words("train_words", self.train_words)
        return self

    def lengths(self) -> dict[str, int]:
        return dict(zip(("min_words", "max_words"), self.train_words, strict=True)) if self.train_words else {}


class SongCorpus(_Strict):
    """One corpus of ``layout: songs``: ``songs`` songs, sung by its ``singers`` in turn (``datasets_prep.sung``)."""

    language: list[str] | None = Field(default=None, min_length=1)  # espeak-ng languages/accents (None: 8 English)
    singers: int = Field(ge=2)  # >= 2: the split by singer puts some of them in dev only
    songs: int = Field(ge=2)
    text: Literal["words", "syllables"] = "words"  # syllables: pseudo-Spanish words (syllable_vocabulary)
    # espeak -p of each singer's root note (the melody rises an octave, about 60 units, above it; None: 30, 40)
    # and -s it sings at 120 bpm (scaled with each song's tempo; None: 160, 190)
    pitches: list[int] | None = Field(default=None, min_length=1)
    speeds: list[int] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _fits(self) -> SongCorpus:
        if self.songs < self.singers:
            raise ValueError(f"songs={self.songs} is fewer than singers={self.singers}: every singer sings at least one "
                             "song; raise songs or lower singers")
        if self.pitches and not all(PITCH_RANGE[0] <= p <= 40 for p in self.pitches):
            raise ValueError(f"pitches={self.pitches}: give {PITCH_RANGE[0]}-40 (the melody rises about 60 units of -p "
                             f"above a singer's pitch, and espeak-ng's -p ends at {PITCH_RANGE[1]})")
        if self.speeds and not all(80 <= s <= 450 for s in self.speeds):
            raise ValueError(f"speeds={self.speeds}: espeak-ng sings words at -s 80-450 words per minute")
        return self


def _check_range(key: str, value: tuple[float, float] | None, lo: float | None = None, hi: float | None = None,
                 unit: str = "") -> None:
    """A [min, max] range: min <= max, both within [lo, hi] where given; else a one-line error naming ``key``."""
    if value is None:
        return
    a, b = value
    if a > b or (lo is not None and a < lo) or (hi is not None and b > hi):
        bounds = " <= ".join(["min" if lo is None else f"{lo:g} <= min", "max" if hi is None else f"max <= {hi:g}"])
        raise ValueError(f"{key}={[a, b]}: give [min, max]{unit} with {bounds}")


class AvCorpus(_Strict):
    """One corpus of ``layout: av`` (``datasets_prep.av``): ``speech_train/`` (its train voices reading train
    sentences), ``speech_dev/`` (its dev voices, of timbres no train voice of any corpus uses, reading sentences of
    held-out words), ``train/`` (every train utterance the target of ``mixtures_per_utterance`` mixtures) and
    ``dev/`` (``dev_mixtures`` fixed mixtures of dev utterances)."""

    language: list[str] | None = Field(default=None, min_length=1)  # espeak-ng languages/accents (None: 8 English)
    train_voices: int = Field(ge=2)
    dev_voices: int = Field(ge=2)
    train_sentences: int = Field(ge=1)  # sentence pools
    dev_sentences: int = Field(ge=1)
    utterances_per_voice: int = Field(ge=1)  # distinct sentences each train voice reads
    dev_utterances_per_voice: int = Field(ge=1)  # ... each dev voice reads
    mixtures_per_utterance: int = Field(ge=1)  # train/: mixtures each train utterance is the target of
    dev_mixtures: int = Field(ge=1)  # dev/: fixed mixtures drawn from the dev utterances
    snr_db: tuple[float, float] = (-2.5, 2.5)  # target over interferer, dB, drawn per mixture
    overlap: tuple[float, float] = (0.5, 1.0)  # share of the target's span the interferer covers, drawn
    noise_snr_db: tuple[float, float] | None = None  # pink noise this many dB below the target (None: no noise)
    pitches: list[int] | None = Field(default=None, min_length=1)  # espeak -p values (None: espeak.PITCHES)
    speeds: list[int] | None = Field(default=None, min_length=1)  # espeak -s values (None: espeak.SPEEDS)
    train_words: tuple[int, int] | None = None  # (min, max) words of a sentence (None: 4-10)
    dev_words: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _fits(self) -> AvCorpus:
        _check_range("overlap", self.overlap, 0.0, 1.0, " shares of the target's span")
        _check_range("snr_db", self.snr_db, unit=" dB of the target over the interferer")
        _check_range("noise_snr_db", self.noise_snr_db, unit=" dB of the target over the noise")
        if self.pitches and not all(0 <= p <= 99 for p in self.pitches):
            raise ValueError(f"pitches={self.pitches}: espeak-ng pitches are 0-99")
        _check_words("train_words", self.train_words)
        _check_words("dev_words", self.dev_words)
        for key, per, pool, pool_key in (
                ("utterances_per_voice", self.utterances_per_voice, self.train_sentences, "train_sentences"),
                ("dev_utterances_per_voice", self.dev_utterances_per_voice, self.dev_sentences, "dev_sentences")):
            if per > pool:
                raise ValueError(f"{key}={per} exceeds {pool_key} ({pool}): each voice reads distinct sentences; "
                                 f"lower it or raise {pool_key}")
        # a target's sure interferers: the utterances of every other voice but the one of its own sentence
        sure = (self.train_voices - 1) * (self.utterances_per_voice - 1)
        if self.mixtures_per_utterance > sure:
            raise ValueError(f"mixtures_per_utterance={self.mixtures_per_utterance} exceeds the {sure} interferers "
                             "every target is sure to have ((train_voices - 1) x (utterances_per_voice - 1): other "
                             "voices reading other sentences); lower it or raise train_voices/utterances_per_voice")
        pairs = self.dev_voices * (self.dev_voices - 1) * self.dev_utterances_per_voice * (
            self.dev_utterances_per_voice - 1)
        if self.dev_mixtures > pairs:
            raise ValueError(f"dev_mixtures={self.dev_mixtures} exceeds the {pairs} distinct (target, interferer) "
                             "pairs the dev voices are sure to give (dev_voices x (dev_voices - 1) x "
                             "dev_utterances_per_voice x (dev_utterances_per_voice - 1)); lower dev_mixtures or raise "
                             "dev_voices/dev_utterances_per_voice")
        return self

    def lengths(self, split: str) -> dict[str, int]:
        words = self.train_words if split == "train" else self.dev_words
        return dict(zip(("min_words", "max_words"), words, strict=True)) if words else {}


class AvVideo(_Strict):
    """The lip video of ``layout: av`` (``datasets_prep.av.render_lips``)."""

    size: int = Field(default=24, ge=8, le=128)  # frames are size x size pixels, grey
    fps: int = Field(default=25, ge=1, le=100)
    lag: tuple[int, int] = (-1, 2)  # frames the mouth lags the audio by (negative: leads), drawn per mixture
    pixel_noise: float = Field(default=8.0, ge=0, le=64)  # Gaussian noise of the frames, grey levels

    @model_validator(mode="after")
    def _lag(self) -> AvVideo:
        _check_range("lag", self.lag, -self.fps, self.fps, " frames")
        return self


_AV_CORPUS_KEYS = ("train_voices", "mixtures_per_utterance", "dev_mixtures")


def _corpus_kind(value: Any) -> str:
    """``songs`` for a corpus with song keys (``singers``, ``songs``), ``av`` for one with av keys
    (``train_voices``, ``mixtures_per_utterance``, ``dev_mixtures``), else ``vc``."""
    if isinstance(value, dict):
        keys = set(value)
        return "songs" if {"singers", "songs"} & keys else "av" if set(_AV_CORPUS_KEYS) & keys else "vc"
    return "songs" if isinstance(value, SongCorpus) else "av" if isinstance(value, AvCorpus) else "vc"


_CORPUS_TAGS = ("vc", "songs", "av")
Corpus = Annotated[Annotated[VcCorpus, Tag("vc")] | Annotated[SongCorpus, Tag("songs")]
                   | Annotated[AvCorpus, Tag("av")], Discriminator(_corpus_kind)]


class DevRooms(_Strict):
    """The rooms of ``dev_reverb/`` (layout vc): keep them outside the training augmentation's ranges
    (``room_reverb``'s defaults: RT60 0.15-0.45 s, rooms up to 7 x 6 x 3.2 m), so dev measures robustness
    to rooms the model never heard."""

    rt60: tuple[float, float] = (0.5, 0.8)  # seconds, drawn per row
    room_size: tuple[tuple[float, float], tuple[float, float], tuple[float, float]] = (
        (7.5, 12.0), (6.5, 10.0), (3.3, 4.5))  # [min, max] metres of x, y, z
    seed: int = 2

    @model_validator(mode="after")
    def _ranges(self) -> DevRooms:
        for key, (lo, hi) in [("rt60", self.rt60), *(("room_size", r) for r in self.room_size)]:
            if not 0 < lo <= hi:
                raise ValueError(f"{key}: give [min, max] with 0 < min <= max, got {[lo, hi]}")
        if min(lo for lo, _ in self.room_size) < 1.5:
            raise ValueError("room_size: every side needs at least 1.5 m (source and microphone stay 0.5 m "
                             "from the walls)")
        return self


_FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VC_RESERVED = ("dev", "dev_speech", "dev_reverb", "dev_self")
_VC_KEYS = ("corpora", "pairs_per_sentence", "self_pairs", "dev_triples", "dev_words", "dev_rooms",
            "reference_utterances", "dev_self_triples")
_SONG_KEYS = ("duration_sec", "prompt_sec", "tempo")
_AV_KEYS = ("video",)


class EspeakGenerator(_Strict):
    """A synthetic corpus spoken by espeak-ng (see ``datasets_prep.readers.espeak``)."""

    kind: Literal["espeak"] = "espeak"
    seed: int = 0
    train_voices: int = Field(default=56, ge=2)
    dev_voices: int = Field(default=8, ge=2)
    train_sentences: int = Field(default=600, ge=1)
    dev_sentences: int = Field(default=60, ge=1)
    utterances_per_voice: int = Field(default=24, ge=1)
    dev_vocab_fraction: float = Field(default=0.2, gt=0, lt=1)  # share of words that only dev sentences use
    dev_variant_fraction: float = Field(default=0.2, gt=0, lt=1)  # share of espeak timbres only dev voices use
    workers: int = Field(default=2, ge=1)  # parallel espeak-ng processes; does not change the output
    language: list[str] | None = None  # espeak-ng languages/accents for the voices (default: 8 English accents)
    phonemes: Literal["mnemonic", "ipa"] | None = None  # also write <utt>.phn (espeak-ng -x / --ipa)
    # separation: train/, dev_speech/ (held-out voices and words), dev/ (fixed mixtures of dev_speech).
    # asr: train/, dev/ and test/ spoken by the train voices; dev and test sentences use words no train
    # sentence uses (half of the held-out vocabulary each); test/ is prepared from a TSV manifest.
    # vc: <corpus>/speech/ and <corpus>/pairs/ for each of `corpora`, dev_speech/ (held-out voices reading
    # held-out sentences, every voice all `dev_sentences`), dev/ and dev_reverb/ (fixed triples); see
    # datasets_prep.vc.
    # songs: <corpus>/train/ and <corpus>/dev/ (splits: by singer) of each of `corpora` (SongCorpus): songs
    # sung by espeak voices with their prompts; see datasets_prep.sung.
    # av: <corpus>/speech_train/, <corpus>/speech_dev/, <corpus>/train/ and <corpus>/dev/ of each of `corpora`
    # (AvCorpus): target-speaker mixtures with a lip video of the target; see datasets_prep.av.
    layout: Literal["separation", "asr", "vc", "songs", "av"] = "separation"
    test_sentences: int = Field(default=60, ge=1)  # asr: sentence pool of test/
    eval_utterances_per_voice: int = Field(default=4, ge=1)  # asr: sentences each voice reads in dev/ and test/
    # A word-list file (e.g. /usr/share/dict/words) instead of the 497 shipped words, and how many to draw.
    words: str | None = None
    vocabulary_size: int | None = Field(default=None, ge=20)
    # Voice pool and sentence length (None: espeak.PITCHES, espeak.SPEEDS, 4-10 words).
    pitches: list[int] | None = Field(default=None, min_length=1)  # espeak -p values, 0-99
    speeds: list[int] | None = Field(default=None, min_length=1)  # espeak -s values, words per minute
    train_words: tuple[int, int] | None = None  # (min, max) words of a train sentence
    # asr: how many of the train voices read dev/ and test/ (None: all), and the size of test_heldout/:
    # the test sentences read by voices whose timbres no train voice uses (None: no such split).
    eval_voices: int | None = Field(default=None, ge=1)
    heldout_voices: int | None = Field(default=None, ge=1)
    # vc: the training corpora {name: VcCorpus}, parallel pairs per sentence (a share of them source ==
    # target), the dev triples (half across genders), the length of dev sentences and the dev_reverb rooms.
    # songs: the corpora {name: SongCorpus}.
    corpora: dict[str, Corpus] | None = None
    pairs_per_sentence: int = Field(default=12, ge=1)
    self_pairs: float = Field(default=0.2, ge=0, lt=1)
    dev_triples: int = Field(default=40, ge=2)
    dev_words: tuple[int, int] | None = None  # (min, max) words of a dev sentence (None: 4-10)
    dev_rooms: DevRooms = Field(default_factory=DevRooms)
    # vc: utterances of the target voice joined into one speaker reference (a single 2 s sentence gives a
    # noisy speaker embedding: the target voice's own speech scored 0.80 SECS against one, 0.86 against
    # three), and the dev_self/ rows (a voice converted to itself: the self-reconstruction check).
    reference_utterances: int = Field(default=3, ge=1)
    dev_self_triples: int = Field(default=20, ge=1)
    # songs: each song's seconds, the seconds of its prompt (the bars that follow), its tempo range (bpm).
    duration_sec: float = Field(default=6.0, gt=0)
    prompt_sec: float = Field(default=3.0, gt=0)
    tempo: tuple[float, float] = (80.0, 140.0)
    # av: the lip video of every corpus's mixtures.
    video: AvVideo = Field(default_factory=AvVideo)

    def source_params(self) -> dict[str, Any]:
        """What a separation/asr dataset records of its generator: not ``workers`` (no effect on the output),
        nor the vc, songs and av layouts' keys (so that adding them did not make earlier datasets stale)."""
        return self.model_dump(mode="json", exclude={"workers", *_VC_KEYS, *_SONG_KEYS, *_AV_KEYS},
                               exclude_none=True)

    def vc_corpora(self) -> dict[str, VcCorpus]:
        return {n: c for n, c in (self.corpora or {}).items() if isinstance(c, VcCorpus)}

    def song_corpora(self) -> dict[str, SongCorpus]:
        return {n: c for n, c in (self.corpora or {}).items() if isinstance(c, SongCorpus)}

    def av_corpora(self) -> dict[str, AvCorpus]:
        return {n: c for n, c in (self.corpora or {}).items() if isinstance(c, AvCorpus)}

    @model_validator(mode="before")
    @classmethod
    def _corpora_named(cls, data: Any) -> Any:
        """A corpus of layout songs or av without its layout's keys would be read as a vc corpus: say what it
        needs."""
        needs = {"songs": ("singers and songs", "{language: [en, en-us], singers: 12, songs: 160}"),
                 "av": ("train_voices, dev_voices, train_sentences, dev_sentences, utterances_per_voice, "
                        "dev_utterances_per_voice, mixtures_per_utterance and dev_mixtures",
                        "{language: [en-us], train_voices: 8, dev_voices: 4, train_sentences: 80, dev_sentences: 20, "
                        "utterances_per_voice: 10, dev_utterances_per_voice: 5, mixtures_per_utterance: 2, "
                        "dev_mixtures: 40}")}
        layout = data.get("layout") if isinstance(data, dict) else None
        if layout in needs and isinstance(data.get("corpora"), dict):
            keys, example = needs[layout]
            for name, c in data["corpora"].items():
                if isinstance(c, dict) and _corpus_kind(c) != layout:
                    raise ValueError(f"corpora.{name}: a corpus of layout {layout} needs {keys}, e.g. {name}: {example}")
        return data

    def train_lengths(self) -> dict[str, int]:
        """``make_sentences`` keywords for train sentences (empty: its defaults)."""
        return dict(zip(("min_words", "max_words"), self.train_words, strict=True)) if self.train_words else {}

    @model_validator(mode="after")
    def _enough_sentences(self) -> EspeakGenerator:
        if self.pitches and not all(0 <= p <= 99 for p in self.pitches):
            raise ValueError(f"pitches={self.pitches}: espeak-ng pitches are 0-99")
        _check_words("train_words", self.train_words)
        if self.layout == "songs":
            return self._check_songs()
        if self.layout == "vc":
            return self._check_vc()
        if self.layout == "av":
            return self._check_av()
        if self.layout == "asr":
            if self.eval_voices and self.eval_voices > self.train_voices:
                raise ValueError(f"eval_voices={self.eval_voices} exceeds train_voices ({self.train_voices}): dev and "
                                 "test are read by train voices")
            if self.utterances_per_voice > self.train_sentences:
                raise ValueError(f"utterances_per_voice={self.utterances_per_voice} exceeds train_sentences "
                                 f"({self.train_sentences}): each voice reads distinct sentences")
            if self.eval_utterances_per_voice > min(self.dev_sentences, self.test_sentences):
                raise ValueError(f"eval_utterances_per_voice={self.eval_utterances_per_voice} exceeds dev_sentences/"
                                 f"test_sentences ({min(self.dev_sentences, self.test_sentences)})")
            return self
        n = min(self.train_sentences, self.dev_sentences)
        if self.utterances_per_voice > n:
            raise ValueError(f"utterances_per_voice={self.utterances_per_voice} exceeds train_sentences/"
                             f"dev_sentences ({n}): each voice reads distinct sentences")
        return self

    def vc_voices(self) -> tuple[dict[str, list[VoiceSpec]], list[VoiceSpec]]:
        """({corpus: its voices}, dev voices). One seed and ``dev_variant_fraction`` hold the same timbres
        out of every ``split_voices`` call, so no training voice of any corpus has a dev voice's timbre."""
        def split(n_train: int, n_dev: int, bases: list[str] | None, pitches: list[int] | None,
                  speeds: list[int] | None) -> tuple[list[VoiceSpec], list[VoiceSpec]]:
            return split_voices(n_train, n_dev, self.seed, self.dev_variant_fraction, bases=bases, pitches=pitches,
                                speeds=speeds)

        corpora = {}
        for name, c in self.vc_corpora().items():
            try:
                corpora[name] = split(c.voices, 1, c.language, c.pitches, c.speeds)[0]
            except ValueError as e:
                raise ValueError(f"corpora.{name}.voices={c.voices}: {e}; add languages, pitches or speeds") from None
        try:
            dev = split(1, self.dev_voices, self.language, self.pitches, self.speeds)[1]
        except ValueError as e:
            raise ValueError(f"dev_voices={self.dev_voices}: {e}; add languages, pitches or speeds") from None
        return corpora, dev

    def _check_songs(self) -> EspeakGenerator:
        if not self.corpora:
            raise ValueError("corpora: layout songs needs its song corpora, e.g. corpora: {en: {language: [en, en-us], "
                             "singers: 12, songs: 160}, es: {language: [es, es-419], text: syllables, singers: 8, "
                             "songs: 80}}")
        for name, c in self.corpora.items():
            if not _FOLDER_NAME.match(name):
                raise ValueError(f"corpora: {name!r} cannot name a folder of the output: use letters, digits, _ . -")
            assert isinstance(c, SongCorpus)  # _song_corpora_named sends every corpus of layout songs there
            try:
                choose_singers(c.singers, 0, c.language, c.pitches, c.speeds)
            except ValueError as e:
                raise ValueError(f"corpora.{name}.singers={c.singers}: {e}; add languages, pitches or speeds") from None
        if not 0 < self.tempo[0] <= self.tempo[1]:
            raise ValueError(f"tempo={list(self.tempo)}: give [min, max] beats per minute with 0 < min <= max")
        return self

    def _check_vc(self) -> EspeakGenerator:
        if not self.corpora:
            raise ValueError("corpora: layout vc needs its training corpora, e.g. corpora: {vctk: {language: [en], "
                             "voices: 16, sentences: 60, utterances_per_voice: 20}}")
        for name, c in self.corpora.items():
            if isinstance(c, SongCorpus):
                raise ValueError(f"corpora.{name}: a song corpus (singers, songs) in layout vc: use layout: songs, or "
                                 "give it voices, sentences and utterances_per_voice")
            if isinstance(c, AvCorpus):
                raise ValueError(f"corpora.{name}: an av corpus (train_voices, mixtures_per_utterance) in layout vc: "
                                 "use layout: av, or give it voices, sentences and utterances_per_voice")
        for name in self.corpora:
            if not _FOLDER_NAME.match(name) or name in _VC_RESERVED:
                raise ValueError(f"corpora: {name!r} cannot name a folder of the output: use letters, digits, _ . - "
                                 f"and none of {list(_VC_RESERVED)}")
        _check_words("dev_words", self.dev_words)
        if self.dev_sentences < 2:
            raise ValueError(f"dev_sentences={self.dev_sentences}: a dev triple's reference reads another dev "
                             "sentence than its source; give at least 2")
        _, dev = self.vc_voices()
        genders = [v.gender for v in dev]
        if {"M", "F"} - set(genders):
            raise ValueError(f"dev_voices={self.dev_voices}: the dev voices are all {genders[0]}; cross-gender "
                             "triples need both: raise dev_voices")
        can = possible_triples(genders, self.dev_sentences)
        n_cross, n_within = self.dev_triples - self.dev_triples // 2, self.dev_triples // 2
        if n_cross > can["cross"] or n_within > can["within"]:
            raise ValueError(f"dev_triples={self.dev_triples} exceeds what {self.dev_voices} dev voices reading "
                             f"{self.dev_sentences} sentences give ({can['cross']} cross-gender, {can['within']} "
                             "within-gender distinct triples, half of each wanted): lower dev_triples or raise "
                             "dev_voices/dev_sentences")
        if self.dev_self_triples > len(dev) * self.dev_sentences:
            raise ValueError(f"dev_self_triples={self.dev_self_triples} exceeds the {len(dev) * self.dev_sentences} "
                             f"utterances of {len(dev)} dev voices reading {self.dev_sentences} sentences: lower it")
        return self

    def av_voices(self) -> dict[str, tuple[list[VoiceSpec], list[VoiceSpec]]]:
        """{corpus: (train voices, dev voices)}. One seed and ``dev_variant_fraction`` hold the same timbres out
        of every ``split_voices`` call, so no train voice of any corpus has a dev voice's timbre."""
        out = {}
        for name, c in self.av_corpora().items():
            try:
                out[name] = split_voices(c.train_voices, c.dev_voices, self.seed, self.dev_variant_fraction,
                                         bases=c.language, pitches=c.pitches, speeds=c.speeds)
            except ValueError as e:
                raise ValueError(f"corpora.{name}.train_voices={c.train_voices}/dev_voices={c.dev_voices}: {e}; add "
                                 "languages, pitches or speeds") from None
        return out

    def _check_av(self) -> EspeakGenerator:
        if not self.corpora:
            raise ValueError("corpora: layout av needs its corpora, e.g. corpora: {main: {language: [en, en-us], "
                             "train_voices: 40, dev_voices: 8, train_sentences: 800, dev_sentences: 80, "
                             "utterances_per_voice: 20, dev_utterances_per_voice: 10, mixtures_per_utterance: 2, "
                             "dev_mixtures: 150}}")
        for name in self.corpora:
            if not _FOLDER_NAME.match(name):
                raise ValueError(f"corpora: {name!r} cannot name a folder of the output: use letters, digits, _ . -")
        owner: dict[str, str] = {}
        for name, (train, dev) in self.av_voices().items():
            shared = sorted({v.id for v in train + dev} & set(owner))
            if shared:
                raise ValueError(f"corpora.{name}: its voices {shared[:3]} are also voices of corpora.{owner[shared[0]]}"
                                 ": give the corpora different languages (accents), pitches or speeds")
            owner.update({v.id: name for v in train + dev})
        return self


class DevMixtures(_Strict):
    num: int = Field(default=100, ge=1)
    max_seconds: float = Field(default=4.0, gt=0)
    seed: int = 1
    snr_db: tuple[float, float] = (-2.5, 2.5)


class InputSpec(_Strict):
    """A corpus on disk: a folder or manifest in one of the reader formats."""

    format: Literal["speaker-dirs", "jsonl", "tsv", "wsj0-2mix"]
    path: Path
    options: dict[str, Any] = Field(default_factory=dict)  # reader options, e.g. {transcripts: text.txt}


class SplitSpec(_Strict):
    """Seeded validation/test splits: by item or by speaker (no speaker in two splits)."""

    ratios: dict[str, float]  # e.g. {train: 0.9, dev: 0.05, test: 0.05}; what is left up to 1 goes to train
    by: Literal["item", "speaker"] = "item"
    seed: int = 0

    @field_validator("ratios", mode="before")
    @classmethod
    def _ratios(cls, v: Any) -> Any:  # also "train=0.9,dev=0.1"; a rest below 1 goes to train
        return parse_ratios(v) if isinstance(v, str | dict) else v


StepSpec = str | dict[str, dict[str, Any] | None]  # "vad_trim" or {vad_trim: {pad_ms: 150}}


class PrepConfig(_Strict):
    name: str
    sample_rate: int | None = Field(default=None, gt=0)  # output rate; fills the resample step's default
    output_dir: str  # a folder, or an s3:// / gs:// URI (written to staging_dir, then uploaded)
    staging_dir: Path | None = None  # for a URI output_dir: the local folder shards are prepared in first
    input: InputSpec | None = None
    generator: EspeakGenerator | None = None
    raw_dir: Path | None = None  # generator only: where the synthesised wavs go
    dev_mixtures: DevMixtures | None = None  # generator only (default: DevMixtures())
    steps: list[StepSpec] = Field(default_factory=list)
    splits: SplitSpec | None = None  # input only
    rows_per_shard: int = Field(default=200, ge=1)  # input files per shard (at most, with shard_mb)
    shard_mb: float | None = Field(default=None, gt=0)  # also cut shards at about this many MB of input audio
    audio_format: Literal["pcm_s16le", "flac", "f32le"] = "pcm_s16le"
    workers: int = Field(default=2, ge=0)  # Ray Data tasks at once (0: in this process, no Ray)

    @model_validator(mode="after")
    def _one_source(self) -> PrepConfig:
        if (self.input is None) == (self.generator is None):
            raise ValueError("give exactly one of input: {format, path} (a corpus) or generator: {kind: espeak}")
        if self.generator is not None:
            if self.raw_dir is None:
                raise ValueError("raw_dir: the espeak generator needs a folder for its wavs")
            if self.generator.layout == "songs":
                self._check_songs()
            elif self.splits is not None:
                raise ValueError("splits: the espeak generator makes its own train/dev_speech/dev splits")
            if self.generator.layout == "av" and self.dev_mixtures is not None:
                raise ValueError("dev_mixtures: layout av draws its dev mixtures per corpus (corpora.<name>.dev_mixtures)"
                                 "; drop the top-level dev_mixtures")
            if self.sample_rate is None:
                self.sample_rate = 16000
            if self.dev_mixtures is None:
                self.dev_mixtures = DevMixtures()
            if self.generator.layout == "vc" and not any(_step(spec)[0] == "features" for spec in self.steps):
                raise ValueError("steps: layout vc needs the features step (pairs are aligned on its mel), e.g. "
                                 "steps: [resample, normalize, vad_trim, {segment: {max_seconds: 30}}, features]")
        elif self.raw_dir is not None or self.dev_mixtures is not None:
            raise ValueError("raw_dir/dev_mixtures belong to the espeak generator, not to input")
        for spec in self.steps:
            name, params = _step(spec)
            if name not in STEPS:
                near = difflib.get_close_matches(name, list(STEPS), n=1)
                raise ValueError(f"steps: unknown step {name!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                                 + f"; use some of {list(STEPS)}")
            if name == "resample" and "sample_rate" not in params and self.sample_rate is None:
                raise ValueError("steps: resample needs sample_rate (top level) or {resample: {sample_rate: N}}")
        return self

    def _check_songs(self) -> None:
        if self.splits is None:
            raise ValueError("splits: layout songs cuts each corpus by singer, e.g. splits: {ratios: {dev: 0.2}, "
                             "by: speaker, seed: 0}")
        if self.splits.by != "speaker":
            raise ValueError(f"splits.by={self.splits.by!r}: layout songs splits by singer (by: speaker), so that no "
                             "dev singer sings in train")
        cutting = [n for n in (_step(spec)[0] for spec in self.steps) if n in CUTTING_STEPS]
        if cutting:
            raise ValueError(f"steps: {cutting} cut every audio column where they cut the song, and its prompt (the "
                             "audio column prompt) has its own length: drop them for layout songs, e.g. steps: "
                             "[resample, normalize]")

    def step_list(self) -> list[tuple[str, dict[str, Any]]]:
        """[(name, params)], the resample step's rate filled from ``sample_rate``; a generator corpus is
        always resampled to ``sample_rate`` first."""
        steps = [_step(s) for s in self.steps]
        steps = [(n, {"sample_rate": self.sample_rate, **p} if n == "resample" else p) for n, p in steps]
        if self.generator is not None and not any(n == "resample" for n, _ in steps):
            steps.insert(0, ("resample", {"sample_rate": self.sample_rate}))
        return steps


def _step(spec: StepSpec) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if len(spec) != 1:
        raise ValueError(f"steps: each entry is a name or {{name: {{params}}}}, got {spec}")
    name, params = next(iter(spec.items()))
    return name, dict(params or {})


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        models = [a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not models:  # a plain value, or not a model (X | None counts as X)
            return []
        model = models[0]
    return list(model.model_fields)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    if isinstance(value, dict) and isinstance(data.get(last), dict):
        for k, v in value.items():
            _set_dotted(data[last], k, v)
    else:
        data[last] = value


def load_prep_config(path: str | Path, overrides: dict | None = None) -> PrepConfig:
    """YAML -> ``PrepConfig``; ``overrides`` are {"dotted.key": value} or nested dicts."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prep config {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    for k, v in (overrides or {}).items():
        _set_dotted(data, k, v)
    try:
        return PrepConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = tuple(p for i, p in enumerate(err["loc"])  # the corpus kind's tag is no key of the YAML
                        if not (i >= 2 and err["loc"][i - 2] == "corpora" and p in _CORPUS_TAGS))
            key = ".".join(str(p) for p in loc)
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                near = difflib.get_close_matches(str(loc[-1]), _fields_at(PrepConfig, loc), n=1)
                msg = "unknown key" + (f" (did you mean {near[0]!r}?)" if near else "")
            lines.append(f"  {key}: {msg}" if key else f"  {msg.removeprefix('Value error, ')}")
        raise ValueError(f"invalid prep config {path}:\n" + "\n".join(lines)) from None


def _up_to_date(folder: Path, prep: dict) -> bool:
    """True when ``folder`` holds a dataset whose manifest records these parameters."""
    if not (folder / MANIFEST_NAME).exists():
        return False
    recorded = read_manifest(folder).get("prep", {})
    return all(recorded.get(k) == v for k, v in json.loads(json.dumps(prep)).items())


def _read_speech_shards(folder: Path) -> list[dict]:
    man = read_manifest(folder)
    rows: list[dict] = []
    for p in shard_paths(folder, man):
        rows.extend(pq.read_table(p, columns=["id", "speaker", "audio", "sample_rate"]).to_pylist())
    for r in rows:
        r["audio"] = decode_audio(r["audio"], man.get("audio_format", "pcm_s16le"))
    return rows


def _resolve(root: Path, p: Path) -> Path:
    return p if p.is_absolute() else root / p


def run_prep(config_path: str | Path, *, overrides: dict | None = None, root: Path | None = None) -> dict:
    """Prepare every dataset of a prep YAML; returns {"name", "output_dir", "splits", "seconds"}.

    Relative paths in the YAML resolve against ``root`` (default: the current directory).
    """
    return run_prep_config(load_prep_config(config_path, overrides), root=root)


def run_prep_config(cfg: PrepConfig, *, root: Path | None = None) -> dict:
    """``run_prep`` of a validated config (the flag form of ``raytrain prep`` builds one)."""
    t_all = time.perf_counter()
    root = Path(root) if root is not None else Path.cwd()
    remote = is_uri(cfg.output_dir)
    # Object storage has no rename: shards are prepared (resumably) in a local folder, then uploaded
    # with the manifest last.
    out_dir = (_resolve(root, cfg.staging_dir or Path(".raytrain", "staging", cfg.name)) if remote
               else _resolve(root, Path(cfg.output_dir)))
    if cfg.generator is None:
        splits = _run_input(cfg, root, out_dir)
    elif cfg.generator.layout == "asr":
        splits = _run_generator_asr(cfg, root, out_dir)
    elif cfg.generator.layout == "vc":
        splits = _run_generator_vc(cfg, root, out_dir)
    elif cfg.generator.layout == "songs":
        splits = _run_generator_songs(cfg, root, out_dir)
    elif cfg.generator.layout == "av":
        splits = _run_generator_av(cfg, root, out_dir)
    else:
        splits = _run_generator(cfg, root, out_dir)
    if remote:
        for folder in sorted({m.parent for m in out_dir.rglob(MANIFEST_NAME)}):
            rel = folder.relative_to(out_dir).as_posix()
            uri = join(cfg.output_dir, rel) if rel != "." else cfg.output_dir.rstrip("/")
            counts = upload_dataset(folder, uri)
            print(f"uploaded {folder} -> {uri}: {counts['uploaded']} files, {counts['skipped']} already there")
    result = {"name": cfg.name, "output_dir": cfg.output_dir if remote else str(out_dir), "splits": splits,
              "seconds": round(time.perf_counter() - t_all, 1)}
    _print_table(result)
    return result


def _write(items: list[dict], out: Path, cfg: PrepConfig, kind: str, audio_columns: list[str], prep: dict,
           expect_sample_rate: int | None) -> None:
    prepare_items(items, out, kind=kind, audio_columns=audio_columns, steps=cfg.step_list(),
                  rows_per_shard=cfg.rows_per_shard, shard_mb=cfg.shard_mb, audio_format=cfg.audio_format,
                  expect_sample_rate=expect_sample_rate, workers=cfg.workers, prep=prep)


def _run_input(cfg: PrepConfig, root: Path, out_dir: Path) -> dict[str, dict]:
    spec = cfg.input
    assert spec is not None
    source = _resolve(root, spec.path)
    items, audio_columns = with_audio_columns(spec.format, list_items(spec.format, source, **spec.options))
    has_resample = any(n == "resample" for n, _ in cfg.step_list())
    base: dict[str, Any] = {"name": cfg.name, "format": spec.format, "source": str(source)}
    parts = {"": items}
    if cfg.splits is not None:
        parts = split_items(items, cfg.splits.ratios, by=cfg.splits.by, seed=cfg.splits.seed)
        base["split_by"] = cfg.splits.model_dump(mode="json")
    out: dict[str, dict] = {}
    for split, part in parts.items():
        t0 = time.perf_counter()
        folder = out_dir / split if split else out_dir
        if not part:
            raise ValueError(f"split {split!r} of {source} is empty: give it a larger ratio or use more data")
        _write(part, folder, cfg, "mixtures" if spec.format == "wsj0-2mix" else "speech",
               audio_columns, {**base, "split": split or None},
               None if has_resample else cfg.sample_rate)
        out[split or folder.name] = _summary(folder, "done", t0)
    return out


def _run_generator(cfg: PrepConfig, root: Path, out_dir: Path) -> dict[str, dict]:
    g, m, sr = cfg.generator, cfg.dev_mixtures, cfg.sample_rate
    assert g is not None and m is not None and sr is not None and cfg.raw_dir is not None
    raw_dir = _resolve(root, cfg.raw_dir)
    train_voices, dev_voices = split_voices(g.train_voices, g.dev_voices, g.seed, g.dev_variant_fraction,
                                            bases=g.language, pitches=g.pitches, speeds=g.speeds)
    train_slice, dev_slice = vocab_split(g.dev_vocab_fraction)
    vocab = vocabulary(g.words, g.vocabulary_size)
    base = {"name": cfg.name, "sample_rate": sr, "rows_per_shard": cfg.rows_per_shard,
            "source": g.source_params()}
    plans = [
        ("train", train_voices, make_sentences(g.train_sentences, g.seed, train_slice, vocab=vocab, **g.train_lengths())),
        ("dev_speech", dev_voices, make_sentences(g.dev_sentences, g.seed, dev_slice, vocab=vocab)),
    ]
    splits: dict[str, dict] = {}
    for split, voices, sentences in plans:
        t0 = time.perf_counter()
        out, prep = out_dir / split, {**base, "split": split}
        status = "up to date"
        if not _up_to_date(out, {**prep, "steps": _described(cfg), "audio_format": cfg.audio_format}):
            generate_corpus(raw_dir / split, voices, g.utterances_per_voice, sentences, sr,
                            g.seed, workers=g.workers, phonemes=g.phonemes)
            _write(list_items("speaker-dirs", raw_dir / split), out, cfg, "speech", ["audio"], prep, None)
            status = "written"
        splits[split] = _summary(out, status, t0)

    t0 = time.perf_counter()
    dev_prep = {**base, "split": "dev", "from": "dev_speech"}
    full = {"mixtures": mixture_params(m.num, m.seed, m.max_seconds, m.snr_db), **dev_prep}
    status = "up to date"
    if not _up_to_date(out_dir / "dev", full):
        write_fixed_mixtures(_read_speech_shards(out_dir / "dev_speech"), out_dir / "dev", num_mixtures=m.num,
                             seed=m.seed, sample_rate=sr, max_seconds=m.max_seconds,
                             snr_db=m.snr_db, rows_per_shard=cfg.rows_per_shard, prep=dev_prep)
        status = "written"
    splits["dev"] = _summary(out_dir / "dev", status, t0)
    return splits


def _write_test_tsv(raw: Path, tsv: Path) -> None:
    """A fairseq/StreamSpeech manifest of the wavs under ``raw`` (paths relative to the manifest),
    with the phoneme transcript as an extra column when there is one; written atomically."""
    import soundfile as sf

    lines = ["\t".join(["id", "audio", "n_frames", "tgt_text", "speaker", "phonemes"])]
    for item in list_items("speaker-dirs", raw):
        wav = Path(item["audio"])
        phn = wav.with_suffix(".phn")
        fields = [item["id"].replace("/", "_"), str(wav.relative_to(tsv.parent)), str(sf.info(str(wav)).frames),
                  item["text"], item["speaker"], phn.read_text(encoding="utf-8").strip() if phn.exists() else ""]
        if any("\t" in f or "\n" in f for f in fields):
            raise ValueError(f"{wav}: a field holds a tab or newline; it cannot go into {tsv}")
        lines.append("\t".join(fields))
    tmp = tsv.with_name(f".{tsv.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(tsv)


def _run_generator_asr(cfg: PrepConfig, root: Path, out_dir: Path) -> dict[str, dict]:
    """The ``layout: asr`` corpus: train/, dev/ (speaker folders), test/ (via ``<raw_dir>/test.tsv``) and,
    with ``heldout_voices``, test_heldout/: test/'s sentences read by voices of timbres train never heard."""
    g, sr = cfg.generator, cfg.sample_rate
    assert g is not None and sr is not None and cfg.raw_dir is not None
    raw_dir = _resolve(root, cfg.raw_dir)
    voices, heldout = split_voices(g.train_voices, g.heldout_voices or 1, g.seed, g.dev_variant_fraction,
                                   bases=g.language, pitches=g.pitches, speeds=g.speeds)
    eval_voices = voices[:g.eval_voices] if g.eval_voices else voices
    f, vocab = g.dev_vocab_fraction, vocabulary(g.words, g.vocabulary_size)
    base = {"name": cfg.name, "sample_rate": sr, "rows_per_shard": cfg.rows_per_shard,
            "source": g.source_params()}
    test_sentences = make_sentences(g.test_sentences, g.seed, (1.0 - f / 2, 1.0), vocab=vocab)
    plans = [
        ("train", voices, g.utterances_per_voice,
         make_sentences(g.train_sentences, g.seed, (0.0, 1.0 - f), vocab=vocab, **g.train_lengths())),
        ("dev", eval_voices, g.eval_utterances_per_voice,
         make_sentences(g.dev_sentences, g.seed, (1.0 - f, 1.0 - f / 2), vocab=vocab)),
        ("test", eval_voices, g.eval_utterances_per_voice, test_sentences)]
    if g.heldout_voices:
        plans.append(("test_heldout", heldout, g.eval_utterances_per_voice, test_sentences))
    splits: dict[str, dict] = {}
    for split, speakers, per_voice, sentences in plans:
        t0 = time.perf_counter()
        out, prep = out_dir / split, {**base, "split": split}
        if split == "test":
            prep["format"] = "tsv"
        status = "up to date"
        if not _up_to_date(out, {**prep, "steps": _described(cfg), "audio_format": cfg.audio_format}):
            generate_corpus(raw_dir / split, speakers, per_voice, sentences, sr, g.seed, workers=g.workers,
                            phonemes=g.phonemes)
            if split == "test":
                _write_test_tsv(raw_dir / split, raw_dir / "test.tsv")
                items = list_items("tsv", raw_dir / "test.tsv")
            else:
                items = list_items("speaker-dirs", raw_dir / split)
            _write(items, out, cfg, "speech", ["audio"], prep, None)
            status = "written"
        splits[split] = _summary(out, status, t0)
    return splits


def _sha(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _seed_of(seed: int, name: str) -> int:
    """A corpus's own seed: two corpora of one language read different sentences."""
    return int(_sha([str(seed), name])[:8], 16)


def _run_generator_vc(cfg: PrepConfig, root: Path, out_dir: Path) -> dict[str, dict]:
    """The ``layout: vc`` corpus: per corpus ``<name>/speech/`` and ``<name>/pairs/``, then ``dev_speech/``,
    ``dev/``, ``dev_reverb/`` and ``dev_self/`` (see ``datasets_prep.vc``). Every folder is skipped when its manifest
    records the same parameters (and, for pairs and triples, the same source shards)."""
    g, sr = cfg.generator, cfg.sample_rate
    assert g is not None and g.corpora and sr is not None and cfg.raw_dir is not None
    raw_dir = _resolve(root, cfg.raw_dir)
    train_slice, dev_slice = vocab_split(g.dev_vocab_fraction)
    vocab = vocabulary(g.words, g.vocabulary_size)
    corpus_voices, dev_voices = g.vc_voices()
    held = {v.variant for v in dev_voices}
    for name, voices in corpus_voices.items():  # split_voices' promise, checked: it is what dev measures
        if leaked := sorted(held & {v.variant for v in voices}):
            raise RuntimeError(f"corpora.{name}: train voices use the dev timbres {leaked}")
    common = {"name": cfg.name, "layout": "vc", "sample_rate": sr, "rows_per_shard": cfg.rows_per_shard,
              "seed": g.seed}
    chain = {"steps": _described(cfg), "audio_format": cfg.audio_format}
    splits: dict[str, dict] = {}

    def speech(split: str, voices: list[VoiceSpec], per_voice: int, sentences: list[str], seed: int) -> None:
        t0 = time.perf_counter()
        out = out_dir / split
        prep = {**common, "split": split, "voices": [v.id for v in voices], "utterances_per_voice": per_voice,
                "corpus_seed": seed, "sentences_sha256": _sha(sentences)}
        status = "up to date"
        if not _up_to_date(out, {**prep, **chain}):
            raw = raw_dir / split.split("/")[0]
            generate_corpus(raw, voices, per_voice, sentences, sr, seed, workers=g.workers)
            _write(list_items("speaker-dirs", raw), out, cfg, "speech", ["audio"], prep, None)
            status = "written"
        splits[split] = _summary(out, status, t0)

    for name, c in g.vc_corpora().items():
        seed = _seed_of(g.seed, name)
        if c.text == "syllables":  # no English word, so no dev word, is a syllable-word
            sentences = make_syllable_sentences(c.sentences, seed, train_slice, exclude=frozenset(vocab),
                                                **c.lengths())
        else:
            sentences = make_sentences(c.sentences, seed, train_slice, vocab=vocab, **c.lengths())
        speech(f"{name}/speech", corpus_voices[name], c.utterances_per_voice, sentences, seed)
        t0 = time.perf_counter()
        out = out_dir / name / "pairs"
        prep = {**common, "split": f"{name}/pairs", "from_sha256": shards_sha256(out_dir / name / "speech")}
        status = "up to date"
        if not _up_to_date(out, {"pairs": pair_params(g.pairs_per_sentence, g.self_pairs, g.seed,
                                                      g.reference_utterances), **prep}):
            write_pairs(read_speech(out_dir / name / "speech"), out, per_sentence=g.pairs_per_sentence,
                        self_share=g.self_pairs, seed=g.seed, rows_per_shard=cfg.rows_per_shard, prep=prep,
                        references=g.reference_utterances)
            status = "written"
        splits[f"{name}/pairs"] = _summary(out, status, t0)

    dev_lengths = dict(zip(("min_words", "max_words"), g.dev_words, strict=True)) if g.dev_words else {}
    dev_sentences = make_sentences(g.dev_sentences, g.seed, dev_slice, vocab=vocab, **dev_lengths)
    speech("dev_speech", dev_voices, g.dev_sentences, dev_sentences, g.seed)  # every dev voice reads every sentence
    source = out_dir / "dev_speech"
    gender = {v.id: v.gender for v in dev_voices}
    rooms = g.dev_rooms.model_dump(mode="json")
    picked: tuple[Speech, list[Triple]] | None = None  # read once for both sets
    for split, room in (("dev", None), ("dev_reverb", rooms), ("dev_self", None)):
        t0 = time.perf_counter()
        prep = {**common, "split": split, "from_sha256": shards_sha256(source)}
        num = g.dev_self_triples if split == "dev_self" else g.dev_triples
        params = triple_params(num, g.seed, room, g.reference_utterances, same_voice=split == "dev_self")
        status = "up to date"
        if not _up_to_date(out_dir / split, {"triples": params, **prep}):
            dev = picked[0] if picked is not None else read_speech(source)
            if split == "dev_self":
                chosen = select_self_triples(dev, num, g.seed, g.reference_utterances)
            else:
                if picked is None:
                    picked = dev, select_triples(dev, num, g.seed, gender=gender.__getitem__,
                                                 references=g.reference_utterances)
                chosen = picked[1]
            write_triples(dev, chosen, out_dir / split, seed=g.seed, rooms=room, rows_per_shard=cfg.rows_per_shard,
                          prep=prep, params=params)
            status = "written"
        splits[split] = _summary(out_dir / split, status, t0)
    return splits


def _run_generator_songs(cfg: PrepConfig, root: Path, out_dir: Path) -> dict[str, dict]:
    """The ``layout: songs`` corpus: per corpus, ``<raw_dir>/<corpus>/songs.jsonl`` of sung songs
    (``datasets_prep.sung``), prepared through the JSONL reader (``audio``, ``prompt``, ``line``) and split by
    singer (``splits``) into ``<corpus>/<split>/``. A corpus whose every split's manifest records the same
    parameters is skipped: nothing is rendered."""
    g, sr, spec = cfg.generator, cfg.sample_rate, cfg.splits
    assert g is not None and sr is not None and spec is not None and cfg.raw_dir is not None
    raw_dir = _resolve(root, cfg.raw_dir)
    words = vocabulary(g.words, g.vocabulary_size)
    chain = {"steps": _described(cfg), "audio_format": cfg.audio_format}
    splits: dict[str, dict] = {}
    for name, c in g.song_corpora().items():
        t0 = time.perf_counter()
        seed = _seed_of(g.seed, name)
        singers = choose_singers(c.singers, seed, c.language, c.pitches, c.speeds)
        vocab = syllable_vocabulary(exclude=frozenset(words)) if c.text == "syllables" else words
        base = {"name": cfg.name, "layout": "songs", "sample_rate": sr, "rows_per_shard": cfg.rows_per_shard,
                "corpus": name, "songs": song_params(singers, c.songs, seed, vocab, g.duration_sec, g.prompt_sec, sr,
                                                     g.tempo),
                "split_by": spec.model_dump(mode="json")}
        folders = {split: out_dir / name / split for split in sorted(spec.ratios, key=lambda s: s != "train")}
        if all(_up_to_date(f, {**base, "split": split, **chain}) for split, f in folders.items()):
            splits.update({f"{name}/{split}": _summary(f, "up to date", t0) for split, f in folders.items()})
            continue
        manifest = write_sung_corpus(raw_dir / name, name=name, singers=singers, songs=c.songs, seed=seed, vocab=vocab,
                                     duration_sec=g.duration_sec, prompt_sec=g.prompt_sec, sample_rate=sr, bpm=g.tempo,
                                     workers=g.workers)
        items, audio_columns = with_audio_columns("jsonl", list_items("jsonl", manifest))
        parts = split_items(items, spec.ratios, by="speaker", seed=spec.seed)
        for split in folders:
            part = parts[split]
            if not part:
                raise ValueError(f"corpora.{name}: split {split!r} got none of its {c.singers} singers: raise singers "
                                 f"or the split's ratio in splits.ratios")
            _write(part, folders[split], cfg, "songs", audio_columns, {**base, "split": split}, None)
            splits[f"{name}/{split}"] = _summary(folders[split], "written", t0)
            t0 = time.perf_counter()
    return splits


def _run_generator_av(cfg: PrepConfig, root: Path, out_dir: Path) -> dict[str, dict]:
    """The ``layout: av`` corpus: per corpus ``<name>/speech_train/`` and ``<name>/speech_dev/`` (speaker folders
    under ``<raw_dir>/<name>/{train,dev}``, prepared like layout vc's speech), then ``<name>/train/`` and
    ``<name>/dev/``, the ``av_mixtures`` made from each (``datasets_prep.av``). Every folder is skipped when its
    manifest records the same parameters (the mixtures also the same speech shards)."""
    g, sr = cfg.generator, cfg.sample_rate
    assert g is not None and g.corpora and sr is not None and cfg.raw_dir is not None
    raw_dir = _resolve(root, cfg.raw_dir)
    train_slice, dev_slice = vocab_split(g.dev_vocab_fraction)
    vocab = vocabulary(g.words, g.vocabulary_size)
    voices = g.av_voices()
    held = {v.variant for _, dev in voices.values() for v in dev}
    for name, (train, _) in voices.items():  # split_voices' promise, checked: it is what dev measures
        if leaked := sorted(held & {v.variant for v in train}):
            raise RuntimeError(f"corpora.{name}: train voices use the dev timbres {leaked}")
    common = {"name": cfg.name, "layout": "av", "sample_rate": sr, "rows_per_shard": cfg.rows_per_shard,
              "seed": g.seed}
    chain = {"steps": _described(cfg), "audio_format": cfg.audio_format}
    v = g.video
    splits: dict[str, dict] = {}
    for name, c in g.av_corpora().items():
        seed = _seed_of(g.seed, name)
        plans = (("train", voices[name][0], c.utterances_per_voice, c.train_sentences, train_slice),
                 ("dev", voices[name][1], c.dev_utterances_per_voice, c.dev_sentences, dev_slice))
        for part, speakers, per_voice, pool, words in plans:
            t0 = time.perf_counter()
            split, out = f"{name}/speech_{part}", out_dir / name / f"speech_{part}"
            sentences = make_sentences(pool, seed, words, vocab=vocab, **c.lengths(part))
            prep = {**common, "split": split, "voices": [s.id for s in speakers], "utterances_per_voice": per_voice,
                    "corpus_seed": seed, "sentences_sha256": _sha(sentences)}
            status = "up to date"
            if not _up_to_date(out, {**prep, **chain}):
                raw = raw_dir / name / part
                generate_corpus(raw, speakers, per_voice, sentences, sr, seed, workers=g.workers)
                _write(list_items("speaker-dirs", raw), out, cfg, "speech", ["audio"], prep, None)
                status = "written"
            splits[split] = _summary(out, status, t0)
        for part in ("train", "dev"):
            t0 = time.perf_counter()
            split, out, source = f"{name}/{part}", out_dir / name / part, out_dir / name / f"speech_{part}"
            params = av_params(seed=g.seed, snr_db=c.snr_db, overlap=c.overlap, noise_snr_db=c.noise_snr_db,
                               lag=v.lag, size=v.size, fps=v.fps, pixel_noise=v.pixel_noise,
                               **({"per_utterance": c.mixtures_per_utterance} if part == "train"
                                  else {"num": c.dev_mixtures}))
            prep = {**common, "split": split, "from": f"{name}/speech_{part}", "from_sha256": shards_sha256(source)}
            status = "up to date"
            if not _up_to_date(out, {"mixtures": params, **prep}):
                utts, rate, fmt = read_utterances(source)
                pairs = (select_train(utts, c.mixtures_per_utterance, seed) if part == "train"
                         else select_dev(utts, c.dev_mixtures, seed))
                write_av_mixtures(utts, pairs, out, sample_rate=rate, audio_format=fmt, params=params,
                                  rows_per_shard=cfg.rows_per_shard, prep=prep)
                status = "written"
            splits[split] = _summary(out, status, t0)
    return splits


def _described(cfg: PrepConfig) -> list[dict[str, Any]]:
    from datasets_prep.steps.audio import Chain

    return Chain(cfg.step_list(), ["audio"]).describe()


def _summary(folder: Path, status: str, t0: float) -> dict:
    man = read_manifest(folder)
    return {"path": str(folder), "status": status, "rows": man["rows"], "hours": man["hours"],
            "speakers": man["num_speakers"], "rejects": man.get("rejects", {}).get("count", 0),
            "seconds": round(time.perf_counter() - t0, 1)}


def _print_table(result: dict) -> None:
    print(f"prep {result['name']} -> {result['output_dir']}")
    w = max([11, *map(len, result["splits"])])
    print(f"  {'split':<{w}} {'status':<10} {'rows':>6} {'hours':>7} {'speakers':>8} {'rejects':>7} {'seconds':>8}")
    for split, s in result["splits"].items():
        print(f"  {split:<{w}} {s['status']:<10} {s['rows']:>6} {s['hours']:>7.3f} {s['speakers']:>8} "
              f"{s['rejects']:>7} {s['seconds']:>8.1f}")
    print(f"  total {result['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> None:
    """``python -m datasets_prep.prep CONFIG [-o key=value ...]`` (the ``raytrain prep`` body)."""
    import argparse

    ap = argparse.ArgumentParser(prog="raytrain prep", description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.override:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"override {item!r} must look like key=value, e.g. generator.train_voices=8")
        overrides[key] = yaml.safe_load(value)
    run_prep(args.config, overrides=overrides)


if __name__ == "__main__":
    main()
