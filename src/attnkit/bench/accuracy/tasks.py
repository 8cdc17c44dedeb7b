"""Synthetic long-context tasks in the style of RULER (Hsieh et al., 2024), generated locally.

Every sample is made from `(seed, task, length, index)` alone (no dataset, no download) and is
laid out in the model's own tokens, so its length is exact:

    context_ids  = chat-template head + task preamble + haystack (with the task's facts inserted)
    question_ids = question + chat-template tail + answer prefix

`len(context_ids) + len(question_ids) == length`. The two parts are kept apart because KV-cache
policies compress the context before the question arrives (query-agnostic compression, as the
kvpress RULER leaderboard does); sparse prefill methods see both. Pieces are encoded one at a
time and concatenated, and every piece starts at a whitespace boundary, so encoding the decoded
text gives the same ids (tested).

| task | the model must |
|---|---|
| `single_needle` | return the number stored under one key, the needle placed at a given depth of the haystack |
| `multi_key` | return the number of one key among needles of other keys (distractors) |
| `multi_value` | return every number stored under one key (several needles with the same key) |
| `variable_tracking` | follow a chain of assignments `VAR B = VAR A`, `VAR A = 12345` to its value |
| `frequent_words` | name the most frequent words of a list of made-up words drawn from a Zipf distribution |

The tasks are easier than RULER's (docs/accuracy.md lists each departure and why): a suite that
dense attention fails on the model cannot tell methods apart, and a 135M model fails RULER's own
tasks past a few thousand tokens. The answer prefix of the key-value tasks is the needle's own
sentence up to its value; distractor keys share no word with the asked key; the multi-value
question states the count; one variable chain of one hop; a steep Zipf law.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ...core.contract import OptionError

# where the needle of `single_needle` / `multi_key` sits, as a fraction of the haystack (sample
# `index` uses DEPTHS[index % len(DEPTHS)]), so every depth is covered once per five samples
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

# the haystack: plain sentences repeated (RULER's "noise" haystack)
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")

_ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly", "kind", "lively",
    "misty", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "urban", "vivid", "wild", "young",
    "zesty", "bold", "crisp", "dark", "early", "fresh",
)
_NOUNS = (
    "apple", "bridge", "castle", "desert", "engine", "falcon", "garden", "harbor", "island", "jacket", "kettle",
    "lantern", "meadow", "needle", "orchard", "pepper", "quartz", "river", "saddle", "tunnel", "umbrella",
    "valley", "window", "yacht", "zebra", "basket", "candle", "dragon", "forest", "ginger",
)
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CONSONANTS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Sample:
    """One prompt and its gold answer.

    `answers`: the items the model must name (order free); `kind`: "number" (any digit run in the
    prediction is an item) or "word" (items are the words of `vocabulary` the prediction names);
    `depth`: the needle's relative position for the retrieval tasks, else None."""

    task: str
    length: int
    index: int
    seed: int
    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]
    answers: tuple[str, ...]
    kind: str
    max_new_tokens: int
    depth: Optional[float] = None
    vocabulary: tuple[str, ...] = field(default=(), repr=False)

    @property
    def ids(self) -> list[int]:
        return list(self.context_ids) + list(self.question_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.context_ids) + len(self.question_ids)

    def key(self) -> str:
        """Identifies the sample in a results file (for resuming)."""
        return f"{self.task}/{self.length}/{self.index}"


# --- building prompts in tokens ------------------------------------------------------------------


class Encoder:
    """The tokenizer's encoding of text pieces (no special tokens) and its chat template, split
    around the user's message so the template's tokens are counted too."""

    MARK = "@@ATTNKIT_BODY@@"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}
        if getattr(tokenizer, "chat_template", None):
            framed = tokenizer.apply_chat_template([{"role": "user", "content": self.MARK}], add_generation_prompt=True,
                                                   tokenize=False)
            head, tail = framed.split(self.MARK)
        else:  # a tokenizer without a chat template (tests' tiny models): plain text
            head, tail = "", "\n"
        self.head = tokenizer(head, add_special_tokens=False)["input_ids"] if head else []
        self.tail = tokenizer(tail, add_special_tokens=False)["input_ids"]

    def __call__(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _keys(rng: random.Random, n: int) -> list[str]:
    """`n` keys `adjective-noun` sharing no word, so no key's tail matches another's."""
    return [f"{a}-{b}" for a, b in zip(rng.sample(_ADJECTIVES, n), rng.sample(_NOUNS, n))]


def _haystack(enc: Encoder, n_tokens: int) -> tuple[list[int], list[int]]:
    """`n_tokens` ids of repeated noise sentences (the last one cut to fit) and the token offsets
    where a sentence starts (insertion points), the end included."""
    ids: list[int] = []
    starts: list[int] = []
    i = 0
    while len(ids) < n_tokens:
        starts.append(len(ids))
        ids += enc(" " + NOISE[i % len(NOISE)])
        i += 1
    ids = ids[:n_tokens]
    starts = [s for s in starts if s < n_tokens] + [n_tokens]
    return ids, starts


def _insert(filler: list[int], starts: list[int], facts: Sequence[tuple[float, list[int]]]) -> list[int]:
    """Insert each fact's ids at the sentence start nearest its depth (0 = first, 1 = end);
    facts keep their order when they land on the same point."""
    at: dict[int, list[int]] = {}
    n = len(filler)
    for depth, ids in facts:
        point = min(starts, key=lambda s: (abs(s - depth * n), s))
        at.setdefault(point, []).extend(ids)
    out: list[int] = []
    prev = 0
    for point in sorted(at):
        out += filler[prev:point] + at[point]
        prev = point
    return out + filler[prev:]


def _assemble(enc: Encoder, length: int, preamble: str, facts: Sequence[tuple[float, str]], question: str,
              answer_prefix: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Context and question ids totalling exactly `length` tokens: the haystack fills what the
    template, preamble, facts and question leave."""
    fact_ids = [(d, enc(" " + t)) for d, t in facts]
    head = enc.head + enc(preamble)
    q_ids = enc("\n" + question) + enc.tail + enc(answer_prefix)
    fixed = len(head) + sum(len(i) for _, i in fact_ids) + len(q_ids)
    room = length - fixed
    if room < 1:
        raise OptionError(f"length: {length} tokens leave no room for the haystack (the prompt without it takes "
                          f"{fixed}); ask for a longer length")
    filler, starts = _haystack(enc, room)
    return tuple(head + _insert(filler, starts, fact_ids)), tuple(q_ids)


# --- the tasks ----------------------------------------------------------------------------------

_NIAH_PREAMBLE = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                  "I will quiz you about the numbers afterwards.\n")


def _needle(key: str, value: str) -> str:
    return f"The special magic number for {key} is: {value}."


def _needle_answer(key: str) -> str:
    """The answer prefix: the needle up to its value, so the answer continues a sentence the text holds."""
    return f"The special magic number for {key} is:"


def single_needle(enc: Encoder, rng: random.Random, length: int, index: int, digits: int = 7) -> dict[str, Any]:
    key, value = _keys(rng, 1)[0], _number(rng, digits)
    depth = DEPTHS[index % len(DEPTHS)]
    ctx, q = _assemble(enc, length, _NIAH_PREAMBLE, [(depth, _needle(key, value))],
                       f"What is the special magic number for {key} mentioned in the provided text?",
                       _needle_answer(key))
    return dict(context_ids=ctx, question_ids=q, answers=(value,), kind="number", depth=depth,
                max_new_tokens=digits + 4)


def multi_key(enc: Encoder, rng: random.Random, length: int, index: int, keys: int = 4, digits: int = 7
              ) -> dict[str, Any]:
    names = _keys(rng, keys)
    values = [_number(rng, digits) for _ in names]
    depth = DEPTHS[index % len(DEPTHS)]
    facts = [(depth, _needle(names[0], values[0]))]
    facts += [(rng.random(), _needle(k, v)) for k, v in zip(names[1:], values[1:])]
    facts.sort(key=lambda f: f[0])
    ctx, q = _assemble(enc, length, _NIAH_PREAMBLE, facts,
                       f"What is the special magic number for {names[0]} mentioned in the provided text?",
                       _needle_answer(names[0]))
    return dict(context_ids=ctx, question_ids=q, answers=(values[0],), kind="number", depth=depth,
                max_new_tokens=digits + 4)


def multi_value(enc: Encoder, rng: random.Random, length: int, index: int, values: int = 2, digits: int = 7
                ) -> dict[str, Any]:
    key = _keys(rng, 1)[0]
    nums = []
    while len(nums) < values:
        v = _number(rng, digits)
        if v not in nums:
            nums.append(v)
    depths = sorted(rng.random() for _ in nums)
    count = _COUNTS.get(values, str(values))
    ctx, q = _assemble(enc, length, _NIAH_PREAMBLE,
                       [(d, f"One of the special magic numbers for {key} is: {v}.") for d, v in zip(depths, nums)],
                       f"What are the {count} special magic numbers for {key} mentioned in the provided text?",
                       f"The {count} special magic numbers for {key} are:")
    return dict(context_ids=ctx, question_ids=q, answers=tuple(nums), kind="number",
                max_new_tokens=values * (digits + 4) + 8)


_COUNTS = {2: "two", 3: "three", 4: "four"}


def _names(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = "".join(rng.choice(_LETTERS) for _ in range(5))
        if name not in out:
            out.append(name)
    return out


def variable_tracking(enc: Encoder, rng: random.Random, length: int, index: int, hops: int = 1, chains: int = 1,
                      digits: int = 5) -> dict[str, Any]:
    """`chains` chains of `hops` assignments each (`VAR A = 12345.`, `VAR B = VAR A.`, ...), each in
    order through the haystack; the question asks for the value of the last variable of the first
    chain, which only following its assignments back to the number answers (further chains are
    distractors; none by default). RULER asks for every variable of the chain instead, which a 135M
    model cannot list at any length; following the chain is the same long-range skill."""
    names = _names(rng, chains * (hops + 1))
    values: list[str] = []
    while len(values) < chains:
        v = _number(rng, digits)
        if v not in values:
            values.append(v)
    facts = []
    for c in range(chains):
        chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
        depths = sorted(rng.random() for _ in chain)
        facts.append((depths[0], f"VAR {chain[0]} = {values[c]}."))
        facts += [(d, f"VAR {b} = VAR {a}.") for d, a, b in zip(depths[1:], chain, chain[1:])]
    facts.sort(key=lambda f: f[0])
    last = names[hops]
    preamble = "Memorize and track the chains of variable assignment hidden in the following text.\n"
    ctx, q = _assemble(enc, length, preamble, facts,
                       f"Question: Following the chain of assignments in the text above, what is the value of VAR {last}?",
                       f"Answer: The value of VAR {last} is")
    return dict(context_ids=ctx, question_ids=q, answers=(values[0],), kind="number", max_new_tokens=digits + 4)


def _made_up_words(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(2))
        if w not in out:
            out.append(w)
    return out


def frequent_words(enc: Encoder, rng: random.Random, length: int, index: int, top: int = 1, vocab: int = 60,
                   alpha: float = 3.0) -> dict[str, Any]:
    """A list of made-up words drawn from a Zipf law (`p(rank r) ~ r^-alpha` over `vocab` words,
    ranks shuffled); the answer is the `top` most frequent. Drawing stops when the length is
    reached, so the answer is read off the actual counts (ties broken by resampling)."""
    words = _made_up_words(rng, vocab)
    weights = [1.0 / (r + 1) ** alpha for r in range(vocab)]
    preamble = ("Read the following coded text and track the frequency of each coded word. Find the "
                f"{'most frequently appeared coded word' if top == 1 else f'{top} most frequently appeared coded words'}.\n")
    question = (f"Question: What {'is the most frequently appeared word' if top == 1 else f'are the {top} most frequently appeared words'}"
                " in the above coded text?")
    prefix = (f"Answer: According to the coded text above, the {'most frequently appeared word is' if top == 1 else f'{top} most frequently appeared words are'}:")
    head = enc.head + enc(preamble)
    q_ids = enc("\n" + question) + enc.tail + enc(prefix)
    room = length - len(head) - len(q_ids)
    if room < 1:
        raise OptionError(f"length: {length} tokens leave no room for the word list (the prompt without it takes "
                          f"{len(head) + len(q_ids)}); ask for a longer length")
    for _ in range(100):
        body: list[int] = []
        counts: dict[str, int] = {}
        last: Optional[str] = None
        while True:
            w = rng.choices(words, weights)[0]
            ids = enc(" " + w)
            if len(body) + len(ids) > room:
                break
            body += ids
            counts[w] = counts.get(w, 0) + 1
            last = w
        pad = room - len(body)  # fewer tokens than the next word: finish with a period (or two)
        body += (enc(" .") * pad)[:pad] if pad else []
        ranked = sorted(counts.values(), reverse=True)
        if last is not None and len(ranked) > top and ranked[top - 1] > ranked[top]:
            answers = tuple(sorted(counts, key=lambda w: -counts[w])[:top])
            return dict(context_ids=tuple(head + body), question_ids=tuple(q_ids), answers=answers, kind="word",
                        vocabulary=tuple(words), max_new_tokens=top * 5 + 4)
    raise OptionError(f"length: {length} tokens are too few for a clear most frequent word; ask for a longer length")


# name -> generator(encoder, rng, length, index) -> Sample fields
TASKS: dict[str, Callable[..., dict[str, Any]]] = {
    "single_needle": single_needle,
    "multi_key": multi_key,
    "multi_value": multi_value,
    "variable_tracking": variable_tracking,
    "frequent_words": frequent_words,
}


def check_tasks(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise OptionError(f"tasks: expected names from {sorted(TASKS)}, got {unknown}")
    return list(names)


def make_sample(tokenizer_or_encoder: Any, task: str, length: int, index: int, seed: int = 0) -> Sample:
    """Sample `index` of `task` at `length` tokens: the same for the same arguments and tokenizer."""
    check_tasks([task])
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise OptionError(f"length: expected an int >= 1, got {length!r}")
    enc = tokenizer_or_encoder if isinstance(tokenizer_or_encoder, Encoder) else Encoder(tokenizer_or_encoder)
    rng = random.Random(f"attnkit-accuracy:{seed}:{task}:{length}:{index}")
    fields = TASKS[task](enc, rng, length, index)
    return Sample(task=task, length=length, index=index, seed=seed, **fields)
