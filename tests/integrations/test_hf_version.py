"""`import attnkit.hf` refuses a transformers older than the supported floor, naming the version."""

from __future__ import annotations

import pytest

from attnkit.integrations import hf_version


@pytest.mark.parametrize("have", ["4.57.1", "5.3.0", "5.0.0rc1"])
def test_old_transformers_is_refused_with_the_version_needed(monkeypatch: pytest.MonkeyPatch, have: str) -> None:
    monkeypatch.setattr(hf_version, "version", lambda name: have)
    with pytest.raises(ImportError, match=rf"transformers >= 5\.4, found {have}"):
        hf_version.require_transformers()


@pytest.mark.parametrize("have", ["5.4.0", "5.25.0", "6.0.0.dev0"])
def test_supported_transformers_passes(monkeypatch: pytest.MonkeyPatch, have: str) -> None:
    monkeypatch.setattr(hf_version, "version", lambda name: have)
    assert hf_version.require_transformers() == have


def test_extras_name_the_same_floor() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    need = ".".join(map(str, hf_version.MIN_TRANSFORMERS))
    assert f'hf = ["transformers>={need}"' in text
