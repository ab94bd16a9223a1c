"""The checks a `cache` phase runs on the rows it wrote (or reused), read back from the shards with pyarrow:
`verify_lengths` (two time columns' lengths row by row, e.g. sketch tokens against latent frames, each row
named by its source manifest line when the rows carry a `line`) and the codebook usage and perplexity of a
tokens column with a `codebook_size`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from datasets_prep.columns import ColumnSpec
    from raytrain.config.schema import CachePhaseConfig

LINE = "line"  # a row's line in the source manifest (JSONL shards), named in the length report


@dataclass(frozen=True)
class LengthCheck:
    """`verify_lengths`: column `b`'s length against `a`'s times `ratio` (b's rate / a's; 1 when a rate is
    unknown), rounded, within `tolerance` frames, over a dataset's `first` rows (None: all)."""

    a: str
    b: str
    ratio: float = 1.0
    tolerance: int = 0
    first: int | None = None

    @classmethod
    def of(cls, phase: CachePhaseConfig, specs: dict[str, ColumnSpec]) -> LengthCheck | None:
        if phase.verify_lengths is None:
            return None
        a, b = phase.length_columns
        ra, rb = (specs[c].time_rate() if c in specs else None for c in (a, b))
        return cls(a, b, float(rb) / float(ra) if ra and rb else 1.0, phase.length_tolerance,
                   None if phase.verify_lengths == "all" else int(phase.verify_lengths))

    def expected(self, length_a: int) -> int:
        return round(length_a * self.ratio)

    def describe(self) -> str:
        rows = "all rows" if self.first is None else f"first {self.first} rows"
        ratio = f" x {self.ratio:g}" if self.ratio != 1.0 else ""
        tol = f" +-{self.tolerance}" if self.tolerance else ""
        return f"{self.b} = {self.a}{ratio}{tol} frames, {rows} of each dataset"


def length_mismatches(rows: Iterable[tuple[str, int | None, int, int]], check: LengthCheck
                      ) -> tuple[int, list[dict[str, Any]]]:
    """Rows `(id, line or None, length of a, length of b)` in dataset order -> (rows checked, the rows whose
    b length is off the expected one by more than the tolerance, as `{id, line, lengths: {a, b}, expected}`)."""
    checked, bad = 0, []
    for rid, line, la, lb in rows:
        if check.first is not None and checked >= check.first:
            break
        checked += 1
        want = check.expected(la)
        if abs(lb - want) > check.tolerance:
            bad.append({"id": rid, "line": line, "lengths": {check.a: la, check.b: lb}, "expected": want})
    return checked, bad


def name_rows(rows: list[dict[str, Any]], dataset: str, manifest: str | None,
              lines: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """`length_mismatches`' rows with their `dataset` and `source` (`songs.jsonl:4`: the source `manifest`
    file and the row's line; `lines`: {id: line} for rows without one)."""
    for r in rows:
        line = r["line"] if r["line"] is not None else (lines or {}).get(str(r["id"]))
        r.update(dataset=dataset, line=line, source=f"{manifest}:{line}" if manifest and line is not None else None)
    return rows


def mismatch_text(row: dict[str, Any], check: LengthCheck) -> str:
    """`latents_dev: row s3 (songs.jsonl:4): sketch 13, latent 40 (expected 52)`."""
    line = row.get("line")
    where = f" ({row['source']})" if row.get("source") else "" if line is None else f" (line {line})"
    la, lb = row["lengths"][check.a], row["lengths"][check.b]
    return (f"{row.get('dataset', '?')}: row {row['id']}{where}: {check.a} {la}, {check.b} {lb} "
            f"(expected {row['expected']})")


def code_histogram(codes: Iterable[np.ndarray], size: int) -> tuple[np.ndarray, int]:
    """Counts of each code in [0, size) over arrays of codes (any shape), and how many fell outside."""
    counts, outside = np.zeros(size, dtype=np.int64), 0
    for c in codes:
        flat = np.asarray(c).reshape(-1).astype(np.int64)
        inside = (flat >= 0) & (flat < size)
        outside += int(flat.size - np.count_nonzero(inside))
        counts += np.bincount(flat[inside], minlength=size)
    return counts, outside


def codebook_stats(counts: np.ndarray) -> tuple[float, float]:
    """(usage: share of the codebook's codes seen at least once, perplexity: exp of the histogram's entropy,
    from 1 for one code up to the codebook size for uniform use) of a histogram `(codebook_size,)`."""
    total = int(counts.sum())
    if total == 0:
        return 0.0, 0.0
    p = counts[counts > 0] / total
    return float(np.count_nonzero(counts) / len(counts)), float(np.exp(-np.sum(p * np.log(p))))


def _tables(folder: str, manifest: dict[str, Any], columns: list[str]) -> Iterator[Any]:
    """The dataset's shards, in order, as pyarrow tables of `columns`."""
    import pyarrow.parquet as pq

    from datasets_prep.storage import filesystem

    fs, root = filesystem(folder)
    for shard in manifest["shards"]:
        yield pq.read_table(f"{root.rstrip('/')}/{shard['file']}", columns=columns, filesystem=fs)


def _lengths(table: Any, name: str, spec: ColumnSpec) -> list[int]:
    """Time steps of a column's stored values (a token file's column: from its `<name>_shape`)."""
    from datasets_prep.codecs import frames

    if spec.shape_columns:
        return [int(s[0]) if s else 0 for s in table.column(f"{name}_shape").to_pylist()]
    return [frames(spec, v) for v in table.column(name).to_pylist()]


def stored_lengths(folder: str, manifest: dict[str, Any], check: LengthCheck
                   ) -> Iterator[tuple[str, int | None, int, int]]:
    """`(id, line, length of a, length of b)` of a dataset's rows in order, read shard by shard until
    `check.first` rows."""
    from datasets_prep.columns import companions, manifest_columns

    specs = manifest_columns(manifest)
    id_col = next((n for n, s in specs.items() if s.role == "id"), "id")
    cols = [id_col, *(c for n in (check.a, check.b) for c in (n, *companions(n, specs[n])))]
    cols += [LINE] if LINE in specs else []
    seen = 0
    for table in _tables(folder, manifest, list(dict.fromkeys(cols))):
        lines = table.column(LINE).to_pylist() if LINE in specs else [None] * table.num_rows
        yield from zip(table.column(id_col).to_pylist(), lines, _lengths(table, check.a, specs[check.a]),
                       _lengths(table, check.b, specs[check.b]), strict=True)
        seen += table.num_rows
        if check.first is not None and seen >= check.first:
            return


def stored_codes(folder: str, manifest: dict[str, Any], name: str) -> Iterator[np.ndarray]:
    """A tokens column's codes, one array per shard."""
    from datasets_prep.codecs import decode_array
    from datasets_prep.columns import manifest_columns

    spec = manifest_columns(manifest)[name]
    for table in _tables(folder, manifest, [name]):
        rows = [decode_array(spec, v).reshape(-1) for v in table.column(name).to_pylist() if v is not None]
        yield np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)


def source_lines(path: str, manifest: dict[str, Any], ids: set[str]) -> dict[str, int]:
    """`{id: line}` of the source dataset's rows `ids`, when its rows have a `line` (JSONL shards)."""
    from datasets_prep.columns import manifest_columns

    specs = manifest_columns(manifest)
    id_col = next((n for n, s in specs.items() if s.role == "id"), "id")
    if LINE not in specs or not ids:
        return {}
    out: dict[str, int] = {}
    for table in _tables(path, manifest, [id_col, LINE]):
        out.update({str(i): int(n) for i, n in zip(table.column(id_col).to_pylist(),
                                                   table.column(LINE).to_pylist(), strict=True)
                    if str(i) in ids and n is not None})
    return out


def manifest_file(manifest: dict[str, Any]) -> str | None:
    """The file name of a dataset's source manifest (`songs.jsonl`), which `line` numbers refer to; through
    datasets written from datasets (a cache of a cache: `prep.source` is a dataset folder) to the first file."""
    from datasets_prep.shards import read_manifest

    for _ in range(16):
        source = (manifest.get("prep") or {}).get("source")
        if not isinstance(source, str):
            return None
        try:
            manifest = read_manifest(source)
        except (OSError, ValueError):  # not a dataset folder: the file the rows were listed from
            return Path(source).name if Path(source).suffix else None
    return None
