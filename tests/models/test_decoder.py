"""The reference decoder LM: trains on CPU with the loss going down, saves and reloads to
identical outputs, generates (greedy = no-cache recompute; seeded sampling reproducible)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from attnkit.core.contract import AttnkitError
from attnkit.models import DecoderConfig, DecoderLM

TINY = dict(vocab_size=32, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)


def _batch(gen: torch.Generator, B: int = 4, T: int = 24) -> torch.Tensor:
    """Sequences of a fixed permutation `x -> (5 x + 3) mod V` from random starts: learnable in
    a few dozen steps, far from the uniform loss log(V) at the start."""
    x = torch.randint(0, TINY["vocab_size"], (B, 1), generator=gen)
    rows = [x]
    for _ in range(T - 1):
        x = (x * 5 + 3) % TINY["vocab_size"]
        rows.append(x)
    return torch.cat(rows, 1)


def test_trains_50_steps_loss_goes_down() -> None:
    cfg = DecoderConfig(**TINY, num_layers=2, layers="gla,dense", output_gate=True, linear={"short_conv": True})
    model = DecoderLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        ids = _batch(gen)
        _, loss = model(ids, labels=ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.25 * first, f"loss did not go down enough: first 5 steps {first:.3f}, last 5 steps {last:.3f}"


@pytest.mark.parametrize("tie", [True, False])
def test_save_reload_identical(tmp_path, tie: bool) -> None:
    cfg = DecoderConfig(**TINY, num_layers=4, layers="3:1", linear_method="kda", full_method="moba",
                        method_options={"moba": {"block_size": 4, "topk": 2}}, tie_embeddings=tie)
    model = DecoderLM(cfg).eval()
    model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert json.load(open(tmp_path / "config.json"))["layers"] == "3:1"
    again = DecoderLM.from_pretrained(str(tmp_path)).eval()
    assert (again.lm_head.weight is again.embed.weight) == tie
    ids = torch.randint(0, TINY["vocab_size"], (2, 20))
    assert torch.equal(model(ids), again(ids))
    assert [b.method for b in again.blocks] == ["kda", "kda", "kda", "moba"]


def test_generate_greedy_matches_recompute_and_sampling_is_seeded() -> None:
    cfg = DecoderConfig(**TINY, num_layers=2, layers="gated_delta_rule,sliding_window",
                        method_options={"sliding_window": {"window": 6}})
    model = DecoderLM(cfg)
    prompt = torch.randint(0, TINY["vocab_size"], (2, 5))
    cached = model.generate(prompt, 8)
    assert cached.shape == (2, 13) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, model.generate(prompt, 8, use_cache=False))
    s1 = model.generate(prompt, 8, do_sample=True, temperature=0.8, top_k=10, top_p=0.9, seed=3)
    s2 = model.generate(prompt, 8, do_sample=True, temperature=0.8, top_k=10, top_p=0.9, seed=3)
    assert torch.equal(s1, s2)
    eos = int(cached[0, 5])
    stopped = model.generate(prompt[:1], 8, eos_token_id=eos)
    assert stopped.shape[1] == 6 and int(stopped[0, -1]) == eos


def test_dsa_indexer_loss_is_added() -> None:
    cfg = DecoderConfig(**TINY, num_layers=1, layers="dsa", method_options={"dsa": {"topk": 4}},
                        attention={"inputs": {"heads": 2, "dim": 8}})
    model = DecoderLM(cfg)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    _, loss = model(ids, labels=ids)
    loss.backward()
    assert model.blocks[0].mixer.inputs.wq.weight.grad.abs().sum() > 0


def test_bad_config_and_inputs_raise() -> None:
    with pytest.raises(AttnkitError, match="num_layers"):
        DecoderConfig(**TINY, num_layers=3, layers="gla,dense")
    with pytest.raises(AttnkitError, match="hidden_size"):
        DecoderConfig(hidden_size=0)
    model = DecoderLM(DecoderConfig(**TINY, num_layers=1))
    with pytest.raises(AttnkitError, match="input_ids"):
        model(torch.full((1, 4), TINY["vocab_size"]))
    with pytest.raises(AttnkitError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), -1)
