"""The espeak-ng synthetic corpus: deterministic, held-out voices and words, right format."""

from __future__ import annotations

import hashlib

import pytest
import soundfile as sf

from datasets_prep.readers.espeak import (
    generate_corpus,
    make_sentences,
    split_voices,
    vocab_split,
    vocabulary,
    voice_pool,
)


def _digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_voice_pool_is_large_distinct_and_stable():
    pool = voice_pool()
    ids = [v.id for v in pool]
    assert len(ids) >= 120 and len(set(ids)) == len(ids)
    assert ids == [v.id for v in voice_pool()]
    assert all("/" not in i and " " not in i for i in ids)
    assert pool[0].espeak_args()[:2] == ["-v", f"{pool[0].base}+{pool[0].variant}"]


def test_dev_voices_use_held_out_variants():
    train, dev = split_voices(56, 8, seed=0)
    assert len(train) == 56 and len(dev) == 8
    assert not {v.variant for v in train} & {v.variant for v in dev}
    assert {v.gender for v in dev} == {"M", "F"}
    assert len({v.variant for v in train[:20]}) == 20  # spread: every timbre before one repeats
    assert split_voices(56, 8, seed=0) == (train, dev)
    assert split_voices(56, 8, seed=1) != (train, dev)
    with pytest.raises(ValueError, match="pool has"):
        split_voices(5000, 8, seed=0)


def test_pitches_and_speeds_widen_the_pool_without_changing_the_default_split():
    assert len(voice_pool(pitches=[35, 50, 65], speeds=[140, 165, 190])) == len(voice_pool()) * 9 // 4
    train, held = split_voices(320, 24, seed=0, pitches=[35, 50, 65], speeds=[140, 165, 190])
    assert {v.pitch for v in train} == {35, 50, 65} and {v.speed for v in train} == {140, 165, 190}
    assert not {v.variant for v in train} & {v.variant for v in held}
    assert len({(v.variant, v.base) for v in train[:232]}) == 232  # every timbre x accent before a repeat
    assert split_voices(56, 8, seed=0) == split_voices(56, 8, seed=0, pitches=[40, 60], speeds=[150, 175])


def test_dev_sentence_words_never_in_train():
    tr_slice, dev_slice = vocab_split(0.2)
    train = make_sentences(600, seed=0, vocab_slice=tr_slice)
    dev = make_sentences(60, seed=0, vocab_slice=dev_slice)
    assert len(set(train)) == 600 and len(set(dev)) == 60
    assert all(4 <= len(s.split()) <= 10 for s in train + dev)
    train_words = {w for s in train for w in s.split()}
    dev_words = {w for s in dev for w in s.split()}
    assert not train_words & dev_words
    assert (train_words | dev_words) <= set(vocabulary())
    assert make_sentences(60, seed=0, vocab_slice=dev_slice) == dev
    assert len(vocabulary()) >= 400


def test_a_word_list_file_gives_a_filtered_seeded_vocabulary_of_the_asked_size(tmp_path):
    words = tmp_path / "words"
    lines = [f"w{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}{chr(97 + i // 676)}" for i in range(3000)]
    words.write_text("\n".join(lines + ["Alice", "dog's", "x", "café", "averyveryverylongword"]) + "\n")
    vocab = vocabulary(str(words), 2500)
    assert len(vocab) == len(set(vocab)) == 2500 and set(vocab) <= set(lines)  # names, possessives, 1 letter,
    assert vocabulary(str(words), 2500) == vocab                               # non-ascii and >12 letters out
    tr_slice, dev_slice = vocab_split(0.2)
    train = make_sentences(300, seed=0, vocab_slice=tr_slice, vocab=vocab)
    dev = make_sentences(30, seed=0, vocab_slice=dev_slice, vocab=vocab)
    assert not {w for s in train for w in s.split()} & {w for s in dev for w in s.split()}
    with pytest.raises(ValueError, match="has 3000 usable words"):
        vocabulary(str(words), 5000)
    with pytest.raises(FileNotFoundError, match="generator.words: no word list"):
        vocabulary(str(tmp_path / "nope"))


def test_corpus_is_byte_identical_mono_and_resampled(tmp_path):
    voices = voice_pool()[:2]
    sentences = make_sentences(3, seed=0)
    kw = dict(voices=voices, sentences_per_voice=3, sentences=sentences, sample_rate=8000, seed=0)
    s1 = generate_corpus(tmp_path / "a", **kw)
    generate_corpus(tmp_path / "b", **kw, workers=1)
    assert s1["generated"] == 6
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b and len([k for k in a if k.endswith(".wav")]) == 6
    for wav in (tmp_path / "a").rglob("*.wav"):
        info = sf.info(str(wav))
        assert info.samplerate == 8000 and info.channels == 1 and info.subtype == "PCM_16"
        assert info.frames > 8000 // 2
        assert wav.with_suffix(".txt").read_text().strip() in sentences
    again = generate_corpus(tmp_path / "a", **kw)  # re-run skips everything
    assert again["generated"] == 0 and again["skipped"] == 6 and _digest(tmp_path / "a") == a


def test_changed_parameters_replace_the_old_corpus(tmp_path):
    voices = voice_pool()[:1]
    generate_corpus(tmp_path, voices, 2, make_sentences(3, seed=0), 8000, seed=0)
    out = generate_corpus(tmp_path, voices, 2, make_sentences(3, seed=5), 8000, seed=0)
    assert out["generated"] == 2
    assert len(list(tmp_path.rglob("*.wav"))) == 2


def test_phoneme_transcripts_and_another_language(tmp_path):
    from datasets_prep.readers.manifests import list_items

    train, _ = split_voices(2, 2, seed=0, bases=["fr"])
    assert all(v.base == "fr" for v in train)
    sentences = ["bonjour tout le monde", "le chat dort"]
    generate_corpus(tmp_path, train[:1], 2, sentences, 16000, seed=0, phonemes="ipa")
    items = list_items("speaker-dirs", tmp_path)
    assert len(items) == 2 and {i["text"] for i in items} == set(sentences)
    by_text = {i["text"]: i["phonemes"] for i in items}
    assert "ʃ" in by_text["le chat dort"] and "ʁ" in by_text["le chat dort"]  # French IPA: chat, dort
    generate_corpus(tmp_path / "x", train[:1], 1, ["hello"], 16000, seed=0, phonemes="mnemonic")
    (item,) = list_items("speaker-dirs", tmp_path / "x")
    assert item["phonemes"] and all(ord(c) < 128 for c in item["phonemes"])  # -x mnemonics are ASCII
