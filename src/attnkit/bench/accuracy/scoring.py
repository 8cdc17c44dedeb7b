"""Exact-match scoring of a generated answer after normalisation.

The prediction is normalised to the set of answer-shaped items it names, and scores 1 when that
set is exactly the gold set, else 0:

- `kind="number"`: every maximal run of at least three digits is an item ("is: 4,821,937" names 821
  and 937: wrong; "is 4821937." names 4821937: right); shorter runs are list numbering ("1. ", "2. ");
- `kind="word"`: the prediction is lower-cased and cut at non-alphanumerics; its words that belong
  to the task's `vocabulary` (the variable names or coded words of the prompt) are the items, so
  filler such as "VAR", "and" or "they are" does not count, but naming a wrong variable does.

Order does not matter; naming an item twice is the same as once; a missing or an extra item is
wrong. When generation stopped at the token limit (`truncated`), a word cut at the end of the text
is not an item: the limit, not the model, ended it.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

from ...core.contract import OptionError

_DIGITS = re.compile(r"\d{3,}")
_WORDS = re.compile(r"[a-z0-9]+")


def normalize(text: str) -> str:
    """Lower-case, punctuation to spaces, whitespace collapsed."""
    return " ".join(_WORDS.findall(text.lower()))


_TRAILING_WORD = re.compile(r"[0-9A-Za-z]+$")


def items(prediction: str, kind: str, vocabulary: Optional[Iterable[str]] = None, truncated: bool = False) -> set[str]:
    """The answer-shaped items a prediction names (see the module docstring)."""
    if truncated:
        prediction = _TRAILING_WORD.sub("", prediction)
    if kind == "number":
        return set(_DIGITS.findall(prediction))
    if kind == "word":
        vocab = {normalize(w) for w in (vocabulary or ())}
        if not vocab:
            raise OptionError("vocabulary: word answers need the task's vocabulary (the candidate words), got none")
        return {w for w in normalize(prediction).split() if w in vocab}
    raise OptionError(f"kind: expected 'number' or 'word', got {kind!r}")


def score(prediction: str, answers: Iterable[str], kind: str, vocabulary: Optional[Iterable[str]] = None,
          truncated: bool = False) -> float:
    """1.0 when the prediction names exactly the gold items, else 0.0."""
    gold = {normalize(a) for a in answers}
    return 1.0 if items(prediction, kind, vocabulary, truncated) == gold else 0.0
