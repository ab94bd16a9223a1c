"""A Ray Data datasource over a prepared shard folder, read whole epochs at a time.

Ray Data's own Parquet reader plans every listed file (its metadata, an encoding-ratio
sample) when the dataset is made, so listing the shards once per epoch of a pass would
cost that many times over. The manifest already knows each shard's rows, so this source
plans nothing. A read task reads consecutive shards (in the pass's order) up to
`TASK_BYTES` and hands each over as its own block: on a machine with a core or two to
spare for reading, the pause between one task and the next, not the reading, is what
bounds a stream of small tasks (one 16 MB shard per task: 0.66 of the pyarrow limit in
`bench/ingest.py`; four per task: 0.87-0.90). Local shards are memory-mapped.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

TASK_BYTES = 64 * 2**20  # a read task reads shards (whole, in order) until it holds this much audio


def read_shards(fs: Any, paths: list[str], columns: list[str]) -> list[pa.Table]:
    """The shards' `columns`, one table (one block) per shard."""
    out = []
    for path in paths:
        if isinstance(fs, pafs.LocalFileSystem):
            out.append(pq.ParquetFile(path, memory_map=True).read(columns=columns, use_threads=False))
            continue
        with fs.open_input_file(path) as f:
            out.append(pq.ParquetFile(f).read(columns=columns, use_threads=False))
    return out


def group_tasks(order: list[int], sizes: list[float], limit: float) -> list[list[int]]:
    """Consecutive runs of `order` whose `sizes` add up to at most `limit` (at least one item each)."""
    groups: list[list[int]] = []
    size = 0.0
    for i in order:
        if groups and groups[-1] and size + sizes[i] <= limit:
            groups[-1].append(i)
            size += sizes[i]
        else:
            groups.append([i])
            size = sizes[i]
    return groups


class ShardFiles(Datasource):
    """`files` (paths inside `fs`) with their `rows`, read epoch by epoch: `orders[e]` lists the file
    indices of epoch `e`. `bytes_per_row`: the in-memory size estimate Ray Data plans with."""

    def __init__(self, fs: Any, files: list[str], rows: list[int], columns: list[str],
                 orders: list[list[int]], bytes_per_row: float) -> None:
        self.fs, self.files, self.rows, self.columns = fs, files, rows, columns
        self.orders, self.bytes_per_row = orders, bytes_per_row
        with fs.open_input_file(files[0]) as f:
            stored = pq.read_schema(f)
        self.schema = pa.schema([stored.field(c) for c in columns])
        sizes = [r * bytes_per_row for r in rows]
        self.tasks = group_tasks([i for order in orders for i in order], sizes, TASK_BYTES)

    def get_name(self) -> str:
        return "ReadShards"

    def estimate_inmemory_data_size(self) -> int:
        return int(self.bytes_per_row * sum(self.rows[i] for order in self.orders for i in order))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        tasks = []
        for group in self.tasks:
            rows = sum(self.rows[i] for i in group)
            tasks.append(ReadTask(partial(read_shards, self.fs, [self.files[i] for i in group], self.columns),
                                  BlockMetadata(num_rows=rows, size_bytes=int(self.bytes_per_row * rows),
                                                input_files=tuple(self.files[i] for i in group), exec_stats=None),
                                  schema=self.schema, per_task_row_limit=per_task_row_limit))
        return tasks
