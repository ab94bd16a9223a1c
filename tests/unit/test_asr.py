"""CTC ASR pieces without Ray: vocabularies, targets, losses, corpus error rates, the model, streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytrain.data.collate import pad_collate
from raytrain.data.text import CHARS, CTCTargets, Vocab
from raytrain.losses import LOSSES
from raytrain.metrics import METRICS
from raytrain.models import build_model

SR = 16000
SMALL = {"sample_rate": SR, "d_model": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 2, "n_mels": 40,
         "segment_length": 8, "left_context_length": 16, "right_context_length": 2}


def test_vocab_round_trip_normalizes_and_greedy_merges_repeats_and_blanks() -> None:
    v = Vocab(CHARS)
    ids = v.encode("  Hello,   World! ")
    assert v.decode(ids) == "hello world" and len(v) == len(CHARS) + 1
    h, e, l_, o = (v.index[c] for c in "helo")
    assert v.greedy([0, h, h, 0, e, l_, 0, l_, l_, o, 0]) == "hello"  # a blank splits the double l
    with pytest.raises(ValueError, match="repeats"):
        Vocab("abca")


def test_ctc_targets_transform_pads_through_the_collate_and_names_an_empty_row() -> None:
    t = CTCTargets(sample_rate=SR, seed=0)
    batch = {"id": np.array(["a", "b"], dtype=object), "text": np.array(["hi there", "ok"], dtype=object),
             "phonemes": np.array(["h'aI D'e@", "oUk'eI"], dtype=object)}
    out = pad_collate(t(batch))
    assert out["asr_targets"].shape == (2, 8) and out["asr_targets_lengths"].tolist() == [8, 2]
    assert Vocab(CHARS).decode(out["asr_targets"][1, :2].tolist()) == "ok"
    assert out["phone_targets_lengths"].tolist() == [9, 6]
    with pytest.raises(ValueError, match=r"row b: column 'text' has no symbol"):
        t({"id": np.array(["a", "b"], dtype=object), "text": np.array(["fine", "!!!"], dtype=object)})


def _batch(texts: list[str], seconds: float = 1.0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    audio = np.empty(len(texts), dtype=object)
    audio[:] = [rng.standard_normal(int(seconds * SR * (1 - 0.2 * i))).astype(np.float32) * 0.1
                for i in range(len(texts))]
    rows = {"audio": audio, "text": np.array(texts, dtype=object), "phonemes": np.array(texts, dtype=object)}
    return pad_collate(CTCTargets(sample_rate=SR, seed=0)(rows))


@pytest.mark.parametrize("encoder", ["conformer", "emformer"])
def test_both_encoders_train_with_both_ctc_losses_and_share_head_names(encoder: str) -> None:
    torch.manual_seed(0)
    model = build_model("ctc_asr", {**SMALL, "encoder": encoder})
    assert {"asr_ctc.weight", "phone_ctc.weight", "encoder.input.1.weight"} <= set(model.state_dict())
    batch = _batch(["abc", "de"])
    out = model(batch)
    assert out["asr_ctc"].shape[:2] == out["phone_ctc"].shape[:2] and out["enc_lengths"].tolist() == [24, 19]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = model(batch)
        loss = LOSSES.get("asr_ctc")(out, batch) + 0.3 * LOSSES.get("phone_ctc")(out, batch)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first  # it learns the two transcripts


def test_ctc_loss_names_the_missing_transform() -> None:
    model = build_model("ctc_asr", SMALL)
    with pytest.raises(KeyError, match="ctc_targets transform"):
        LOSSES.get("asr_ctc")(model({"audio": torch.zeros(1, SR)}), {})


def test_cer_and_wer_are_corpus_rates_from_edits_and_reference_lengths() -> None:
    v = Vocab(CHARS)
    refs, hyps = ["abc de", "fghij"], ["abd de", "fghij"]
    frames = 40
    logp = torch.full((2, frames, len(v)), -10.0)
    for b, hyp in enumerate(hyps):
        seq = [t for i in v.encode(hyp) for t in (int(i), 0)]  # each symbol then a blank
        for f in range(frames):
            logp[b, f, seq[f] if f < len(seq) else 0] = 0.0
    targets = pad_collate({"t": np.array([v.encode(r) for r in refs] + [np.zeros(0, np.int64)], dtype=object)[:2]})
    batch = {"asr_targets": targets["t"], "asr_targets_lengths": targets["t_lengths"]}
    out = {"asr_ctc": logp, "enc_lengths": torch.tensor([frames, frames])}
    edits, chars = METRICS.get("cer")(out, batch)["cer"]
    assert edits.tolist() == [1.0, 0.0] and chars.tolist() == [6.0, 5.0]  # corpus CER 1/11
    word_edits, words = METRICS.get("wer")(out, batch)["wer"]
    assert word_edits.tolist() == [1.0, 0.0] and words.tolist() == [2.0, 1.0]


def test_emformer_streaming_equals_the_full_utterance_for_any_chunk_size() -> None:
    torch.manual_seed(0)
    model = build_model("ctc_asr", {**SMALL, "encoder": "emformer"}).eval()
    for n in (3 * SR + 123, SR // 2 + 17):  # the last segment partial, of different lengths
        x = torch.randn(1, n) * 0.1
        full = model({"audio": x})["asr_ctc"][0]
        for chunk in (1600, 777, 10240):
            s = model.stream()
            parts = [s.push(x[0, i:i + chunk]) for i in range(0, x.shape[1], chunk)] + [s.finish()]
            streamed = torch.cat(parts)
            assert streamed.shape == full.shape
            torch.testing.assert_close(streamed, full, atol=1e-4, rtol=1e-4)
            assert s.text() == model.chars.greedy(streamed.argmax(-1))


def test_streaming_needs_the_emformer() -> None:
    with pytest.raises(ValueError, match="needs the Emformer"):
        build_model("ctc_asr", SMALL).stream()
