"""The package's structure: imports flow one way and the two transports stay apart.

core <- (data, models, module, evaluation, reporting) <- strategies, callbacks <- runtime
     <- config (recipes and the run builder), driver <- simulation, fedml_adapters <- cli
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lightning_fedprune"

#: layer of each top-level part of the package; a module may import only from its layer or below
LAYERS = {
    "errors": 0,
    "core": 1,
    "data": 2,
    "models": 2,
    "module": 2,
    "evaluation": 2,
    "reporting": 2,
    "trainer_utils": 2,
    "strategies": 3,
    "callbacks": 3,
    "runtime": 4,
    "config": 5,
    "driver": 5,
    "simulation": 6,
    "fedml_adapters": 6,
    "cli": 7,
    "experiments": 7,
    "__main__": 8,
    "__init__": 8,
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> list[tuple[Path, str, str, list[str]]]:
    """(file, its part, imported lightning_fedprune module, imported names) for every import."""
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        mod = ".".join(rel.parts)
        part = "__init__" if mod == "lightning_fedprune.__init__" else _part(mod)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_fedprune"):
                out.append((path, part, node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("lightning_fedprune"):
                        out.append((path, part, a.name, []))
    return out


IMPORTS = _imports()


def test_every_part_has_a_layer():
    assert {p for _, p, _, _ in IMPORTS} <= set(LAYERS)
    assert {_part(m) for _, _, m, _ in IMPORTS} <= set(LAYERS)


def test_imports_flow_one_way():
    upward = [
        f"{path.relative_to(PKG)} imports {module}"
        for path, part, module, _ in IMPORTS
        if LAYERS[_part(module)] > LAYERS[part]
    ]
    assert upward == []


@pytest.mark.parametrize("a, b", [("simulation", "fedml_adapters"), ("fedml_adapters", "simulation")])
def test_the_transports_do_not_import_each_other(a, b):
    assert [m for _, part, m, _ in IMPORTS if part == a and _part(m) == b] == []


def test_no_private_name_is_imported_across_packages():
    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    crossing = [
        f"{path.relative_to(PKG)}: {module}.{name}"
        for path, part, module, names in IMPORTS
        for name in names
        if name.startswith("_") and not name.endswith("__") and package(module) != f"lightning_fedprune.{part}"
    ]
    assert crossing == []


def test_the_fedml_side_never_builds_a_simulation():
    text = "\n".join(p.read_text(encoding="utf-8") for p in (PKG / "fedml_adapters").rglob("*.py"))
    assert "SimulationEngine" not in text and "build_run" not in text and "make_devices" not in text
