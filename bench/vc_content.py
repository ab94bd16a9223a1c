"""Why vc_flow's content features: how much of the source's voice they still carry, frame by frame.

    python bench/vc_content.py RUN_DIR [--phase phase2] [--utterances 400] [--frames 24]

A voice-conversion content feature must keep what is said and drop who says it: whatever voice the
features still carry, the flow can copy into the output instead of the target's. This probe measures
the second half. From the training corpora of a finished vc_flow_tiny run (the `embed` phase's outputs),
it takes each distinct source utterance and, from its voiced frames (log-mel energy above the
utterance's median), `--frames` frames at random; a linear classifier (scikit-learn's logistic
regression on standardised features) learns the speaker from the frames of half of every speaker's
utterances and is scored on the frames of the other half. Three features, same frames:

- `log-mel`: the source's 80 log-mel bands (what the model reads);
- `normalised log-mel`: per utterance and band to zero mean, unit variance over time (the content
  encoder's first step: it removes the long-term spectral envelope);
- `content`: the trained content encoder's bottleneck (`content_dim` per frame).

Printed: the speaker accuracy of each against chance (1 / speakers). Lower is more speaker-independent.
The first half (what is said) is measured by the recipe itself: converted speech scored against the
parallel reference (MCD) and the target's SECS.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def source_utterances(run_dir: Path, limit: int) -> list[dict[str, Any]]:
    """Distinct source utterances (audio, speaker) of the run's training corpora, round-robin over corpora."""
    import pyarrow.parquet as pq

    from datasets_prep.manifest import read_manifest, shard_paths
    from raytrain.data.datasets import audio_spec
    from raytrain.data.stream import Collate

    summary = json.loads((run_dir / "summary.json").read_text())
    datasets = summary["phases"]["embed"]["datasets"]
    per_corpus: list[list[dict[str, Any]]] = []
    for name in ("vctk", "second", "libri"):
        folder = datasets[name]
        manifest = read_manifest(folder)
        collate = Collate([], epoch=0, audio=audio_spec(manifest))  # decodes the stored audio as training does
        seen: set[str] = set()
        rows = []
        for path in shard_paths(folder, manifest):
            table = pq.read_table(path, columns=["id", "speaker", "audio"])
            for i in range(table.num_rows):
                key = str(table.column("id")[i].as_py()).split("|")[0]
                if key in seen:
                    continue
                seen.add(key)
                batch = collate({"audio": table.column("audio").slice(i, 1).to_numpy(zero_copy_only=False)})
                n = int(batch["lengths"][0])
                rows.append({"id": key, "speaker": f"{name}/{table.column('speaker')[i].as_py()}",
                             "audio": batch["audio"][0, :n].numpy()})
        per_corpus.append(rows)
    out: list[dict[str, Any]] = []
    for i in range(max(len(r) for r in per_corpus)):
        out.extend(r[i] for r in per_corpus if i < len(r))
    return out[:limit]


def features(model: Any, audio: np.ndarray, rng: np.random.Generator, frames: int) -> dict[str, np.ndarray] | None:
    import torch

    with torch.no_grad():
        x = torch.from_numpy(audio)[None]
        logmel = model.logmel(x)  # (1, frames, n_mels)
        mask = torch.ones(1, logmel.shape[1], dtype=torch.bool)
        content = model.content(logmel, mask)[0].T  # (frames, content_dim)
        mel = logmel[0]
        norm = (mel - mel.mean(0)) / mel.std(0).clamp_min(1e-5 ** 0.5)
    energy = mel.logsumexp(-1)
    voiced = torch.nonzero(energy > energy.median()).flatten().numpy()
    if len(voiced) < frames:
        return None
    pick = rng.choice(voiced, frames, replace=False)
    return {"log-mel": mel.numpy()[pick], "normalised log-mel": norm.numpy()[pick], "content": content.numpy()[pick]}


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--phase", default="phase2")
    ap.add_argument("--utterances", type=int, default=400)
    ap.add_argument("--frames", type=int, default=24, help="voiced frames drawn per utterance")
    args = ap.parse_args(argv)

    import torch

    from raytrain.checkpoints import load_weights
    from raytrain.config import load_config
    from raytrain.models import build_model

    torch.set_num_threads(1)
    cfg = load_config(args.run_dir / "config.yaml")
    mcfg = cfg.phase_model(cfg.phase(args.phase))
    model = build_model(mcfg.name, dict(mcfg.args), mcfg.adapter)
    model.load_state_dict(load_weights(args.run_dir / args.phase / "best" / "model.pt"))
    model.eval()
    rng = np.random.default_rng(0)
    utts = source_utterances(args.run_dir, args.utterances)
    by_speaker: dict[str, int] = {}
    ids: dict[str, int] = {}
    split: dict[str, dict[str, list[np.ndarray]]] = {"train": {}, "test": {}}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    for u in utts:
        feats = features(model, u["audio"], rng, args.frames)
        if feats is None:
            continue
        n = by_speaker.get(u["speaker"], 0)
        by_speaker[u["speaker"]] = n + 1
        part = "train" if n % 2 == 0 else "test"  # every other utterance of a speaker: utterances never shared
        for name, f in feats.items():
            split[part].setdefault(name, []).append(f)
        labels[part].extend([ids.setdefault(u["speaker"], len(ids))] * args.frames)
    speakers = [s for s, n in by_speaker.items() if n >= 2]
    print(f"{sum(by_speaker.values())} source utterances of {len(by_speaker)} speakers ({len(speakers)} with 2 or "
          f"more), {args.frames} voiced frames each; the {args.phase} model of {args.run_dir}")
    print(f"speaker accuracy of a linear probe on one frame (chance {1 / max(len(by_speaker), 1):.3f}):")
    ytr, yte = np.asarray(labels["train"]), np.asarray(labels["test"])
    for name in ("log-mel", "normalised log-mel", "content"):
        acc = probe(np.concatenate(split["train"][name]), ytr, np.concatenate(split["test"][name]), yte)
        dim = split["train"][name][0].shape[1]
        print(f"  {name:<20} {dim:>3} dims  {acc:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
