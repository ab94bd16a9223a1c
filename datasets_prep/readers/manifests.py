"""Readers that list a corpus as *items*: small dicts of metadata and audio file paths.

Listing is cheap and runs in the driver; reading and processing the audio runs later in
Ray Data tasks (``datasets_prep.steps``), so one unreadable file becomes a reject row
instead of killing the job. Every reader returns items in a deterministic order with a
unique ``id``; audio columns hold absolute paths (``AUDIO_PATH_COLUMNS`` says which).

Formats:

- ``speaker-dirs``  ``<root>/<speaker>/<utt>.wav`` (VCTK/JVS style); the transcript is
  ``<utt>.txt`` (or ``.lab``) beside the audio, or a line ``<utt> <text>`` (tab or space)
  in a per-speaker text file such as ``<root>/<speaker>/transcripts.txt``; a ``<utt>.phn``
  beside the audio becomes a ``phonemes`` column.
- ``jsonl``         one JSON object per line: ``idx, audio_path, lyrics, prompt_wav,
  sketch_path`` plus any extra fields (kept as columns); paths relative to the manifest. When
  every row has a ``prompt_wav``, the prompts are loaded too, as the audio column ``prompt``
  (``with_audio_columns``); each row's line number becomes the int column ``line``.
- ``tsv``           fairseq/StreamSpeech: a header ``id audio n_frames tgt_text speaker``;
  paths relative to the manifest.
- ``wsj0-2mix``     ``<root>/mix/``, ``<root>/s1/``, ``<root>/s2/`` holding the same names.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

AUDIO_EXTS = (".wav", ".flac")
TRANSCRIPT_EXTS = (".txt", ".lab")
PER_SPEAKER_TRANSCRIPTS = ("transcripts.txt", "transcript.txt", "text.txt", "prompts.txt")

# audio columns of each format: paths in the items, float waveforms once loaded
AUDIO_PATH_COLUMNS: dict[str, tuple[str, ...]] = {
    "speaker-dirs": ("audio",),
    "jsonl": ("audio",),
    "tsv": ("audio",),
    "wsj0-2mix": ("mix", "s1", "s2"),
}


class ReaderError(ValueError):
    """A corpus that cannot be listed at all (missing folder, malformed manifest line)."""


def _is_audio(p: Path, exts: tuple[str, ...]) -> bool:
    return p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")


def _per_speaker_text(spk_dir: Path, name: str | None) -> dict[str, str]:
    """{utt stem: text} from a per-speaker transcript file (``<utt> <text>`` or ``<utt>\\t<text>`` lines)."""
    candidates = [spk_dir / name] if name else [spk_dir / n for n in PER_SPEAKER_TRANSCRIPTS]
    for path in candidates:
        if path.is_file():
            out = {}
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                utt, _, text = line.replace("\t", " ", 1).partition(" ")
                if not text:
                    raise ReaderError(f"{path}:{lineno}: expected '<utterance> <text>', got {line!r}")
                out[Path(utt).stem] = text.strip()
            return out
    return {}


def list_speaker_dirs(root: str | os.PathLike, *, transcripts: str | None = None,
                      exts: tuple[str, ...] = AUDIO_EXTS) -> list[dict[str, Any]]:
    """Items ``{"id": "<speaker>/<utt>", "speaker", "text", "audio": path}``.

    ``transcripts``: the per-speaker transcript file name (default: the first of
    ``PER_SPEAKER_TRANSCRIPTS`` that exists); a ``<utt>.txt``/``.lab`` beside the audio wins.
    """
    root = Path(root)
    if not root.is_dir():
        raise ReaderError(f"{root} does not exist or is not a folder of <speaker>/<utt>.wav")
    items = []
    for spk_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        table = _per_speaker_text(spk_dir, transcripts)
        for path in sorted(p for p in spk_dir.iterdir() if _is_audio(p, exts)):
            text = table.get(path.stem, "")
            for ext in TRANSCRIPT_EXTS:
                beside = path.with_suffix(ext)
                if beside.is_file():
                    text = beside.read_text(encoding="utf-8").strip()
                    break
            item = {"id": f"{spk_dir.name}/{path.stem}", "speaker": spk_dir.name, "text": text,
                    "audio": str(path.resolve())}
            phn = path.with_suffix(".phn")
            if phn.is_file():  # phoneme transcript (the espeak generator writes one on request)
                item["phonemes"] = phn.read_text(encoding="utf-8").strip()
            items.append(item)
    if not items:
        raise ReaderError(f"{root} holds no <speaker>/<utt>{{{','.join(exts)}}} files")
    return items


def _unique(rows: Any, path: Path, kind: str, id_name: str) -> list[dict[str, Any]]:
    """Items from ``(where, item)`` pairs; a repeated id or no row at all is an error naming the file."""
    items, seen = [], set()
    for where, item in rows:
        if item["id"] in seen:
            raise ReaderError(f"{where}: duplicate {id_name} {item['id']!r}")
        seen.add(item["id"])
        items.append(item)
    if not items:
        raise ReaderError(f"{kind} manifest {path} has no rows")
    return items


def _resolve(base: Path, value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ReaderError(f"{where}: expected a file path, got {value!r}")
    p = Path(value).expanduser()
    return str((p if p.is_absolute() else base / p).resolve())


JSONL_PATH_FIELDS = ("prompt_wav", "sketch_path")  # optional path fields resolved like audio_path
LINE_KEY = "_manifest_line"  # an item's "<manifest>:<line>", for its reject; stored as the int column LINE_COLUMN
LINE_COLUMN = "line"
PROMPT_COLUMN = "prompt"  # the audio loaded from prompt_wav (a song's style prompt: a signal of its own length)


def list_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Items from a JSONL manifest: ``audio`` (from ``audio_path``), ``id`` (from ``idx``, else
    the line number), ``text`` (from ``lyrics``/``text``), ``speaker`` when given, and every
    other field as a column. ``prompt_wav``/``sketch_path`` are resolved to absolute paths. ``LINE_KEY``
    holds the item's ``<manifest>:<line>``, which a reject of the item names."""
    path = Path(path)
    if not path.is_file():
        raise ReaderError(f"JSONL manifest {path} does not exist")
    return _unique(_jsonl_rows(path), path, "JSONL", "idx")


def _jsonl_rows(path: Path) -> Any:
    base = path.parent
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReaderError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ReaderError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if "audio_path" not in row:
            raise ReaderError(f"{where}: missing 'audio_path' (fields: {sorted(row)})")
        if LINE_COLUMN in row:
            raise ReaderError(f"{where}: the field {LINE_COLUMN!r} is raytrain's (each row's line number in the "
                              "manifest is stored under it): rename the field")
        item = {k: v for k, v in row.items() if k not in ("idx", "audio_path", "lyrics")}
        item["id"] = str(row.get("idx", lineno - 1))
        item["audio"] = _resolve(base, row["audio_path"], f"{where} audio_path")
        item["text"] = str(row.get("lyrics", row.get("text", "")) or "")
        item.setdefault("speaker", "")
        item[LINE_KEY] = where
        for field in JSONL_PATH_FIELDS:
            if row.get(field):
                item[field] = _resolve(base, row[field], f"{where} {field}")
        yield where, item


def line_number(item: dict[str, Any]) -> int | None:
    """The manifest line an item was read from (``LINE_KEY``), None for an item of another reader."""
    where = item.get(LINE_KEY)
    return int(str(where).rsplit(":", 1)[1]) if where else None


def with_audio_columns(fmt: str, items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """(items, their audio columns): ``AUDIO_PATH_COLUMNS[fmt]``, and for a JSONL corpus whose every row has a
    ``prompt_wav``, also ``prompt`` (each item's ``prompt`` set to that path; ``prompt_wav`` stays a string
    column). When only some rows have one, the prompts stay paths, and a note says so."""
    columns = list(AUDIO_PATH_COLUMNS[fmt])
    if fmt != "jsonl":
        return items, columns
    having = sum(bool(it.get("prompt_wav")) for it in items)
    if having and having < len(items):
        first = next(it for it in items if not it.get("prompt_wav"))
        print(f"note: {having} of {len(items)} rows have a prompt_wav ({first.get(LINE_KEY)} has none): prompts stay "
              "paths in the string column prompt_wav; give every row one to load them as the audio column "
              f"{PROMPT_COLUMN!r}")
    if not items or having < len(items):
        return items, columns
    for it in items:
        if PROMPT_COLUMN in it:
            raise ReaderError(f"{it.get(LINE_KEY)}: the field {PROMPT_COLUMN!r} would be replaced by the audio loaded "
                              "from prompt_wav: rename the field")
    return [{**it, PROMPT_COLUMN: it["prompt_wav"]} for it in items], [*columns, PROMPT_COLUMN]


TSV_COLUMNS = ("id", "audio", "n_frames", "tgt_text", "speaker")
TSV_HEADER = " ".join(TSV_COLUMNS)


def list_tsv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Items from a fairseq/StreamSpeech TSV (header line; ``id`` and ``audio`` required,
    ``tgt_text`` becomes ``text``, other columns are kept)."""
    path = Path(path)
    if not path.is_file():
        raise ReaderError(f"TSV manifest {path} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = reader.fieldnames or []
        missing = [c for c in ("id", "audio") if c not in header]
        if missing:
            raise ReaderError(f"{path}: header {header} lacks {missing} (expected the tab-separated header: {TSV_HEADER})")
        return _unique(_tsv_rows(reader, path, header), path, "TSV", "id")


def _tsv_rows(reader: csv.DictReader, path: Path, header: Sequence[str]) -> Any:
    for lineno, row in enumerate(reader, 2):
        if None in row or any(v is None for v in row.values()):
            raise ReaderError(f"{path}:{lineno}: {len(header)} tab-separated fields expected")
        item = {k: v for k, v in row.items() if k not in ("tgt_text",)}
        item["audio"] = _resolve(path.parent, row["audio"], f"{path}:{lineno} audio")
        item["text"] = row.get("tgt_text", "")
        item.setdefault("speaker", "")
        if "n_frames" in item:
            item["n_frames"] = int(item["n_frames"]) if str(item["n_frames"]).strip() else -1
        yield f"{path}:{lineno}", item


def list_wsj0_2mix(root: str | os.PathLike, *, exts: tuple[str, ...] = AUDIO_EXTS) -> list[dict[str, Any]]:
    """Items ``{"id", "speakers", "mix", "s1", "s2"}`` from ``mix/``, ``s1/``, ``s2/`` folders.

    A name missing from ``s1/`` or ``s2/`` is an error naming it. wsj0-2mix names look like
    ``<spkA utt>_<gain>_<spkB utt>_<gain>.wav``; ``speakers`` takes the first 3 characters of
    each utterance id (the WSJ speaker code) when the name has that shape, else is empty.
    """
    root = Path(root)
    dirs = {k: root / k for k in ("mix", "s1", "s2")}
    for k, d in dirs.items():
        if not d.is_dir():
            raise ReaderError(f"{root} is not a wsj0-2mix style folder: {k}/ is missing")
    items = []
    for path in sorted(p for p in dirs["mix"].iterdir() if _is_audio(p, exts)):
        item: dict[str, Any] = {"id": path.stem, "mix": str(path.resolve())}
        for k in ("s1", "s2"):
            src = dirs[k] / path.name
            if not src.is_file():
                raise ReaderError(f"{src} is missing: every mix/{path.name} needs {k}/{path.name}")
            item[k] = str(src.resolve())
        parts = path.stem.split("_")
        item["speakers"] = f"{parts[0][:3]},{parts[2][:3]}" if len(parts) == 4 else ""
        items.append(item)
    if not items:
        raise ReaderError(f"{dirs['mix']} holds no audio files")
    return items


READERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "speaker-dirs": list_speaker_dirs,
    "jsonl": list_jsonl,
    "tsv": list_tsv,
    "wsj0-2mix": list_wsj0_2mix,
}


def list_items(fmt: str, source: str | os.PathLike, **options: Any) -> list[dict[str, Any]]:
    """The items of a corpus in format ``fmt`` (one of ``READERS``)."""
    if fmt not in READERS:
        raise ReaderError(f"unknown input format {fmt!r}; use one of {sorted(READERS)}")
    return READERS[fmt](source, **options)
