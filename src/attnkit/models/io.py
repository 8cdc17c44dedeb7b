"""Persistence for `DecoderLM`: `config.json` plus `model.safetensors` in one directory.

A tied `lm_head` is not written (safetensors stores no aliases); loading re-ties it and checks
that every parameter is present with its shape, so a mismatch fails with the tensor's name."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..core.contract import AttnkitError
from .config import DecoderConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _tensors(model: Any) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_pretrained(model: Any, path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        f.write(model.config.to_json())
    save_file(_tensors(model), os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt", "library": "attnkit"})


def load_pretrained(cls: type, path: str, device: str = "cpu") -> Any:
    from safetensors.torch import load_file

    cfg_path, w_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise AttnkitError(f"path: expected a directory with {CONFIG_NAME} and {WEIGHTS_NAME}, missing {p}")
    with open(cfg_path) as f:
        config = DecoderConfig.from_dict(json.load(f))
    model = cls(config)
    tensors = load_file(w_path, device=str(device))
    expected = _tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AttnkitError(f"{WEIGHTS_NAME}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise AttnkitError(f"{name}: expected shape {tuple(expected[name].shape)}, got {tuple(t.shape)}")
    model.load_state_dict(tensors, strict=not config.tie_embeddings)
    return model.to(device)
