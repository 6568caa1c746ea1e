"""Shared foundations: registry, errors, the modality registry, and the one-way import rule."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from m3bind.errors import CorruptFile, M3BindError
from m3bind.modalities import MODALITIES, SPECS, get_spec
from m3bind.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def test_registry_decorator_and_errors():
    reg: Registry = Registry("thing")

    @reg.register("a")
    def build_a():
        return 1

    assert reg.get("a") is build_a and "a" in reg and reg.names() == ["a"]
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(lambda: 2)
    with pytest.raises(KeyError, match="known: a"):
        reg.get("b")


def test_error_is_one_line_with_path():
    e = CorruptFile("truncated\n pixel data", "/x/y.dcm")
    assert isinstance(e, M3BindError)
    assert e.line() == "truncated pixel data (/x/y.dcm)" and "\n" not in str(e)


def test_modality_specs_consistent():
    assert set(SPECS) == set(MODALITIES) and len(MODALITIES) == 6
    for name in MODALITIES:
        spec = get_spec(name)
        assert spec.name == name
        assert len(spec.labels) == len(set(spec.labels)) >= 2
        assert all("{}" in t for t in spec.templates)
        assert set(spec.descriptions) <= set(spec.labels)
    with pytest.raises(ValueError, match="unknown modality"):
        get_spec("pet")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package,forbidden", [
    ("m3bind", {"train", "app", "data_registry"}),
    ("data_registry", {"train", "app"}),
    ("app", {"train"}),
])
def test_imports_point_one_way(package, forbidden):
    bad = {str(p.relative_to(ROOT)): _imports(p) & forbidden for p in (ROOT / package).rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}
