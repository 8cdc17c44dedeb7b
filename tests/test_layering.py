"""The layers of the package, held by parsing every import (lazy ones too): imports flow downward,
`core` imports nothing of attnkit, `kernels` only `core`, `ops` neither `kv` nor the registry,
`methods` only public `ops` modules, and no module imports another module's private name across
packages. The scripts of `benchmarks/` and `scripts/` use only public modules and names, like any
user of the library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "attnkit"

# lower imports nothing higher; `config` imports nothing of attnkit and every layer may read it
RANK = {
    "config": 0, "core": 0,
    "kernels": 1,
    "ops": 2,
    "registry": 3,
    "api": 4, "methods": 4, "linear": 4, "kv": 4, "distributed": 4,
    "layers": 5, "models": 5,
    "integrations": 6, "bench": 6, "hf": 6, "cli": 6,
    "__init__": 7, "__main__": 7,
}
# same-rank packages that may import each other (and which way)
ALLOWED_SIDEWAYS = {("layers", "models"), ("models", "layers"), ("bench", "integrations"), ("integrations", "bench"),
                    ("bench", "cli"), ("cli", "bench"), ("hf", "integrations"),
                    ("distributed", "api"),  # the distributed blocks run local attention through attnkit.attention
                    ("api", "linear")}  # `explain` answers for the linear family's direct calls


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module relative to attnkit, names imported from it, line) for every attnkit import."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "attnkit" or a.name.startswith("attnkit."):
                    found.append((a.name[len("attnkit."):] if "." in a.name else "", [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and (node.module == "attnkit" or node.module.startswith("attnkit.")):
                    mod = node.module[len("attnkit."):] if "." in node.module else ""
                    found.append((mod, [a.name for a in node.names], node.lineno))
                continue
            base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
            mod = ".".join(base + ([node.module] if node.module else []))
            found.append((mod, [a.name for a in node.names], node.lineno))
    return found


def _targets(mod: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """The attnkit modules an import statement reaches (`from . import x` reaches module x)."""
    if mod == "":
        return [n for n in names if n in modules or n + ".__init__" in modules] or ["__init__"]
    out = []
    for n in names:
        sub = f"{mod}.{n}"
        if sub in modules or sub + ".__init__" in modules:
            out.append(sub)
    return out or [mod]


def _top(mod: str) -> str:
    return mod.split(".")[0] if mod else "__init__"


def _violations() -> list[str]:
    modules = _modules()
    bad = []
    for name, path in sorted(modules.items()):
        src_top = _top(name)
        for mod, names, line in _imports(name, path):
            for target in _targets(mod, names, modules):
                dst_top = _top(target)
                where = f"{path.relative_to(SRC.parent)}:{line} imports attnkit.{target}"
                if dst_top == src_top:
                    continue
                if dst_top == "__init__" and RANK.get(src_top, 0) >= RANK["bench"]:
                    continue  # the applications (benchmark, integrations, CLI) may use the public face
                if src_top not in RANK or dst_top not in RANK:
                    bad.append(f"{where}: package not in the layer map")
                    continue
                if RANK[dst_top] > RANK[src_top] or (RANK[dst_top] == RANK[src_top] and dst_top != "config"
                                                     and (src_top, dst_top) not in ALLOWED_SIDEWAYS
                                                     and src_top not in ("config", "core")):
                    bad.append(f"{where}: upward ({src_top} -> {dst_top})")
                if src_top == "core" and dst_top != "core":
                    bad.append(f"{where}: core imports nothing of attnkit")
                if src_top == "kernels" and dst_top not in ("core", "config"):
                    bad.append(f"{where}: kernels import only core")
                # private modules and names stay inside their package
                private_mod = any(p.startswith("_") and not p.startswith("__") for p in target.split(".")[1:])
                private_names = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private_mod or private_names:
                    bad.append(f"{where} {private_names or ''}: private across packages")
    return bad


def test_imports_flow_downward() -> None:
    bad = _violations()
    assert not bad, f"{len(bad)} layering violations:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", sorted(p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()))
def test_every_package_has_a_layer(package: str) -> None:
    assert package in RANK, f"attnkit.{package} is not placed in the layer map of tests/test_layering.py"


def _private_imports(path: Path) -> list[str]:
    """`file:line name` for each import of a private attnkit module or name (absolute imports)."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            mods = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [(node.module, [a.name for a in node.names])]
        else:
            continue
        for mod, names in mods:
            parts = mod.split(".")
            if parts[0] != "attnkit":
                continue
            private = [p for p in parts[1:] if p.startswith("_") and not p.startswith("__")]
            private += [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                bad.append(f"{path.relative_to(SRC.parents[1])}:{node.lineno} {mod} {private}")
    return bad


def test_scripts_import_only_public_names() -> None:
    root = SRC.parents[1]
    files = sorted(p for d in ("benchmarks", "scripts") for p in (root / d).rglob("*.py"))
    assert files, "no scripts found under benchmarks/ or scripts/"
    bad = [b for f in files for b in _private_imports(f)]
    assert not bad, "private attnkit imports in scripts (use or add a public name):\n" + "\n".join(bad)
