"""The vc_flow model, its losses and transforms, without Ray: shapes, masks, gradients, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets_prep.vc import reverberate, room_impulse_response
from raytrain.data.voice import FlowNoise, RoomReverb
from raytrain.losses import vc as L
from raytrain.models.vc import SpeakerEncoder, VCFlow, reference_stats

SR = 16000
SMALL = {"hidden": 32, "layers": 2, "content_hidden": 32, "content_layers": 1, "content_dim": 8,
         "griffin_lim_iters": 4}


def _batch(rows: int = 3, seconds: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = int(seconds * SR)
    lengths = torch.tensor([t - i * 1600 for i in range(rows)])
    audio = torch.randn(rows, t, generator=g) * 0.1
    audio = audio * (torch.arange(t)[None] < lengths[:, None])
    frames = t // 160 + 1
    return {"audio": audio, "lengths": lengths,
            "ref_emb": torch.nn.functional.normalize(torch.rand(rows, 256, generator=g), dim=-1),
            "target_mel": torch.randn(rows, frames, 80, generator=g) - 5.0,
            "noise": torch.randn(rows, frames, 80, generator=g)}


def test_flow_training_outputs_and_losses_are_finite_and_reach_every_part() -> None:
    torch.manual_seed(0)
    model = VCFlow(**SMALL).train()
    batch = _batch()
    out = model(batch)
    frames = batch["target_mel"].shape[1]
    assert out["v_pred"].shape == (3, frames, 80) and out["frame_mask"].shape == (3, frames)
    assert out["mel_lengths"].tolist() == [int(n) // 160 + 1 for n in batch["lengths"]]
    # padded frames predict nothing
    last = int(out["mel_lengths"][2])
    assert torch.all(out["v_pred"][2, last:] == 0)
    loss = L.flow_matching(out, batch) + L.mel_multires(out, batch)
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("content.inp.weight", "speaker.0.weight", "blocks.0.conv.weight", "out.weight"):
        assert dict(model.named_parameters())[name].grad is not None, name


def test_eval_samples_from_the_given_noise_and_vocodes() -> None:
    model = VCFlow(**SMALL, sample_steps=3).eval()
    batch = _batch()
    with torch.no_grad():
        a, b = model(batch), model(batch)
    assert torch.equal(a["mel"], b["mel"])  # the noise is the batch's: sampling is deterministic
    assert a["audio_out"].shape == batch["audio"].shape
    assert a["audio_out_lengths"].tolist() == batch["lengths"].tolist()
    assert torch.all(a["audio_out"][2, int(batch["lengths"][2]) + 160:] == 0)
    with torch.no_grad():
        other = model({**batch, "noise": torch.randn_like(batch["noise"])})
    assert not torch.equal(a["mel"], other["mel"])


def test_a_row_converts_the_same_alone_as_in_a_padded_batch() -> None:
    model = VCFlow(**SMALL, sample_steps=2, vocoder="none").eval()
    batch = _batch()
    with torch.no_grad():
        full = model(batch)["mel"]
        n = int(batch["lengths"][2])
        frames = n // 160 + 1
        alone = model({"audio": batch["audio"][2:, :n], "lengths": batch["lengths"][2:],
                       "ref_emb": batch["ref_emb"][2:], "noise": batch["noise"][2:, :frames]})["mel"]
    # the content encoder's normalisation and the convolutions see only the row's frames (zero padding)
    torch.testing.assert_close(full[2, :frames - 3], alone[0, :frames - 3], atol=1e-4, rtol=1e-4)


def test_student_in_sample_mode_trains_on_the_teachers_trajectory() -> None:
    torch.manual_seed(0)
    teacher = VCFlow(**SMALL, sample_steps=4, vocoder="none").eval()
    student = VCFlow(**SMALL, sample_steps=1, train_mode="sample").train()
    batch = _batch()
    with torch.no_grad():
        t_out = teacher(batch)
    out = student(batch)
    assert "sample" in out and "v_pred" not in out
    loss = L.flow_trajectory(out, batch, t_out)
    loss.backward()
    assert torch.isfinite(loss) and student.out.weight.grad is not None


def test_dmd_moves_the_student_and_not_the_teacher_or_the_fake_score() -> None:
    torch.manual_seed(0)
    teacher = VCFlow(**SMALL, vocoder="none").eval().requires_grad_(False)
    fake = VCFlow(**SMALL, vocoder="none")
    fake.load_state_dict(teacher.state_dict())
    fake.requires_grad_(False)
    with torch.no_grad():  # a teacher that predicts something: its output layer is zero at init
        teacher.out.weight.normal_(0, 0.05)
        fake.out.weight.normal_(0, 0.02)
    student = VCFlow(**SMALL, sample_steps=1, train_mode="sample").train()
    batch = _batch()
    out = student(batch)
    loss = L.dmd(out, batch, teacher_model=teacher, modules={"fake_score": fake})
    loss.backward()
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    assert student.out.weight.grad is not None and float(student.out.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in fake.parameters())
    fake.requires_grad_(True)
    fl = L.dmd_fake_score({k: v.detach() for k, v in out.items()}, batch, modules={"fake_score": fake})
    fl.backward()
    assert fake.out.weight.grad is not None
    with pytest.raises(KeyError, match="fake_score"):
        L.dmd(out, batch, teacher_model=teacher, modules={})


def test_reverb_consistency_compares_reverberant_and_clean_content() -> None:
    torch.manual_seed(0)
    model = VCFlow(**SMALL).train()
    batch = _batch()
    rev = RoomReverb(sample_rate=SR, seed=3)({"audio": np.array(list(batch["audio"].numpy()), dtype=object)})
    batch["audio_reverb"] = torch.from_numpy(np.stack(list(rev["audio_reverb"])))
    out = model(batch)
    assert "content_clean" in out and not out["content_clean"].requires_grad
    loss = L.ir_consistency(out, batch)
    assert float(loss) > 0
    loss.backward()
    assert model.content.inp.weight.grad is not None
    assert float(L.ir_consistency(model(_batch()), batch)) == 0.0  # no reverberant copy: no loss


def test_room_reverb_is_seeded_aligned_and_keeps_the_peak() -> None:
    rng = np.random.default_rng(0)
    audio = np.zeros(8000, dtype=np.float32)
    audio[1000] = 0.5
    rir = room_impulse_response(np.random.default_rng(1), SR, (0.3, 0.3), ((4, 4), (4, 4), (3, 3)))
    again = room_impulse_response(np.random.default_rng(1), SR, (0.3, 0.3), ((4, 4), (4, 4), (3, 3)))
    assert np.array_equal(rir, again)
    low = room_impulse_response(np.random.default_rng(1), SR, (0.3, 0.3), ((4, 4), (4, 4), (3, 3)), max_order=8)
    late = int(0.1 * SR) + int(np.argmax(np.abs(rir)))  # 100 ms after the direct path
    assert (low[late:] ** 2).sum() < 0.5 * (rir[late:] ** 2).sum()  # a lower order cuts the late tail
    wet = reverberate(audio, rir)
    assert int(np.argmax(np.abs(wet))) == 1000  # the direct path stays where the source was
    assert np.isclose(np.abs(wet).max(), 0.5, atol=1e-6) and np.abs(wet[1100:]).sum() > 0  # a tail
    batch = {"id": np.array(["a", "b"]), "audio": np.array([rng.standard_normal(4000).astype(np.float32)] * 2,
                                                          dtype=object)}
    t = RoomReverb(sample_rate=SR, seed=0)
    one, two = t(batch, epoch=0), t(batch, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(one["audio_reverb"], two["audio_reverb"], strict=True))
    assert not np.array_equal(one["audio_reverb"][0], one["audio_reverb"][1])  # a fresh room per row
    assert not np.array_equal(t(batch, epoch=1)["audio_reverb"][0], one["audio_reverb"][0])
    with pytest.raises(ValueError, match="rt60"):
        RoomReverb(rt60=(0.5, 0.1), sample_rate=SR)
    with pytest.raises(ValueError, match="max_order"):
        RoomReverb(max_order=0, sample_rate=SR)


def test_flow_noise_matches_the_models_frames_and_is_reproducible() -> None:
    batch = {"id": np.array(["x", "y"]),
             "audio": np.array([np.zeros(16000, np.float32), np.zeros(8000, np.float32)], dtype=object)}
    t = FlowNoise(sample_rate=SR, seed=1)
    out = t(batch)
    assert [n.shape for n in out["noise"]] == [(101, 80), (51, 80)]
    assert np.array_equal(out["noise"][1], t(batch)["noise"][1])


def test_the_vocoder_stays_out_of_the_state_dict() -> None:
    model = VCFlow(**SMALL, sample_steps=1).eval()
    keys = set(model.state_dict())
    with torch.no_grad():
        model(_batch())  # builds Griffin-Lim
    assert set(model.state_dict()) == keys and not any("griffin" in k or "vocoder" in k for k in keys)


def test_reference_stats_ignore_padding_and_condition_the_flow() -> None:
    g = torch.Generator().manual_seed(5)
    t = torch.arange(24000) / SR
    envelope = 0.6 + 0.4 * torch.sin(2 * np.pi * 3 * t)  # voiced-like harmonics: the speaker encoder hears speech
    refs = 0.2 * torch.stack([sum(torch.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8)) * envelope
                              for f0 in (110.0, 160.0, 220.0)])
    lengths = torch.tensor([24000, 17000, 9000])
    refs = refs * (torch.arange(24000)[None] < lengths[:, None])
    stats = reference_stats(refs, lengths)
    assert stats.shape == (3, 160) and torch.isfinite(stats).all()
    for i in range(3):  # a row alone, unpadded, gives its values in the padded batch
        assert torch.equal(stats[i], reference_stats(refs[i: i + 1, : int(lengths[i])])[0])
    loud = torch.zeros(1, 16000)
    loud[0, 8000:] = 0.1 * torch.randn(8000, generator=g)
    voiced = reference_stats(loud[:, 8000:])
    assert torch.allclose(reference_stats(loud), voiced, atol=0.2)  # silent frames are left out of the statistics
    encoded = SpeakerEncoder(stats=True)({"reference": refs, "reference_lengths": lengths})
    assert torch.equal(encoded["ref_stats"], stats) and encoded["ref_emb"].shape == (3, 256)

    torch.manual_seed(0)
    model = VCFlow(**SMALL, sample_steps=2, vocoder="none", reference_stats=True).eval()
    torch.nn.init.normal_(model.out.weight, std=0.05)  # the flow starts at v = 0: give it a velocity
    batch = {**_batch(3), "ref_stats": stats}
    with torch.no_grad():
        mel = model(batch)["mel"]
        assert (model({**batch, "ref_stats": stats.flip(0)})["mel"] - mel).abs().max() > 1e-3
    with pytest.raises(KeyError, match="stats: true"):
        model({k: v for k, v in batch.items() if k != "ref_stats"})
    with pytest.raises(ValueError, match="default mel sizes"):
        VCFlow(**SMALL, n_mels=64, reference_stats=True)
