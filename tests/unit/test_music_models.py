"""The music_lora models (raytrain.models.music): lengths the cache phases write side by side, lyrics tokens,
the generator with and without a sketch, and the generator under the recipe's LoRA (what trains, what the
adapter changes in eval, merging)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raytrain.config import load_config
from raytrain.losses import LOSSES
from raytrain.models import build_model
from raytrain.models.music import LYRIC_CHARS, TAGS, latent_frames, lyrics_ids

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "pipelines" / "music_lora_tiny.yaml"
SMALL = {"latent_dim": 8, "codebook_size": 16, "d_model": 32, "layers": 2, "text_layers": 1, "heads": 2, "ff": 64}


@pytest.mark.parametrize("samples", [16000, 16159, 16160, 48000, 95999, 96000])
def test_latents_and_sketch_have_one_frame_each_per_40_ms(samples: int) -> None:
    """The autoencoder's latents and the sketch codes of the same audio have the same number of frames (the
    sketch cache phase verifies it on every row), and the collate's lengths say the same."""
    torch.manual_seed(0)
    audio = torch.randn(2, 96000) * 0.1
    lengths = torch.tensor([samples, 96000])
    ae = build_model("music_ae", {"hidden": 16, "latent_dim": 4, "blocks": 1, "mode": "encode"}).eval()
    vq = build_model("sketch_vq", {"codebook_size": 8, "dim": 4}).eval()
    with torch.no_grad():
        lat, sk = ae({"audio": audio, "lengths": lengths}), vq({"audio": audio, "lengths": lengths})
    assert lat["latent_lengths"].tolist() == sk["sketch_lengths"].tolist() == [latent_frames(samples), 601 // 4 + 1]
    assert lat["latent"].shape[1] == sk["sketch"].shape[1]
    assert float(lat["latent"][0, latent_frames(samples):].abs().sum()) == 0.0  # padding holds nothing


def test_prompt_embedding_ignores_padding() -> None:
    """Batch padding changes a prompt's embedding only through the last STFT frames (centred frames past
    the end see reflected samples alone, zeros when padded): every layer is masked, no norm spans time."""
    torch.manual_seed(0)
    ae = build_model("music_ae", {"hidden": 16, "latent_dim": 4, "blocks": 1, "mode": "encode"}).eval()
    prompt = torch.randn(1, 32000) * 0.1
    with torch.no_grad():
        alone = ae.prompt_embedding(prompt, torch.tensor([32000]))
        padded = ae.prompt_embedding(torch.cat([prompt, torch.zeros(1, 16000)], 1), torch.tensor([32000]))
    assert alone.shape == (1, 8)
    torch.testing.assert_close(alone, padded, atol=1e-3, rtol=1e-2)


def test_lyrics_tokens_keep_tags_words_and_spaces() -> None:
    ids = lyrics_ids("[Verse] Light  on the RIVER! [chorus] la")
    tag = {t: len(LYRIC_CHARS) + 1 + i for i, t in enumerate(TAGS)}
    assert ids[0] == tag["[verse]"] and tag["[chorus]"] in ids.tolist()
    text = "".join(LYRIC_CHARS[i - 1] if i <= len(LYRIC_CHARS) else "|" for i in ids[1:])
    assert text == "light on the river|la"
    assert lyrics_ids("").tolist() == [1]  # never empty: attention needs a key


def test_frame_words_follow_the_word_times_and_the_crop() -> None:
    from raytrain.data.aligned import AlignedCrop
    from raytrain.models.music import LyricsTokens, frame_words, word_starts

    ids = lyrics_ids("[verse] light on [chorus] river")
    assert word_starts(ids) == [1, 7, 10]  # after the tag; "on" after a space; "river" after the second tag
    got = frame_words(ids, [(0.0, 0.4), (0.4, 0.8), (1.0, 1.2)], 35, 25.0)
    assert got[:10].tolist() == [2] * 10 and got[10:20].tolist() == [8] * 10 and got[20:25].tolist() == [0] * 5
    assert got[25:30].tolist() == [11] * 5 and got[30:].tolist() == [0] * 5
    assert frame_words(ids, None, 9, 25.0).tolist() == [2, 2, 2, 8, 8, 8, 11, 11, 11]  # no times: evenly
    with pytest.raises(ValueError, match="2 words, the lyrics 3"):
        frame_words(ids, [(0.0, 0.4), (0.4, 0.8)], 35, 25.0)
    # after a crop from 0.4 s, frame 0 is the second word's
    lat = np.empty(1, dtype=object)
    lat[0] = np.zeros((50, 2), dtype=np.float32)
    batch = {"text": np.array(["[verse] light on [chorus] river"]), "word_times": np.array(["0-0.4 0.4-0.8 1.0-1.2"]),
             "latent": lat, "id": np.array(["a"])}
    specs = {"latent": {"role": "features", "frame_rate": 25.0, "dims": 2}}
    for _ in range(20):
        cropped = AlignedCrop(seconds=1.0, columns=["latent"], sample_rate=16000, seed=_)(batch, 0, specs)
        out = LyricsTokens(align=True, sample_rate=16000, seed=0)(cropped)
        start = float(cropped["crop_start"][0])
        assert len(out["frame_word"][0]) == 25
        assert out["frame_word"][0].tolist() == frame_words(out["lyrics"][0], [(0.0, 0.4), (0.4, 0.8), (1.0, 1.2)],
                                                            25, 25.0, start).tolist()
        if start == 0.4:
            assert out["frame_word"][0][0] == 8


def test_generator_trains_on_latents_and_generates_without_a_sketch() -> None:
    torch.manual_seed(0)
    gen = build_model("music_generator", {**SMALL, "dropout": 0.0, "sketch_dropout": 0.0, "aligned_lyrics": True})
    batch = {"lyrics": torch.from_numpy(np.stack([lyrics_ids("[verse] la la la")] * 2)),
             "sketch": torch.randint(0, 16, (2, 30)), "sketch_lengths": torch.tensor([30, 20]),
             "prompt_emb": torch.randn(2, 16), "latent": torch.randn(2, 30, 8), "latent_lengths": torch.tensor([30, 20])}
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = LOSSES.get("latent_mse")(gen(batch), batch)
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first
    gen.eval()
    out = gen({"lyrics": batch["lyrics"][:1], "prompt_emb": batch["prompt_emb"][:1], "frames": torch.tensor([25])})
    assert out["latent_pred"].shape == (1, 25, 8) and torch.isfinite(out["latent_pred"]).all()
    assert float(gen(batch)["latent_pred"][1, 20:].abs().sum()) == 0.0  # frames past a row's length are zero
    words = {**batch, "frame_word": torch.tensor([[2] * 15 + [5] * 15] * 2)}
    assert not torch.equal(gen(words)["latent_pred"], gen(batch)["latent_pred"])  # aligned words are heard


@pytest.fixture
def recipe_lora() -> tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor]]:
    """The tiny recipe's generator (its own sizes) and lora_ft's adapters, with trained-looking (non-zero) B."""
    from raytrain.lora import add_lora

    cfg = load_config(TINY)
    phase = cfg.phase("lora_ft")
    torch.manual_seed(0)
    base = build_model(cfg.model.name, dict(cfg.model.args)).eval()
    adapted = build_model(cfg.model.name, dict(cfg.model.args))
    adapted.load_state_dict(base.state_dict())
    add_lora(adapted, phase.lora)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    torch.manual_seed(1)
    batch = {"lyrics": torch.from_numpy(np.stack([lyrics_ids("[verse] bala tine sor")] * 2)),
             "sketch": torch.randint(0, 64, (2, 40)), "prompt_emb": torch.randn(2, 32)}
    return base, adapted.eval(), batch


def test_recipe_lora_trains_under_10_percent_and_changes_eval_outputs(recipe_lora) -> None:
    from raytrain.lora import adapters_disabled, count_params

    base, adapted, batch = recipe_lora
    trainable, total = count_params(adapted)
    assert 0 < trainable <= 0.10 * total, (trainable, total)
    assert all("lora_" in n for n, p in adapted.named_parameters() if p.requires_grad)
    with torch.no_grad():
        want = base(batch)["latent_pred"]
        with adapters_disabled(adapted):
            off = adapted(batch)["latent_pred"]
        on = adapted(batch)["latent_pred"]
    assert torch.equal(off, want)  # adapters disabled: bitwise the base model
    assert float((on - want).abs().max()) > 1e-3  # the adapters act in eval (no fused path skips them)


def test_recipe_lora_merged_matches_unmerged_in_eval(recipe_lora) -> None:
    from raytrain.config.schema import LoraSpec
    from raytrain.lora import merged_state

    cfg = load_config(TINY)
    spec: LoraSpec = cfg.phase("lora_ft").lora
    _, adapted, batch = recipe_lora
    merged = build_model(cfg.model.name, dict(cfg.model.args))
    merged.load_state_dict(merged_state(build_model(cfg.model.name, dict(cfg.model.args)), spec,
                                        adapted.state_dict()))
    with torch.no_grad():
        a, b = adapted(batch)["latent_pred"], merged.eval()(batch)["latent_pred"]
    assert float((a - b).abs().max()) <= 1e-5
