"""configs/pipelines/music_lora_tiny.yaml end to end on local Ray, cut short (tests/integration/_recipes.py):
the cache phases' outputs are what the generator reads, a second run of the pipeline reuses the latents with no
encoder forward pass (the autoencoder retrains to the same weights, bit for bit) while an encoder trained
otherwise invalidates them, the LoRA phase trains only its adapters, and `raytrain infer` sings lyrics from
a prompt with the base, the merged and the unmerged adapter. A song manifest with a missing audio file, a
float sketch and a sketch of the wrong length: rejects named by their JSONL lines, the good rows kept, and a
length check that stops the pipeline before the generator, naming the row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from raytrain.checkpoints import load_weights
from raytrain.config import load_config
from raytrain.pipeline import PipelineRunner

from ._recipes import yaml_of

RECIPE = "music_lora_tiny"
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def music_run(recipe_run: Any) -> dict[str, Any]:
    return recipe_run(RECIPE)


def test_the_generator_reads_the_cached_latents_and_sketches(music_run: dict[str, Any]) -> None:
    s, root = music_run["summary"], music_run["root"]
    latents, sketch = s["phases"]["latents"], s["phases"]["sketch"]
    cache = (root / "cache").resolve()
    for name, folder in {**latents["datasets"], **sketch["datasets"]}.items():
        assert Path(folder).resolve().is_relative_to(cache), (name, folder)
    manifest = json.loads((Path(sketch["datasets"]["en_gen"]) / "_manifest.json").read_text())
    roles = manifest["roles"]
    assert roles["latent"]["role"] == "features" and roles["latent"]["frame_rate"] == 25
    assert roles["sketch"]["role"] == "tokens" and {"prompt_emb", "text", "line"} <= set(roles)
    m = sketch["final_metrics"]
    assert m["cache/length_mismatches"] == 0 and m["cache/length_checked"] == sum(
        json.loads((Path(f) / "_manifest.json").read_text())["rows"] for f in sketch["datasets"].values())
    assert 0 < m["cache/en_dev_gen/sketch_usage"] <= 1 and m["cache/en_dev_gen/sketch_perplexity"] >= 1
    # the generator's data are the sketch phase's outputs: the run's config names them, the phase trained on them
    gen = load_config(music_run["run_dir"] / "config.yaml").phase("generator")
    assert [t.name for t in gen.train] == ["en_gen"] and gen.eval == "en_dev_gen"
    assert s["phases"]["generator"]["steps"] == music_run["steps"]


def test_a_second_run_reuses_the_latents_and_a_retrained_encoder_does_not(music_run: dict[str, Any]) -> None:
    first = music_run["summary"]["phases"]["latents"]
    assert first["forward_passes"] > 0

    def again(*extra: str) -> dict[str, Any]:
        overrides = [*music_run["overrides"], *extra]
        runner = PipelineRunner(load_config(yaml_of(RECIPE), overrides), progress=False,
                                only=["autoencoder", "latents"])
        return runner.run()["phases"]

    second = again()
    assert second["autoencoder"]["best_checkpoint"] != music_run["summary"]["phases"]["autoencoder"]["best_checkpoint"]
    assert second["latents"]["forward_passes"] == 0 and second["latents"]["datasets"] == first["datasets"]
    other = again("phases.autoencoder.optim.lr=3.0e-3")  # another encoder: every song encoded again
    assert other["latents"]["forward_passes"] == first["forward_passes"]
    assert set(other["latents"]["datasets"].values()).isdisjoint(first["datasets"].values())


def test_lora_trains_only_adapters_and_infer_sings(music_run: dict[str, Any], tmp_path: Path) -> None:
    from raytrain.cli import main

    s, run_dir = music_run["summary"], music_run["run_dir"]
    lora, base = s["phases"]["lora_ft"], s["phases"]["generator"]
    merged, start = load_weights(lora["best_checkpoint"]), load_weights(base["best_checkpoint"])
    assert merged.keys() == start.keys()  # merged under the base model's names
    adapter = torch.load(Path(lora["best_checkpoint"]).with_name("adapter.pt"), weights_only=True)
    assert adapter["weights"] and all("lora_" in k for k in adapter["weights"]) and "base_weights" not in adapter
    changed = [k for k in start if not torch.equal(merged[k], start[k])]
    assert changed and all(".attn." in k or ".cross." in k or ".ff" in k for k in changed), changed
    assert all(k.endswith(".weight") for k in changed)  # adapters merge into Linear weights; biases untouched

    prompt = next((music_run["root"] / "raw" / "en" / "prompts").glob("*.wav"))
    outs = {}
    for name, args in {"lora": [], "base": ["--phase", "generator"],
                       "adapter": ["--phase", "generator", "--adapter",
                                   str(Path(lora["best_checkpoint"]).with_name("adapter.pt"))]}.items():
        out = tmp_path / f"{name}.wav"
        assert main(["infer", str(run_dir), "--lyrics", "[verse] light on the river [chorus] home",
                     "--prompt", str(prompt), "--seconds", "2", "-o", str(out), *args]) == 0
        wave, sr = sf.read(str(out))
        assert sr == 16000 and abs(len(wave) - 2 * sr) <= 800 and np.isfinite(wave).all() and np.abs(wave).max() > 0.01
        outs[name] = wave
    assert np.abs(outs["lora"] - outs["adapter"]).max() < 1e-3  # merged and unmerged adapters sing alike
    assert np.abs(outs["lora"] - outs["base"]).max() > 1e-3  # and not as the base model does
    assert main(["infer", str(run_dir), "--lyrics", "la", "--prompt", str(tmp_path / "none.wav"), "-o",
                 str(tmp_path / "x.wav")]) == 2


def test_a_bad_song_manifest_is_reported_by_line_and_stops_before_the_generator(
        music_run: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    """dummy-songs' JSONL with one song's audio deleted, one float sketch and one sketch a second short: the
    prep keeps the good rows and names the two rejects by line; the latents cache, verifying the manifest's
    sketches against the latents, names the third and stops the run before the generator trains."""
    from datasets_prep.prep import run_prep
    from datasets_prep.songs import write_dummy_songs
    from raytrain.phases.base import PipelineError

    raw = tmp_path / "raw"
    write_dummy_songs(raw, num_samples=6, duration_sec=2.0, prompt_sec=1.0, sketch_fps=25, sketch_format="npy", seed=1)
    lines = [json.loads(x) for x in (raw / "songs.jsonl").read_text().splitlines()]
    (raw / lines[1]["audio_path"]).unlink()  # line 2: missing audio
    np.save(raw / lines[3]["sketch_path"], np.linspace(0, 1, 50))  # line 4: a float sketch
    np.save(raw / lines[4]["sketch_path"], np.zeros(25, dtype=np.int64))  # line 5: 1 s of sketch for 2 s
    prep = tmp_path / "prep.yaml"
    prep.write_text(json.dumps({"name": "bad_songs", "sample_rate": 16000, "output_dir": str(tmp_path / "shards"),
                                "input": {"format": "jsonl", "path": str(raw / "songs.jsonl")},
                                "steps": ["resample", "normalize"], "workers": 0}))
    run_prep(prep)
    out = capsys.readouterr().out
    assert "songs.jsonl:2" in out and "songs.jsonl:4" in out and "integers" in out
    manifest = json.loads((tmp_path / "shards" / "_manifest.json").read_text())
    assert manifest["rows"] == 4 and {"sketch", "prompt", "line"} <= set(manifest["roles"])

    ae = load_config(yaml_of(RECIPE), music_run["overrides"]).phase("latents")
    runs = tmp_path / "runs"
    cfg = load_config(raw={
        "name": "bad_songs", "seed": 0, "runs_dir": str(runs), "tracking": {"enabled": False},
        "data": {"songs": {"shards": str(tmp_path / "shards")}},
        "model": {"name": "music_generator", "args": {"latent_dim": ae.model.args["latent_dim"], "d_model": 16,
                                                      "layers": 1, "text_layers": 1, "heads": 2, "ff": 32}},
        "phases": [
            {"name": "latents", "kind": "cache", "init_from": {"path": music_run["summary"]["phases"]["autoencoder"]
                                                                ["best_checkpoint"]},
             "model": ae.model.model_dump(), "datasets": {"songs": "songs_lat"},
             "columns": {"latent": {"role": "features", "frame_rate": 25}, "prompt_emb": {"role": "features"}},
             "carry": ["sketch", "text", "line"], "cache_dir": str(runs / "cache"), "verify_lengths": "all",
             "length_columns": ["sketch", "latent"], "length_tolerance": 1, "require_length_match": True},
            {"name": "generator", "train": ["songs_lat"], "transforms": [{"name": "lyrics_tokens"}],
             "losses": {"latent_mse": 1.0}, "batch_size": 2, "max_steps": 2},
        ]})
    with pytest.raises(PipelineError, match=r"1 of 4 rows checked.*songs\.jsonl:5"):
        PipelineRunner(cfg, progress=False).run()
    summary = json.loads(next(runs.glob("bad_songs/*/summary.json")).read_text())
    assert summary["phases"]["latents"]["status"] == "failed"
    assert summary["phases"].get("generator", {}).get("status", "pending") == "pending"
