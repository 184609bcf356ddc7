"""The layers import one way (README, Layout): no module imports a module of a layer above it,
and the two middle stacks (clients on defenses; adversary) never import each other."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedsim", "defenses", "clients", "adversary", "server")

# layer -> the layers its modules may import (their own included)
ALLOWED = {
    "ground": {"ground"},
    "defenses": {"ground", "defenses"},
    "clients": {"ground", "defenses", "clients"},
    "adversary.observation": {"ground"},
    "adversary.scoring": {"ground", "adversary.scoring"},
    "adversary.maths": {"ground", "defenses", "adversary.observation", "adversary.maths"},
    "adversary.priors": {"ground", "defenses", "adversary.observation", "adversary.maths", "adversary.priors"},
    "adversary.attacks": {"ground", "defenses", "adversary.observation", "adversary.maths", "adversary.priors",
                          "adversary.attacks"},
    "adversary.runtime": {"ground", "defenses", "adversary.observation", "adversary.maths", "adversary.priors",
                          "adversary.attacks", "adversary.scoring", "adversary.runtime"},
    "server": {"ground", "defenses", "adversary.observation", "adversary.maths", "adversary.priors",
               "adversary.attacks", "adversary.scoring", "adversary.runtime", "server"},
    "wiring": {"ground", "defenses", "clients", "adversary.observation", "adversary.maths", "adversary.priors",
               "adversary.attacks", "adversary.scoring", "adversary.runtime", "server", "wiring"},
}


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name of this project; None for third-party modules."""
    top = module.split(".")[0]
    if top not in PACKAGES:
        return None
    if module == "fedsim.run" or module.startswith("fedsim.run."):
        return "wiring"
    if top == "fedsim":
        return "ground"
    if top == "adversary":
        parts = module.split(".")
        if len(parts) == 1:
            return "adversary.observation"  # the package itself holds nothing
        return "adversary.observation" if parts[1] == "observation" else f"adversary.{parts[1]}"
    return top


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(here: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted module) of every import statement in module ``here``'s ``source``,
    function bodies included."""
    package = here if is_package else here.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import mod" imports pkg.mod when mod is a module of the project
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                    (ROOT / Path(*candidate.split("."))).is_dir()
                found.append((node.lineno, candidate if is_module else base))
    return found


def arrows_back(here: str, source: str, is_package: bool = False) -> list[str]:
    """The imports of module ``here`` that its layer may not make."""
    layer = layer_of(here)
    return [f"line {line}: {here} ({layer}) imports {target} ({layer_of(target)})"
            for line, target in imports_of(here, source, is_package)
            if layer_of(target) is not None and layer_of(target) not in ALLOWED[layer]]


SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_source_module_has_a_layer():
    assert SOURCES and all(layer_of(module_name(p)) in ALLOWED for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_runs_back_up(path):
    wrong = arrows_back(module_name(path), path.read_text(), path.name == "__init__.py")
    assert not wrong, "\n".join(wrong)


def test_the_walker_catches_arrows_back():
    """Imports at any depth and in every form are seen, relative ones resolved."""
    source = "import torch\ndef f():\n    from fedsim.run import cli\n"
    assert arrows_back("fedsim.data", source) == ["line 3: fedsim.data (ground) imports fedsim.run.cli (wiring)"]
    assert arrows_back("adversary.maths.labels", "from ..runtime.registry import ATTACKS\n")
    assert arrows_back("clients.app", "import adversary.observation\n")
    assert arrows_back("adversary.attacks.geiping", "from clients.training import train_locally\n")
    assert not arrows_back("server.strategy", "from adversary.observation import observe\n")
