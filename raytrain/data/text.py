"""Character and phoneme vocabularies for CTC, and the transform that turns transcripts into targets.

Token 0 is the CTC blank; a vocabulary string's i-th character is token i + 1. Text is
lowercased and characters outside the vocabulary are dropped (counted, never silently
turned into another character). The phoneme vocabulary covers espeak-ng's ASCII mnemonics
(``espeak-ng -x``, what ``phonemes: mnemonic`` in a prep YAML writes); give ``phones`` for IPA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from raytrain.data.transforms import TRANSFORMS

CHARS = " abcdefghijklmnopqrstuvwxyz'"
PHONES = "".join(chr(c) for c in range(32, 127))  # printable ASCII: espeak-ng's -x mnemonics
BLANK = 0


class Vocab:
    """String <-> token ids (1-based; 0 is the blank)."""

    def __init__(self, symbols: str, lowercase: bool = True) -> None:
        if len(set(symbols)) != len(symbols):
            raise ValueError(f"vocabulary {symbols!r} repeats a symbol")
        self.symbols, self.lowercase = symbols, lowercase
        self.index = {s: i + 1 for i, s in enumerate(symbols)}

    def __len__(self) -> int:
        """Output classes, the blank included."""
        return len(self.symbols) + 1

    def normalize(self, text: str) -> str:
        text = text.lower() if self.lowercase else text
        return " ".join("".join(c for c in text if c in self.index).split())

    def encode(self, text: str) -> np.ndarray:
        """(tokens,) int64; spaces are collapsed and trimmed first."""
        return np.fromiter((self.index[c] for c in self.normalize(text)), dtype=np.int64)

    def decode(self, ids: Any) -> str:
        return "".join(self.symbols[i - 1] for i in ids if 0 < i <= len(self.symbols))

    def greedy(self, best: Any) -> str:
        """Best-path CTC decoding of a frame-wise argmax (T,): merge repeats, drop blanks."""
        out, prev = [], BLANK
        for t in (int(x) for x in best):
            if t != prev and t != BLANK:
                out.append(t)
            prev = t
        return self.decode(out)


@TRANSFORMS.register("ctc_targets")
class CTCTargets:
    """Numpy batch transform: ``text`` -> ``asr_targets`` and ``phonemes`` -> ``phone_targets``
    (object arrays of int64 token arrays; the collate pads them and adds ``*_lengths``).

    A row whose transcript has no token left is an error naming the row: CTC cannot learn from it.
    """

    reads: tuple[str, ...] = ()

    @staticmethod
    def makes(args: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        """Each target from its transcript column (needed only when the target is)."""
        return {"asr_targets": (args.get("text_column", "text"),),
                "phone_targets": (args.get("phone_column", "phonemes"),)}

    def __init__(self, chars: str = CHARS, phones: str = PHONES, text_column: str = "text",
                 phone_column: str = "phonemes", *, sample_rate: int, seed: int) -> None:
        self.targets = [(text_column, "asr_targets", Vocab(chars)), (phone_column, "phone_targets",
                                                                     Vocab(phones, lowercase=False))]

    def __call__(self, batch: dict[str, np.ndarray], epoch: int = 0) -> dict[str, np.ndarray]:
        for src, dst, vocab in self.targets:
            if src not in batch:
                continue
            out = np.empty(len(batch[src]), dtype=object)
            for i, text in enumerate(batch[src]):
                ids = vocab.encode(str(text) if text is not None else "")
                if not len(ids):
                    row = batch["id"][i] if "id" in batch else i
                    raise ValueError(f"row {row}: column {src!r} has no symbol of the vocabulary ({text!r}); "
                                     "fix the transcript or give the transform a vocabulary that covers it")
                out[i] = ids
            batch[dst] = out
        return batch
