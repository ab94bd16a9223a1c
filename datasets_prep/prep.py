"""``raytrain prep CONFIG``: raw corpus -> shard datasets, as one YAML-driven, restartable step.

For the separation recipes it writes three datasets under ``output_dir``:

- ``train``       speech shards of the train voices reading train sentences
- ``dev_speech``  speech shards of held-out voices (unseen timbres) reading held-out sentences
- ``dev``         fixed 2-speaker mixtures made only from ``dev_speech``

Every step is restartable: raw utterances already on disk are not re-synthesised,
finished shards are not rewritten, and a split whose manifest already records the same
prep parameters is skipped entirely.
"""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from datasets_prep.mixtures import mixture_params, write_fixed_mixtures
from datasets_prep.readers.espeak import generate_corpus, make_sentences, resample, split_voices, vocab_split
from datasets_prep.readers.speaker_dirs import read_speaker_dirs
from datasets_prep.shards import MANIFEST_NAME, ShardWriter, read_manifest, shard_paths


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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

    @model_validator(mode="after")
    def _enough_sentences(self) -> EspeakGenerator:
        n = min(self.train_sentences, self.dev_sentences)
        if self.utterances_per_voice > n:
            raise ValueError(f"utterances_per_voice={self.utterances_per_voice} exceeds train_sentences/"
                             f"dev_sentences ({n}): each voice reads distinct sentences")
        return self


class DevMixtures(_Strict):
    num: int = Field(default=100, ge=1)
    max_seconds: float = Field(default=4.0, gt=0)
    seed: int = 1
    snr_db: tuple[float, float] = (-2.5, 2.5)


class PrepConfig(_Strict):
    name: str
    sample_rate: int = Field(default=16000, gt=0)
    raw_dir: Path
    output_dir: Path
    generator: EspeakGenerator
    dev_mixtures: DevMixtures = Field(default_factory=lambda: DevMixtures())
    rows_per_shard: int = Field(default=200, ge=1)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
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
            key = ".".join(str(p) for p in err["loc"])
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                near = difflib.get_close_matches(str(err["loc"][-1]), _fields_at(PrepConfig, err["loc"]), n=1)
                msg = "unknown key" + (f" (did you mean {near[0]!r}?)" if near else "")
            lines.append(f"  {key}: {msg}")
        raise ValueError(f"invalid prep config {path}:\n" + "\n".join(lines)) from None


def _up_to_date(folder: Path, prep: dict) -> bool:
    if not (folder / MANIFEST_NAME).exists():
        return False
    return read_manifest(folder)["prep"] == json.loads(json.dumps(prep))


def _write_speech(raw: Path, out: Path, cfg: PrepConfig, prep: dict) -> dict:
    with ShardWriter(out, kind="speech", sample_rate=cfg.sample_rate, audio_columns=["audio"],
                     rows_per_shard=cfg.rows_per_shard, prep=prep) as writer:
        for rec in read_speaker_dirs(raw):
            audio = resample(rec["audio"], rec["sample_rate"], cfg.sample_rate)
            writer.write({"id": rec["id"], "speaker": rec["speaker"], "text": rec["text"], "audio": audio})
    return writer.manifest()


def _read_speech_shards(folder: Path) -> list[dict]:
    rows: list[dict] = []
    for p in shard_paths(folder, read_manifest(folder)):
        rows.extend(pq.read_table(p, columns=["id", "speaker", "audio", "sample_rate"]).to_pylist())
    return rows


def run_prep(config_path: str | Path, *, overrides: dict | None = None, root: Path | None = None) -> dict:
    """Generate, read back and shard every split; returns {"name", "output_dir", "splits", "seconds"}.

    Relative paths in the YAML resolve against ``root`` (default: the current directory).
    """
    t_all = time.perf_counter()
    cfg = load_prep_config(config_path, overrides)
    root = Path(root) if root is not None else Path.cwd()
    raw_dir = cfg.raw_dir if cfg.raw_dir.is_absolute() else root / cfg.raw_dir
    out_dir = cfg.output_dir if cfg.output_dir.is_absolute() else root / cfg.output_dir
    g = cfg.generator
    train_voices, dev_voices = split_voices(g.train_voices, g.dev_voices, g.seed, g.dev_variant_fraction,
                                            bases=g.language)
    train_slice, dev_slice = vocab_split(g.dev_vocab_fraction)
    base = {"name": cfg.name, "sample_rate": cfg.sample_rate, "rows_per_shard": cfg.rows_per_shard,
            "source": g.model_dump(mode="json", exclude={"workers"}, exclude_none=True)}
    plans = [
        ("train", train_voices, make_sentences(g.train_sentences, g.seed, train_slice)),
        ("dev_speech", dev_voices, make_sentences(g.dev_sentences, g.seed, dev_slice)),
    ]
    splits: dict[str, dict] = {}
    for split, voices, sentences in plans:
        t0 = time.perf_counter()
        out, prep = out_dir / split, {**base, "split": split}
        status = "up to date"
        if not _up_to_date(out, prep):
            generate_corpus(raw_dir / split, voices, g.utterances_per_voice, sentences, cfg.sample_rate,
                            g.seed, workers=g.workers, phonemes=g.phonemes)
            _write_speech(raw_dir / split, out, cfg, prep)
            status = "written"
        splits[split] = _summary(out, status, t0)

    t0 = time.perf_counter()
    m = cfg.dev_mixtures
    dev_prep = {**base, "split": "dev", "from": "dev_speech"}
    full = {"mixtures": mixture_params(m.num, m.seed, m.max_seconds, m.snr_db), **dev_prep}
    status = "up to date"
    if not _up_to_date(out_dir / "dev", full):
        write_fixed_mixtures(_read_speech_shards(out_dir / "dev_speech"), out_dir / "dev", num_mixtures=m.num,
                             seed=m.seed, sample_rate=cfg.sample_rate, max_seconds=m.max_seconds,
                             snr_db=m.snr_db, rows_per_shard=cfg.rows_per_shard, prep=dev_prep)
        status = "written"
    splits["dev"] = _summary(out_dir / "dev", status, t0)
    result = {"name": cfg.name, "output_dir": str(out_dir), "splits": splits,
              "seconds": round(time.perf_counter() - t_all, 1)}
    _print_table(result)
    return result


def _summary(folder: Path, status: str, t0: float) -> dict:
    man = read_manifest(folder)
    return {"path": str(folder), "status": status, "rows": man["rows"], "hours": man["hours"],
            "speakers": man["num_speakers"], "seconds": round(time.perf_counter() - t0, 1)}


def _print_table(result: dict) -> None:
    print(f"prep {result['name']} -> {result['output_dir']}")
    print(f"  {'split':<11} {'status':<10} {'rows':>6} {'hours':>7} {'speakers':>8} {'seconds':>8}")
    for split, s in result["splits"].items():
        print(f"  {split:<11} {s['status']:<10} {s['rows']:>6} {s['hours']:>7.3f} {s['speakers']:>8} "
              f"{s['seconds']:>8.1f}")
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
