"""`cache`: run a frozen model over datasets once and keep its outputs as new datasets.

The model (an earlier phase's weights or a checkpoint, `init_from`, or a `model:` that loads its own
pretrained weights, such as `speaker_encoder`) runs on one pool of Ray actors for all the phase's datasets
(one actor per worker of the phase's `scaling`, a GPU each when `use_gpu`; started once, not once per
dataset: an actor is a process that imports torch and loads the model), fed batches of the source read by
Ray Data, results in the source's order; each output dataset
holds the ids, the model outputs named in `columns` (cut to each row's length) and the source columns
named in `carry`, written by the one dataset writer (`datasets_prep.shards.DatasetWriter`) under
`<cache_dir>/<name>/<key>/`. The key is the sha256 of the source manifest, the weights file and the cache
phase's config: a later run with the same key reuses the folder with zero forward passes; another
checkpoint, source or config makes a new folder; `raytrain run --rebuild-cache` writes it again. Later
phases name the output like a `data:` entry, and `raytrain plan` knows its columns before it exists.

After writing or reusing a dataset the phase reads its shards back (cheap pyarrow reads of the written rows,
not the model's padded outputs) for two checks that are not part of the key: `verify_lengths` compares two
time columns' lengths row by row (`length_check.json` in the phase folder lists the rows that differ, with
their source manifest line when the rows have a `line`; `require_length_match` fails the phase on one), and
a tokens column with a `codebook_size` gets its codebook usage and code perplexity per dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raytrain.config.schema import CachePhaseConfig, PipelineConfig
from raytrain.phases.base import (
    DatasetUse,
    Needs,
    PhaseContext,
    PhaseKind,
    PipelineError,
    Produces,
    register_kind,
)
from raytrain.phases.cache_checks import (
    LengthCheck,
    code_histogram,
    codebook_stats,
    length_mismatches,
    manifest_file,
    mismatch_text,
    name_rows,
    source_lines,
    stored_codes,
    stored_lengths,
)

if TYPE_CHECKING:
    from datasets_prep.columns import ColumnSpec
    from raytrain.plan import PhasePlan

CALLS = "__cache_calls"  # one 1 per model call in the mapped batches: how many forward passes ran
SPEC = "__cache_spec__"  # + column: the spec of an output column as the model made it (its dims), as JSON
CHECK_KEYS = ("verify_lengths", "length_columns", "length_tolerance", "require_length_match")  # not in the key
SHOWN = 20  # mismatching rows printed; length_check.json holds them all


def file_sha256(path: str) -> str:
    from datasets_prep.storage import read_bytes

    return hashlib.sha256(read_bytes(path)).hexdigest()


def output_specs(phase: CachePhaseConfig, source: dict[str, Any] | None) -> dict[str, ColumnSpec]:
    """The columns a cache output has: the source's id, the model outputs, the carried columns (their specs
    from the source manifest when it is known)."""
    from datasets_prep.columns import ColumnSpec, manifest_columns

    src = manifest_columns(source) if source else {}
    out: dict[str, ColumnSpec] = {}
    out[next((n for n, s in src.items() if s.role == "id"), "id")] = ColumnSpec.id()
    for name, decl in phase.columns.items():
        if decl.role == "features":
            out[name] = ColumnSpec.features(frame_rate=decl.frame_rate, dims=decl.dims, dtype=decl.dtype)
        elif decl.role == "tokens":
            out[name] = ColumnSpec.tokens(rate=decl.frame_rate, dtype=decl.dtype)
        elif decl.role == "audio":
            out[name] = ColumnSpec.audio(int(decl.sample_rate or 0))
        else:
            out[name] = ColumnSpec.label()
    for name in phase.carry:
        spec = src.get(name) or ColumnSpec.meta()
        # a token file's column (per-row shape and dtype beside it) is carried as plain int64 tokens
        out[name] = ColumnSpec.tokens(rate=spec.rate, vocab=spec.vocab, codebooks=spec.codebooks) \
            if spec.shape_columns else spec
    return out


def made_specs(batch: dict[str, Any]) -> dict[str, ColumnSpec]:
    """The output columns' specs as the mapper made them (a features column's dims), from a mapped batch."""
    from datasets_prep.columns import ColumnSpec

    return {k.removeprefix(SPEC): ColumnSpec.model_validate(json.loads(str(v[0])))
            for k, v in batch.items() if k.startswith(SPEC)}


def output_rows(batch: dict[str, Any]) -> dict[str, Any]:
    """A mapped batch without the mapper's bookkeeping columns: what the writer writes."""
    return {k: v for k, v in batch.items() if k != CALLS and not k.startswith(SPEC)}


class CacheMapper:
    """The actor: the frozen model on its device, one call per batch of any of the phase's datasets."""

    def __init__(self, model: dict[str, Any], weights: str | None, phase: dict[str, Any],
                 sample_rate: int | None, seed: int, threads: int | None, use_gpu: bool) -> None:
        import torch

        from raytrain.checkpoints import load_weights
        from raytrain.config.schema import ModelConfig
        from raytrain.data.stream import Collate, build_transforms
        from raytrain.models import build_model

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        mcfg = ModelConfig.model_validate(model)
        net = build_model(mcfg.name, dict(mcfg.args), mcfg.adapter)
        if weights is not None:  # else a model that loads its own pretrained weights
            net.load_state_dict(load_weights(weights))
        self.model = net.to(self.device).eval().requires_grad_(False)
        self.phase = CachePhaseConfig.model_validate(phase)
        self.transforms = build_transforms([t.model_dump() for t in self.phase.eval_transforms], sample_rate or 0,
                                           seed)
        self._collates: dict[str, Collate] = {}  # one per dataset's audio spec
        self.sample_rate = sample_rate
        self.specs = output_specs(self.phase, None)

    def map(self, batch: dict[str, np.ndarray], audio: dict[str, Any]) -> dict[str, Any]:
        """One batch of a dataset whose audio columns are `audio` (`audio_spec`)."""
        from raytrain.data.stream import Collate

        key = json.dumps(audio, sort_keys=True, default=str)
        if key not in self._collates:
            self._collates[key] = Collate(self.transforms, epoch=0, audio=audio)
        return self(batch, self._collates[key])

    def __call__(self, batch: dict[str, np.ndarray], collate: Any) -> dict[str, Any]:
        import torch

        from datasets_prep.codecs import encode_value
        from datasets_prep.columns import ColumnSpec

        specs = self.specs
        ids = batch["id"]
        carried = {c: batch[c] for c in self.phase.carry}
        made = _plain_tokens(batch, carried, getattr(collate, "specs", None) or {})
        model_batch = collate(dict(batch))
        with torch.no_grad():
            out = self.model({k: v.to(self.device) for k, v in model_batch.items()})
        n = len(ids)
        result: dict[str, Any] = {"id": list(ids), CALLS: [1] + [0] * (n - 1)}
        for name, decl in self.phase.columns.items():
            key = decl.output or name
            if key not in out:
                raise KeyError(f"cache phase {self.phase.name!r}: the model gives no output {key!r} (it gives "
                               f"{sorted(out)}); set columns.{name}.output")
            values = out[key].detach().float().cpu().numpy() if decl.dtype.startswith("float") \
                else out[key].detach().cpu().numpy()
            lengths = self._lengths(out, key, model_batch, values, decl)
            spec = specs[name]
            if spec.role == "features" and spec.dims is None and values.ndim == 3:
                spec = ColumnSpec.like(values[0], frame_rate=decl.frame_rate)
            result[name] = [encode_value(name, spec, values[i][: lengths[i]].astype(decl.dtype)) for i in range(n)]
            result[SPEC + name] = [json.dumps(spec.to_json())] * n
        for c, v in carried.items():
            result[c] = list(v)
        for c, spec in made.items():
            result[SPEC + c] = [json.dumps(spec.to_json())] * n
        return result

    def _lengths(self, out: dict[str, Any], key: str, batch: dict[str, Any], values: np.ndarray,
                 decl: Any) -> list[int]:
        full = values.shape[1] if values.ndim > 1 else 1
        if f"{key}_lengths" in out:
            return [int(x) for x in out[f"{key}_lengths"].cpu()]
        if "lengths" in batch and decl.frame_rate and self.sample_rate:
            return [min(full, math.ceil(int(x) * decl.frame_rate / self.sample_rate)) for x in batch["lengths"]]
        return [full] * values.shape[0]


def _plain_tokens(batch: dict[str, Any], carried: dict[str, Any], source: dict[str, ColumnSpec]
                  ) -> dict[str, ColumnSpec]:
    """Carried token-file columns (bytes with a per-row `<c>_shape`, `<c>_dtype`) decoded, in place in
    `carried`, into int64 arrays (T,) or (T, codebooks), which the output stores as plain tokens; their specs."""
    from datasets_prep.codecs import decode_tokens
    from datasets_prep.columns import ColumnSpec

    made = {}
    for c, values in carried.items():
        spec = source.get(c)
        if spec is None or not spec.shape_columns:
            continue
        dtypes = batch.get(f"{c}_dtype")
        arrays = [None if v is None else decode_tokens(v, batch[f"{c}_shape"][i], str(
            dtypes[i] if dtypes is not None else spec.dtype)).astype(np.int64) for i, v in enumerate(values)]
        carried[c] = arrays
        first = next((a for a in arrays if a is not None), None)
        codebooks = int(first.shape[1]) if first is not None and first.ndim == 2 else spec.codebooks
        made[c] = ColumnSpec.tokens(rate=spec.rate, vocab=spec.vocab, codebooks=codebooks)
    return made


class CacheKind(PhaseKind):
    name = "cache"
    config = CachePhaseConfig

    def needs(self, pipe: PipelineConfig, phase: Any) -> Needs:
        needs = super().needs(pipe, phase)
        needs.datasets = [DatasetUse("source", s) for s in phase.datasets]
        return needs

    def column_needs(self, pipe: PipelineConfig, phase: Any) -> dict[str, Any]:
        from raytrain.needs import needed_columns

        needs = needed_columns(pipe.phase_model(phase), [], [], phase.eval_transforms)
        return {"source": needs}

    def produces(self, pipe: PipelineConfig, phase: Any) -> Produces:
        from datasets_prep.columns import columns_json
        from raytrain.data.datasets import dataset_info, resolve

        out = {}
        for src, name in phase.datasets.items():
            manifest = dataset_info(resolve(pipe.data[src].shards)) if src in pipe.data else None
            out[name] = columns_json(output_specs(phase, manifest))
        return Produces(datasets=out)

    def check(self, pipe: PipelineConfig, phase: Any, plan: PhasePlan, where: str) -> list[str]:
        from datasets_prep.columns import manifest_columns

        problems = []
        for src, name in phase.datasets.items():
            if name in pipe.data:
                problems.append(f"{where}.datasets.{src}: the cache output {name!r} is named like the 'data:' "
                                f"entry {name!r}; give it another name (later phases name it to read it)")
            for other in pipe.phases:
                if other is not phase and name in getattr(other, "datasets", {}).values() \
                        and other.kind == phase.kind:
                    problems.append(f"{where}.datasets.{src}: phase {other.name!r} also writes {name!r}")
        for _, src, manifest in plan.datasets:
            if manifest is None:
                continue
            have = manifest_columns(manifest)
            for c in phase.carry:
                if c not in have:
                    problems.append(f"{where}.carry: column {c!r} is not in dataset {src!r} (it has "
                                    f"{', '.join(have)})")
        if phase.verify_lengths is not None:
            problems += self._check_length_columns(phase, plan, where)
        return list(dict.fromkeys(problems))

    @staticmethod
    def _check_length_columns(phase: CachePhaseConfig, plan: PhasePlan, where: str) -> list[str]:
        """Both `length_columns` are columns of every output, with a time axis where the source is known."""
        problems = []
        written = output_specs(phase, None)
        for c in phase.length_columns:
            if c not in written:
                problems.append(f"{where}.length_columns: {c!r} is not a column the phase writes (it writes "
                                f"{', '.join(written)}); name a column of 'columns' or 'carry'")
                continue
            for _, src, manifest in plan.datasets:
                spec = output_specs(phase, manifest)[c] if manifest is not None else None
                if spec is not None and not spec.is_time:
                    problems.append(f"{where}.length_columns: {c!r} of the output of {src!r} is a {spec.role} "
                                    "column, which has no length; name an audio, tokens or features column")
        return problems

    def plan_lines(self, pipe: PipelineConfig, plan: PhasePlan) -> list[str]:
        ph = plan.phase
        cols = ", ".join(f"{n} ({d.role}{f' {d.frame_rate:g}/s' if d.frame_rate else ''})"
                         for n, d in ph.columns.items())
        lines = [f"    writes   {', '.join(f'{s} -> {n}' for s, n in ph.datasets.items())}: id, {cols}"
                 + (f"; carries {', '.join(ph.carry)}" if ph.carry else ""),
                 f"    batch    {ph.batch_size} x {pipe.phase_scaling(ph).num_workers} actors; cached under "
                 f"{ph.cache_dir}/<name>/<key> (model, weights and source: same key, no forward pass)"]
        manifest = next((m for _, _, m in plan.datasets if m is not None), None)
        check = LengthCheck.of(ph, output_specs(ph, manifest))
        if check is not None:
            lines.append(f"    verify   {check.describe()}; a mismatch "
                         + ("fails the phase (require_length_match)" if ph.require_length_match else "is reported"))
        codebooks = [f"{n} ({d.codebook_size} codes)" for n, d in ph.columns.items() if d.codebook_size]
        if codebooks:
            lines.append(f"    reports  codebook usage and perplexity of {', '.join(codebooks)} per dataset")
        return lines

    # ---- run ---------------------------------------------------------------------------------------------
    def run(self, ctx: PhaseContext) -> None:
        from raytrain.session import worker_resources

        phase: CachePhaseConfig = ctx.phase
        weights = str(ctx.init["path"]) if ctx.init is not None else None
        use_gpu, resources, threads = worker_resources(ctx.pipe, phase)
        entry = ctx.entry
        entry.datasets, entry.forward_passes = {}, 0
        t0 = time.time()
        model = ctx.pipe.phase_model(phase).model_dump(mode="json")
        # what every output's key shares: the weights file's hash (a pretrained model: its config), the model
        not_keyed: dict[str, Any] = {k: True for k in ("name", "cache_dir", "scaling", *CHECK_KEYS)}
        not_keyed["columns"] = {"__all__": {"codebook_size"}}  # what the phase checks, not what it writes
        keyed = {"weights": file_sha256(weights) if weights is not None else None, "model": model,
                 "phase": phase.model_dump(mode="json", exclude=not_keyed)}
        pool = _ActorPool(lambda: [
            _mapper_class(use_gpu, resources).remote(
                model=model, weights=weights,
                phase=phase.model_dump(mode="json"), sample_rate=ctx.plan.sample_rate, seed=ctx.pipe.seed,
                threads=None if use_gpu else threads, use_gpu=use_gpu)
            for _ in range(ctx.pipe.phase_scaling(phase).num_workers)])
        try:
            for src, name in phase.datasets.items():
                self._one(ctx, src, name, weights, keyed, pool)
        finally:
            pool.close()
        metrics = {"cache/forward_passes": float(entry.forward_passes)}
        failure = self._check_written(ctx, metrics)
        entry.wall_s = round(entry.wall_s + time.time() - t0, 1)
        entry.final_metrics = metrics
        ctx.tracker.metrics(ctx.run_id, metrics, 0)
        if failure:
            raise PipelineError(failure)

    def _check_written(self, ctx: PhaseContext, metrics: dict[str, float]) -> str | None:
        """The checks of the written (or reused) rows: codebook statistics and `verify_lengths` into `metrics`,
        the mismatching rows printed and in `length_check.json`; the failure's message under
        `require_length_match`."""
        from datasets_prep.columns import manifest_columns
        from datasets_prep.shards import read_manifest

        phase: CachePhaseConfig = ctx.phase
        check, checked = None, 0
        bad: list[dict[str, Any]] = []
        per_dataset: dict[str, Any] = {}
        for src, name in phase.datasets.items():
            folder = ctx.entry.datasets[name]
            manifest, source = read_manifest(folder), ctx.datasets[src][0]
            for col, decl in phase.columns.items():
                if decl.codebook_size:
                    metrics.update(self._codebook(phase.name, name, col, decl.codebook_size, folder, manifest))
            check = LengthCheck.of(phase, manifest_columns(manifest))
            if check is None:
                continue
            n, rows = length_mismatches(stored_lengths(folder, manifest, check), check)
            src_manifest = read_manifest(source)
            no_line = {str(r["id"]) for r in rows if r["line"] is None}  # lines from the source, if it has them
            name_rows(rows, name, manifest_file(src_manifest), source_lines(source, src_manifest, no_line))
            print(f"cache {phase.name}: {name}: lengths of {n} rows checked ({check.describe()}): "
                  f"{len(rows)} mismatch{'es' if len(rows) != 1 else ''}")
            for r in rows[:max(0, SHOWN - len(bad))]:
                print("  " + mismatch_text(r, check))
            checked, bad = checked + n, bad + rows
            per_dataset[name] = {"folder": folder, "source": source, "checked": n, "mismatches": len(rows)}
        if check is None:
            return None
        if len(bad) > SHOWN:
            print(f"  and {len(bad) - SHOWN} more")
        metrics.update({"cache/length_checked": float(checked), "cache/length_mismatches": float(len(bad))})
        path = self._length_report(ctx, check, per_dataset, bad)
        if not bad or not phase.require_length_match:
            return None
        shown = "; ".join(mismatch_text(r, check) for r in bad[:5])
        return (f"cache {phase.name!r}: {len(bad)} of {checked} rows checked have a {check.b} length that does "
                f"not match {check.a}'s ({check.describe()}; require_length_match): {shown}"
                + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "") + f". Every row is in {path}. Fix or "
                "drop those rows in the source, or allow a difference with length_tolerance")

    @staticmethod
    def _codebook(phase: str, dataset: str, column: str, size: int, folder: str, manifest: dict[str, Any]
                  ) -> dict[str, float]:
        counts, outside = code_histogram(stored_codes(folder, manifest, column), size)
        usage, perplexity = codebook_stats(counts)
        print(f"cache {phase}: {dataset}: {column}: {np.count_nonzero(counts)} of {size} codes used "
              f"({usage:.1%}), perplexity {perplexity:.1f}"
              + (f"; {outside} codes outside [0, {size}) not counted" if outside else ""))
        return {f"cache/{dataset}/{column}_usage": usage, f"cache/{dataset}/{column}_perplexity": perplexity}

    @staticmethod
    def _length_report(ctx: PhaseContext, check: LengthCheck, datasets: dict[str, Any],
                       mismatches: list[dict[str, Any]]) -> Path:
        """`length_check.json` in the phase folder (in the summary's `files`, an MLflow artifact)."""
        from raytrain.checkpoints import atomic_write_text

        path = ctx.phase_dir / "length_check.json"
        report = {"columns": [check.a, check.b], "ratio": check.ratio, "tolerance": check.tolerance,
                  "rows": "all" if check.first is None else check.first,
                  "require_length_match": ctx.phase.require_length_match, "datasets": datasets,
                  "mismatches": mismatches}
        atomic_write_text(path, json.dumps(report, indent=2))
        ctx.entry.files["length_check"] = str(path)
        ctx.tracker.artifact(ctx.run_id, path)
        return path

    def _one(self, ctx: PhaseContext, src: str, name: str, weights: str | None, keyed: dict[str, Any],
             pool: _ActorPool) -> None:
        """Dataset `src` into output `name`: reused when its key's folder is complete, else written."""
        from datasets_prep.shards import DatasetWriter, read_manifest
        from raytrain.data.datasets import audio_spec, read_columns, read_dataset

        phase: CachePhaseConfig = ctx.phase
        entry = ctx.entry
        path = ctx.datasets[src][0]
        manifest = read_manifest(path)
        key = hashlib.sha256(json.dumps({
            "source": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(), **keyed,
        }, sort_keys=True).encode()).hexdigest()
        folder = Path(phase.cache_dir) / name / key[:16]
        if _manifest_key(folder) == key and not ctx.rebuild_cache:
            print(f"cache {phase.name}: {name} reused from {folder} (same source, weights and config; "
                  "0 forward passes)")
            entry.datasets[name] = str(folder)
            return
        specs = output_specs(phase, manifest)
        columns = read_columns(manifest, None, path)  # every stored column the model and transforms may read
        batches = read_dataset(path, manifest, columns=columns).iter_batches(
            batch_size=phase.batch_size, batch_format="numpy")
        calls = rows = 0
        writer: DatasetWriter | None = None
        prep = {"cache_key": key, "phase": phase.name, "source": path, "weights": weights}
        try:
            for batch in pool.map_in_order(batches, audio_spec(manifest, columns)):
                if writer is None:  # the output columns as the model made them (a features column's dims)
                    writer = DatasetWriter(folder, {**specs, **made_specs(batch)}, kind="cache",
                                           rows_per_shard=phase.rows_per_shard, prep=prep).__enter__()
                calls += int(np.sum(batch[CALLS]))
                rows += len(batch[CALLS])
                writer.write_batch(output_rows(batch))
        except BaseException as exc:
            if writer is not None:
                writer.__exit__(type(exc), exc, exc.__traceback__)
            raise
        if writer is None:
            raise PipelineError(f"cache {phase.name!r}: dataset {src!r} has no rows")
        writer.__exit__(None, None, None)
        entry.forward_passes = (entry.forward_passes or 0) + calls
        entry.datasets[name] = str(folder)
        print(f"cache {phase.name}: {name}: {rows} rows, {calls} forward passes -> {folder}")


def _mapper_class(use_gpu: bool, resources: dict[str, float]) -> Any:
    import ray

    return ray.remote(CacheMapper).options(num_cpus=0 if use_gpu else resources["CPU"], num_gpus=1 if use_gpu else 0)


class _ActorPool:
    """The phase's mapper actors, started at the first dataset that needs a forward pass and killed at the
    end; at most two batches in flight per actor (the rest of the source waits in Ray Data)."""

    def __init__(self, start: Any) -> None:
        self._start = start
        self._pool: Any = None
        self._actors: list[Any] = []

    def map_in_order(self, batches: Any, audio: dict[str, Any]) -> Any:
        from ray.util import ActorPool

        if self._pool is None:
            self._actors = self._start()
            self._pool = ActorPool(self._actors)
        pool, in_flight = self._pool, 0
        for batch in batches:
            pool.submit(lambda actor, b: actor.map.remote(b, audio), batch)
            in_flight += 1
            if in_flight >= 2 * len(self._actors):
                yield pool.get_next()
                in_flight -= 1
        while pool.has_next():
            yield pool.get_next()

    def close(self) -> None:
        import ray

        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass


def _manifest_key(folder: Path) -> str | None:
    try:
        manifest = json.loads((folder / "_manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return (manifest.get("prep") or {}).get("cache_key")


register_kind(CacheKind)
