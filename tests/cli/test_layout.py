"""The layout holds: imports run one way (datamodules <- lightning_modules <- callbacks <- cli), everything
installs under the ``neurolight`` namespace, recipes name package exports, and files stay small."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).parents[2]
# Each floor may import only from the floors listed before it.
FLOORS = ("datamodules", "lightning_modules", "callbacks", "cli")
FOLDERS = {"datamodules": ROOT / "datamodules", "lightning_modules": ROOT / "lightning_modules",
           "callbacks": ROOT / "callbacks", "cli": ROOT / "neurolight" / "cli"}  # fmt: skip
MAX_LINES = 420


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("floor", FLOORS)
def test_imports__run_one_way_and_always_through_the_neurolight_namespace(floor):
    above = {f"neurolight.{name}" for name in FLOORS[FLOORS.index(floor) + 1 :]}
    bad = []
    for path in _sources(FOLDERS[floor]):
        for name in _imported_modules(path):
            top = name.split(".")[0]
            if top in ("lightning_modules", "datamodules", "callbacks", "configs", "tests"):
                bad.append(f"{path.relative_to(ROOT)} imports '{name}' outside the neurolight namespace")
            if any(name == up or name.startswith(up + ".") for up in above):
                bad.append(f"{path.relative_to(ROOT)} imports '{name}' from a floor above {floor}")
    assert not bad, "\n".join(bad)


def test_pyproject__lists_every_package_under_the_neurolight_namespace():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    expected = set()
    for package, folder in setuptools["package-dir"].items():
        for directory in [ROOT / folder, *sorted((ROOT / folder).rglob("*"))]:
            if directory.is_dir() and "__pycache__" not in directory.parts:
                if (directory / "__init__.py").is_file() or folder == "configs":
                    rel = directory.relative_to(ROOT / folder).parts
                    nested = [p for p in setuptools["package-dir"] if p != package and p.startswith(package + ".")]
                    name = ".".join((package, *rel))
                    if not any(name == n or name.startswith(n + ".") for n in nested):
                        expected.add(name)
    assert expected == set(setuptools["packages"]), (
        f"missing from pyproject's packages: {sorted(expected - set(setuptools['packages']))}; "
        f"listed but absent: {sorted(set(setuptools['packages']) - expected)}"
    )


def _class_paths(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return found + [p for value in node.values() for p in _class_paths(value)]
    if isinstance(node, list):
        return [p for value in node for p in _class_paths(value)]
    return []


def test_recipes__name_neurolight_classes_by_their_package_exports():
    recipes = sorted((ROOT / "configs").rglob("*.yaml"))
    seen = 0
    for recipe in recipes:
        for class_path in _class_paths(yaml.safe_load(recipe.read_text())):
            if not class_path.startswith("neurolight."):
                continue
            seen += 1
            package, _, name = class_path.rpartition(".")
            assert package.count(".") == 1, f"{recipe.relative_to(ROOT)}: {class_path} names a module path"
            assert name in importlib.import_module(package).__all__, f"{class_path} is not exported"
    assert seen >= 20


def test_public_api__every_export_of_neurolight_resolves():
    import neurolight

    for name in neurolight.__all__:
        value = getattr(neurolight, name)
        assert name == "MODELS" or value.__name__ == name, name


@pytest.mark.parametrize("folder", ["neurolight", "lightning_modules", "datamodules", "callbacks", "tests"])
def test_files__stay_small(folder):
    long = {
        str(p.relative_to(ROOT)): n
        for p in sorted((ROOT / folder).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES and not re.match(r"test_", p.name)
    }
    assert not long, f"files over {MAX_LINES} lines (split them by job): {long}"
