"""Every fenced ```python block in README.md and docs/ runs as written (CPU, the shapes on the page).

The blocks of one page run in order in one namespace, so a page can build on its earlier blocks.
A deliberate fragment (a signature, pseudo-code) uses another fence (```text, ```pycon) and is not run.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block."""
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


def test_fence_parser_finds_blocks() -> None:
    text = "x\n```python\na = 1\n```\n```text\nnot run\n```\n```python\nb = 2\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (9, "b = 2\n")]


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p.read_text())]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    torch.manual_seed(0)
    # a real module, so that dataclasses and pickling defined in an example can find it
    module = types.ModuleType("__docs__")
    monkeypatch.setitem(sys.modules, "__docs__", module)
    namespace = module.__dict__
    for line, code in python_blocks(page.read_text()):
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"{page.relative_to(ROOT)} line {line}: {type(e).__name__}: {e}")
