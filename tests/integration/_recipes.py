"""The tiny recipes with their data shrunk and their steps cut, run once per test session and shared by
test_recipes.py (every phase of every recipe) and the recipe-specific tests (test_streaming_asr.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets_prep.prep import run_prep
from raytrain.config import load_config
from raytrain.pipeline import PipelineRunner

ROOT = Path(__file__).resolve().parents[2]
ASR_TINY_MODEL = {"d_model": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 2, "n_mels": 40}
VC_TINY_MODEL = {"hidden": 16, "layers": 2, "content_hidden": 16, "content_layers": 1, "content_dim": 8,
                 "griffin_lim_iters": 4}
MUSIC_TINY_MODEL = {"d_model": 32, "layers": 1, "text_layers": 1, "heads": 2, "ff": 64}
AV_TINY_MODEL = {"visual_channels": "[4, 8, 8]", "visual_dim": 16,
                 "separator": "{n_fft: 256, hop: 128, band: 8, dim: 16, blocks: 1, heads: 2, ff: 32}",
                 "encoder": "{n_mels: 20, d_model: 32, heads: 2, ffn: 64, layers: 1, conv_kernel: 7}"}
AV_TINY_CORPUS = {"train_voices": 3, "dev_voices": 2, "train_sentences": 8, "dev_sentences": 4,
                  "utterances_per_voice": 3, "dev_utterances_per_voice": 3, "mixtures_per_utterance": 1,
                  "dev_mixtures": 6}

# Per recipe: prep overrides that shrink its corpus, pipeline overrides beyond the cut steps (a smaller
# model, a gate the cut run cannot be held to), and the steps every train phase is cut to.
RECIPES: dict[str, dict[str, Any]] = {
    "separation_tiny": {
        "prep": {"generator.train_voices": 6, "generator.dev_voices": 2, "generator.train_sentences": 24,
                 "generator.dev_sentences": 8, "generator.utterances_per_voice": 4, "dev_mixtures.num": 6,
                 "dev_mixtures.max_seconds": 1.5, "rows_per_shard": 8, "workers": 0},
        "overrides": ["model.args.msk_num_layers=2", "model.args.msk_num_stacks=1", "defaults.batch_size=4",
                      "defaults.shuffle_buffer=16", "phases.long.gates=[{metric: eval/si_sdri, min: -100.0}]"],
        "steps": 6,
    },
    "streaming_asr_tiny": {
        "prep": {"generator.train_voices": 4, "generator.train_sentences": 24, "generator.utterances_per_voice": 6,
                 "generator.dev_sentences": 4, "generator.test_sentences": 4, "generator.eval_voices": 3,
                 "generator.eval_utterances_per_voice": 2, "generator.heldout_voices": 2,
                 "generator.vocabulary_size": 400, "rows_per_shard": 8, "workers": 0},
        "overrides": [f"{key}.{k}={v}" for key in ("model.args", "phases.emformer_heads.model.args",
                                                   "phases.emformer_full.model.args")
                      for k, v in ASR_TINY_MODEL.items()]
        + ["defaults.batch_size=4", "defaults.shuffle_buffer=16",
           "phases.test.gates=[{metric: eval/cer, max: 10.0}]",
           "phases.test_heldout.gates=[{metric: eval/cer, max: 10.0}]"],
        "steps": 6,
    },
    "vc_flow_tiny": {
        "prep": {**{f"generator.corpora.{c}.{k}": v for c in ("vctk", "second", "libri")
                    for k, v in (("voices", 3), ("sentences", 2), ("utterances_per_voice", 2))},
                 "generator.dev_voices": 4, "generator.dev_sentences": 2, "generator.dev_triples": 4,
                 "generator.dev_self_triples": 2, "generator.pairs_per_sentence": 3, "rows_per_shard": 8,
                 "workers": 0},
        "overrides": [f"{key}.{k}={v}" for key in ("model.args", "phases.distill_a.model.args",
                                                   "phases.distill_b.model.args",
                                                   "phases.distill_b.modules.fake_score.model.args")
                      for k, v in VC_TINY_MODEL.items()]
        # the teacher (and the fake score, its copy) 3 blocks, the student its first 2, as the recipe cuts 6 to 4
        + [f"{key}.layers=3" for key in ("model.args", "phases.distill_b.modules.fake_score.model.args")]
        + ['phases.distill_a.init_from.exclude=["blocks.2.*"]',
           "defaults.batch_size=2", "defaults.eval_batch_size=2", "defaults.shuffle_buffer=16",
           "phases.phase0.gates=[{metric: eval/secs, min: -1.0}]",
           # DNSMOS (~1 s a clip) only where the gate reads it: phase1b; the relative gates on SECS
           *[f"phases.{p}.metrics=[secs_gender, mcd]" for p in ("phase2", "distill_a", "distill_b")],
           "phases.phase1b.gates=[{metric: eval/secs, min: -1.0}, {metric: eval/dnsmos, min: 0.0}]",
           "phases.phase2.gates=[{metric: eval/secs_gain, min: -2.0}, {metric: eval/mcd_ratio, max: 100.0}]",
           "phases.phase2_rooms.gates=[{metric: eval/secs, min: -2.0, relative_to: phase1b_rooms}]",
           "phases.distill_b.gates=[{metric: eval/secs, min: -2.0, relative_to: phase2}]"],
        "steps": 4,
    },
    "music_lora_tiny": {
        "prep": {**{f"generator.corpora.{c}.{k}": v for c in ("en", "es") for k, v in (("singers", 5), ("songs", 10))},
                 "generator.duration_sec": 3.0, "generator.prompt_sec": 2.0, "rows_per_shard": 8, "workers": 0,
                 "generator.workers": 1},
        "overrides": [f"model.args.{k}={v}" for k, v in MUSIC_TINY_MODEL.items()]
        + [f"phases.{p}.model.args.hidden=16" for p in ("autoencoder", "latents")]
        + ["defaults.batch_size=4", "defaults.eval_batch_size=4", "defaults.shuffle_buffer=16",
           "phases.latents.batch_size=4", "phases.sketch.batch_size=4",
           "phases.lora_ft.gates=[{metric: eval/latent_mse, max: 100.0, ratio_to: base_es}]"],
        "steps": 4,
    },
    "av_tse_asr_tiny": {
        "prep": {**{f"generator.corpora.{c}.{k}": v for c in ("main", "second") for k, v in AV_TINY_CORPUS.items()},
                 "rows_per_shard": 8, "workers": 0, "generator.workers": 1},
        "overrides": [f"{key}.{k}={v}" for key in ("model.args", "phases.pretrain.model.args", "phases.tse.model.args")
                      for k, v in AV_TINY_MODEL.items()]
        + ["defaults.batch_size=3", "defaults.eval_batch_size=3", "defaults.shuffle_buffer=16",
           "phases.tse.gates=[{metric: eval/si_sdri, min: -100.0}]",
           *[f"phases.{p}.gates=[{{metric: eval/si_sdri, max: 100.0, relative_to: multitask}}]"
             for p in ("swapped_video", "zero_video")],
           "phases.ft_second_corpus.gates=[{metric: eval/cer, max: 10.0, relative_to: multitask_second}]"],
        "steps": 4,
    },
}


def yaml_of(recipe: str) -> Path:
    return ROOT / "configs" / "pipelines" / f"{recipe}.yaml"


def prepare(recipe: str, root: Path) -> Path:
    """The recipe's own prep config, shrunk by its RECIPES overrides, into `root`/raw and `root`/shards."""
    run_prep(ROOT / "configs" / "prep" / f"{recipe}.yaml",
             overrides={"raw_dir": str(root / "raw"), "output_dir": str(root / "shards"), **RECIPES[recipe]["prep"]})
    return root / "shards"


def data_overrides(recipe: str, shards: Path) -> list[str]:
    """Each dataset's shards at the same place under the test's prepared folder (its path below the recipe's
    prep output_dir: `dev`, `vctk/pairs`)."""
    from datasets_prep.prep import load_prep_config

    out_dir = Path(load_prep_config(ROOT / "configs" / "prep" / f"{recipe}.yaml").output_dir)
    return [f"data.{name}.shards={shards / Path(d.shards).relative_to(out_dir)}"
            for name, d in load_config(yaml_of(recipe)).data.items()]


def cut_overrides(recipe: str, steps: int) -> list[str]:
    """`-o` overrides that cut every train phase to `steps` steps, evaluated at the end, checkpointed
    halfway and at the end, logged every step."""
    out = []
    for phase in load_config(yaml_of(recipe)).phases:
        if phase.trains:
            p = f"phases.{phase.name}"
            out += [f"{p}.max_steps={steps}", f"{p}.eval_every={steps}", f"{p}.checkpoint_every={max(1, steps // 2)}",
                    f"{p}.log_every=1"]
            if phase.schedule.warmup_steps:
                out.append(f"{p}.schedule.warmup_steps=2")
    return out


def base_overrides(recipe: str, root: Path, runs: Path) -> list[str]:
    """Data prepared under `root`, runs and MLflow under `runs`, cache phases' datasets under `root`/cache, the
    recipe's test-size overrides."""
    caches = [f"phases.{p.name}.cache_dir={root / 'cache'}" for p in load_config(yaml_of(recipe)).phases
              if p.kind == "cache"]
    return [*data_overrides(recipe, root / "shards"), f"runs_dir={runs}", f"tracking.uri=sqlite:///{runs / 'mlflow.db'}",
            *caches, *RECIPES[recipe]["overrides"]]


def run_recipe(recipe: str, root: Path) -> dict[str, Any]:
    """Run the recipe, prepared under `root` by `prepare`, cut short; returns what its tests inspect."""
    shards, runs = root / "shards", root / "runs"
    spec = RECIPES[recipe]
    overrides = [*base_overrides(recipe, root, runs), *cut_overrides(recipe, spec["steps"])]
    cfg = load_config(yaml_of(recipe), overrides)
    runner = PipelineRunner(cfg, progress=False)
    summary = runner.run()
    return {"summary": summary, "run_dir": runner.run_dir, "cfg": cfg, "overrides": overrides, "runs": runs,
            "root": root, "shards": shards, "steps": spec["steps"]}
