"""The audio-visual target-speaker model (``av_tse_asr``) and the ``video_swap`` transform: no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets_prep.av import video_frames
from raytrain.data.transforms import TRANSFORMS
from raytrain.models import build_model

TINY = {"sample_rate": 8000, "video_size": 24, "visual_channels": [4, 8, 8], "visual_dim": 16,
        "separator": {"dim": 16, "blocks": 1, "heads": 2, "ff": 32},
        "encoder": {"d_model": 32, "ffn": 64, "layers": 1, "heads": 2, "n_mels": 20}}


def _batch(b: int = 2, seconds: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = int(seconds * 8000)
    n = video_frames(t, 8000)
    return {"mix": torch.randn(b, t, generator=g) * 0.1, "lengths": torch.tensor([t] + [t - 800] * (b - 1)),
            "video": torch.randint(0, 256, (b, n, 24, 24, 1), generator=g, dtype=torch.uint8),
            "video_lengths": torch.tensor([n] * b), "sources": torch.randn(b, 1, t, generator=g) * 0.1}


def test_video_frames() -> None:
    assert video_frames(8000, 8000) == 25 and video_frames(8001, 8000) == 26 and video_frames(320, 8000) == 1
    assert video_frames(16000 * 3 + 1, 16000) == 76


def test_outputs_and_padding() -> None:
    torch.manual_seed(0)
    model = build_model("av_tse_asr", TINY).eval()
    batch = _batch()
    out = model(batch)
    assert out["est_sources"].shape == (2, 1, 8000)
    assert out["asr_ctc"].shape[:2] == (2, 24) and out["asr_ctc"].shape[2] == len(model.chars)
    assert out["enc_lengths"].tolist()[0] == 24 and out["enc_lengths"][1] < 24
    assert out["est_sources"][1, 0, 7200:].abs().max() == 0  # zero beyond the row's length
    only_sep = build_model("av_tse_asr", {**TINY, "outputs": "separation"})
    only_sep.load_state_dict(model.state_dict())
    sep = only_sep.eval()(batch)
    assert set(sep) == {"est_sources"} and torch.allclose(sep["est_sources"], out["est_sources"])


def test_the_video_changes_the_extraction_and_the_transcript() -> None:
    torch.manual_seed(0)
    model = build_model("av_tse_asr", TINY).eval()
    for film in model.separator.film:  # zero at init (FiLM starts as the identity): give it a say
        torch.nn.init.normal_(film.weight, std=0.5)
    batch = _batch()
    other = {**batch, "video": torch.flip(batch["video"], dims=[1])}
    a, b = model(batch), model(other)
    assert not torch.allclose(a["est_sources"], b["est_sources"])
    assert not torch.allclose(a["asr_ctc"], b["asr_ctc"])


def test_clean_input_reads_the_target_and_skips_the_separator() -> None:
    torch.manual_seed(0)
    model = build_model("av_tse_asr", {**TINY, "asr_input": "clean", "outputs": "asr"}).eval()
    assert type(model).reads({"asr_input": "clean"}) == ("mix", "video", "s1")
    batch = _batch()
    out = model(batch)
    assert "est_sources" not in out
    moved = model({**batch, "mix": torch.zeros_like(batch["mix"])})  # the mixture is not heard
    assert torch.equal(out["asr_ctc"], moved["asr_ctc"])
    with pytest.raises(KeyError, match="s1"):
        model({k: v for k, v in batch.items() if k != "sources"})


@pytest.mark.parametrize(("args", "match"), [
    ({"modality_dropout": {"vidoe": 0.1}}, "takes video and audio"),
    ({"modality_dropout": {"video": 0.7, "audio": 0.5}}, "sum to <= 1"),
    ({"asr_input": "clean", "outputs": "separation"}, "nothing to do"),
    ({"outputs": "ctc"}, "outputs must be"),
])
def test_bad_arguments(args: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model("av_tse_asr", {**TINY, **args})


def test_wrong_frame_size_is_named() -> None:
    model = build_model("av_tse_asr", TINY)
    batch = _batch()
    batch["video"] = batch["video"][:, :, :20, :20]
    with pytest.raises(ValueError, match=r"\(20, 20, 1\).*built for \(24, 24, 1\)"):
        model(batch)


def test_modality_dropout_zeroes_one_stream_per_training_batch() -> None:
    torch.manual_seed(0)
    model = build_model("av_tse_asr", {**TINY, "modality_dropout": {"video": 0.5, "audio": 0.5}}).train()
    drops = [model._drop() for _ in range(400)]
    assert None not in drops and 150 < drops.count("video") < 250
    assert model.eval()._drop() is None


def _videos(lengths: list[int]) -> np.ndarray:
    out = np.empty(len(lengths), dtype=object)
    for i, n in enumerate(lengths):
        out[i] = np.full((n, 4, 4, 1), i + 1, dtype=np.uint8)
    return out


def test_video_swap_gives_every_row_another_rows_video() -> None:
    swap = TRANSFORMS.get("video_swap")(mode="shuffle", sample_rate=8000, seed=0)
    batch = {"id": np.array(["a", "b", "c", "d"]), "video": _videos([5, 7, 6, 9])}
    out = swap(batch)["video"]
    for i, v in enumerate(out):
        assert v.shape == (len(batch["video"][i]), 4, 4, 1)  # the row's own length
        assert v[0, 0, 0, 0] != i + 1  # not its own video
    assert sorted(int(v[0, 0, 0, 0]) for v in out) == [1, 2, 3, 4]  # a permutation of the batch's videos
    zero = TRANSFORMS.get("video_swap")(mode="zero", sample_rate=8000)(batch)["video"]
    assert all(not v.any() and v.shape == batch["video"][i].shape for i, v in enumerate(zero))
    one = {"id": np.array(["a"]), "video": _videos([3])}
    one["video"][0][0] = 9
    assert TRANSFORMS.get("video_swap")(sample_rate=8000)(one)["video"][0][-1, 0, 0, 0] == 9  # reversed in time
    with pytest.raises(ValueError, match="mode must be"):
        TRANSFORMS.get("video_swap")(mode="roll", sample_rate=8000)
