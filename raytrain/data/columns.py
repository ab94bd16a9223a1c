"""Which dataset columns a phase reads: the declarations of models, losses, metrics and transforms.

A model, loss or metric declares the batch keys it reads with ``reads``: a tuple, or a callable of
the part's config ``args`` returning one (for inputs that depend on them)::

    @reads_keys("sources")
    def si_sdr_pit(outputs, batch): ...

    class SeparationModel(nn.Module):
        reads = ("mix",)

A transform also declares what it ``makes``: ``{key: keys it is made from}`` (again a mapping or a
callable of its args); a key it makes is needed from the dataset only through the keys it is made
from (``ctc_targets`` makes ``asr_targets`` from ``text``), and its ``reads`` are always needed.
A part without a declaration reads anything: the phase then reads every column (user plug-ins keep
working), and only what the declared parts need is checked.

Keys the collate makes are not columns: ``lengths`` and ``<key>_lengths`` (from ``<key>``), and
``sources``, stacked from the columns ``s1``, ``s2``, ... (``raytrain.data.stream.to_model_batch``).
``raytrain.needs.needed_columns`` applies these declarations to a phase.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from datasets_prep.columns import ColumnSpec, manifest_columns

F = TypeVar("F", bound=Callable[..., Any])

# batch keys the collate stacks from several columns: key -> (pattern of its columns, what to show)
GROUPS: dict[str, tuple[re.Pattern[str], str]] = {"sources": (re.compile(r"^s\d+$"), "s1, s2, ...")}


def reads_keys(*keys: str) -> Callable[[F], F]:
    """Declare the batch keys a loss, metric or model function reads (sets its ``reads``)."""

    def deco(fn: F) -> F:
        fn.reads = tuple(keys)  # type: ignore[attr-defined]
        return fn

    return deco


def _declared(obj: Any, attr: str, args: Mapping[str, Any]) -> Any:
    decl = getattr(obj, attr, None)
    if decl is None:
        return None
    if callable(decl) and not isinstance(decl, tuple | list | Mapping):
        decl = decl(dict(args))
    return decl


def declared_reads(obj: Any, args: Mapping[str, Any] | None = None) -> tuple[str, ...] | None:
    """The batch keys ``obj`` declares it reads (resolved with ``args``), or None without a declaration."""
    decl = _declared(obj, "reads", args or {})
    if decl is None:
        return None
    if isinstance(decl, str) or not all(isinstance(k, str) for k in decl):
        raise TypeError(f"{getattr(obj, '__name__', obj)!r}.reads must be a tuple of batch keys, got {decl!r}")
    return tuple(decl)


def declared_makes(obj: Any, args: Mapping[str, Any] | None = None) -> dict[str, tuple[str, ...]] | None:
    """A transform's ``makes`` ({key: keys it is made from}), or None when it declares neither
    ``reads`` nor ``makes`` (then it may make anything)."""
    decl = _declared(obj, "makes", args or {})
    if decl is None:
        return None if getattr(obj, "reads", None) is None else {}
    return {str(k): tuple(v) for k, v in dict(decl).items()}


def collate_source(key: str) -> str | None:
    """The column the collate makes ``key`` from (``x_lengths`` -> ``x``), or None for ``lengths``."""
    if key == "lengths":
        return None
    if key.endswith("_lengths"):
        return key[: -len("_lengths")]
    return key


@dataclass(frozen=True)
class ColumnNeeds:
    """What a phase needs of a dataset.

    ``columns``: the columns (or ``GROUPS`` keys such as ``sources``) the declared parts need;
    ``complete``: every part declares what it reads, so ``columns`` is all the phase reads (else it
    reads every column); ``reasons``: column -> the parts that need it, for error messages.
    """

    columns: frozenset[str]
    complete: bool = True
    reasons: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def to_read(self, available: Any) -> list[str] | None:
        """The columns to read from a dataset with ``available`` columns (None: all of them)."""
        return resolve_columns(self.columns, available) if self.complete else None

    def explain(self, column: str) -> str:
        return "; ".join(self.reasons.get(column, ())) or "the phase"


def _names(available: Any) -> list[str]:
    """Column names of a manifest, of ``{name: ColumnSpec}`` or of a list."""
    if isinstance(available, Mapping) and "shards" in available:
        return list(manifest_columns(available))
    return list(available)


def resolve_columns(needed: Iterable[str], available: Any) -> list[str]:
    """``needed`` as stored columns of a dataset (``available``: its manifest, ``manifest_columns`` or
    names): a group key becomes its columns (``sources`` -> ``s1``, ``s2``), a missing column is left out."""
    names = _names(available)
    out: list[str] = []
    for key in sorted(set(needed)):
        group = GROUPS.get(key)
        cols = [n for n in names if group[0].match(n)] if group and key not in names else [key]
        out.extend(c for c in cols if c in names and c not in out)
    return out


def missing_columns(needed: ColumnNeeds | Iterable[str], available: Any) -> list[str]:
    """The needed columns a dataset lacks (``available``: its manifest, ``manifest_columns`` or names);
    a group shows as ``"sources (s1, s2, ...)"``."""
    keys = needed.columns if isinstance(needed, ColumnNeeds) else set(needed)
    names = _names(available)
    missing = []
    for key in sorted(keys):
        group = GROUPS.get(key)
        if key in names or (group and any(group[0].match(n) for n in names)):
            continue
        missing.append(f"{key} ({group[1]})" if group else key)
    return missing


def specs_of(roles: Mapping[str, Any] | None) -> dict[str, ColumnSpec]:
    """``{name: ColumnSpec}`` from specs or their JSON (as a dataset's spec carries them to workers)."""
    return {n: s if isinstance(s, ColumnSpec) else ColumnSpec.model_validate(s) for n, s in (roles or {}).items()}
