"""Configs: YAML -> dataclasses with overrides, unknown keys refused, validation surfaced."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from m3bind.config import apply_overrides, from_dict, load_yaml, to_dict
from m3bind.errors import ConfigError


@dataclass
class Inner:
    arch: str = field(default="a", metadata={"help": "which"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError("lr must be positive")


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    per: dict[str, Inner] = field(default_factory=dict)
    sizes: tuple[int, ...] = (1, 2)
    maybe: Inner | None = None


def test_nested_build_and_int_to_float():
    cfg = from_dict(Outer, {"inner": {"lr": 1}, "per": {"cxr": {"arch": "b"}}, "sizes": [3, 4, 5]})
    assert isinstance(cfg.inner, Inner) and cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.per["cxr"].arch == "b" and isinstance(cfg.per["cxr"], Inner)
    assert cfg.sizes == (3, 4, 5)
    assert cfg.maybe is None
    assert from_dict(Outer, {"maybe": {"arch": "z"}}).maybe.arch == "z"


def test_unknown_key_and_validation_errors():
    with pytest.raises(ConfigError, match="unknown keys"):
        from_dict(Outer, {"inner": {"nope": 1}})
    with pytest.raises(ConfigError, match="lr must be positive"):
        from_dict(Outer, {"inner": {"lr": -1}})


def test_overrides_parse_yaml_scalars():
    data = apply_overrides({"inner": {"lr": 0.1}}, ["inner.lr=2e-4", "name=run", "per.ct.arch=c", "sizes=[7]"])
    assert data == {"inner": {"lr": 2e-4}, "name": "run", "per": {"ct": {"arch": "c"}}, "sizes": [7]}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])


def test_load_yaml_roundtrip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: demo\ninner:\n  arch: q\n")
    cfg = load_yaml(p, Outer, ["inner.lr=0.5"])
    assert cfg.name == "demo" and cfg.inner.arch == "q" and cfg.inner.lr == 0.5
    assert from_dict(Outer, to_dict(cfg)) == cfg
    p.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(p, Outer)


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  lr: 3e-4\n")
    assert load_yaml(p, Outer).inner.lr == pytest.approx(3e-4)
    p.write_text("inner:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="expected a number"):
        load_yaml(p, Outer)
