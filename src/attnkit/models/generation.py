"""Autoregressive generation for `DecoderLM`: greedy or sampling (temperature, top-k, top-p),
reproducible with a seed. Prefill once, then one token per step through the cache."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..core.contract import AttnkitError


def _filter(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """Mask logits `[B, V]` outside the top-k and the top-p nucleus with -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _check(max_new_tokens: object, temperature: object, top_k: object, top_p: object) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise AttnkitError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature <= 0:
        raise AttnkitError(f"temperature: expected a float > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise AttnkitError(f"top_k: expected None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise AttnkitError(f"top_p: expected None or a float in (0, 1], got {top_p!r}")


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    use_cache: Optional[bool] = None,
) -> torch.Tensor:
    """Return `[B, T + n]`: the prompt followed by up to `max_new_tokens` tokens per row.

    Greedy unless `do_sample`; sampling draws from a `torch.Generator` seeded with `seed`, so a
    seed reproduces the output. After `eos_token_id` a row is padded with it and generation stops
    when every row has ended. `use_cache=None` decodes with the cache when every layer's method
    can decode, else recomputes the full forward each step."""
    _check(max_new_tokens, temperature, top_k, top_p)
    if use_cache is None:
        use_cache = model.can_decode()
    gen = None
    if do_sample:
        gen = torch.Generator(device=input_ids.device)
        gen.manual_seed(seed if seed is not None else int(torch.seed() % (2 ** 63)))
    was_training = model.training
    model.eval()
    try:
        out = input_ids
        cache = model.new_cache() if use_cache else None
        logits = model(input_ids, cache=cache)[:, -1]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            if do_sample:
                probs = torch.softmax(_filter(logits.float() / temperature, top_k, top_p), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
            else:
                nxt = logits.argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if (eos_token_id is not None and bool(done.all())) or step == max_new_tokens - 1:
                break
            logits = (model(nxt[:, None], cache=cache) if use_cache else model(out))[:, -1]
        return out
    finally:
        model.train(was_training)
