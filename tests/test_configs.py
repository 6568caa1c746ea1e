"""Every YAML in train/configs validates against the training schema; the named recipes say what they claim."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

from m3bind.config import from_dict
from m3bind.modalities import MODALITIES
from train.config import TrainConfig, load_train_config
from train.medbind import MEDBindConfig
from train.mmclip import MMCLIPConfig
from train.selip import SeLIPConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "train" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
METHODS = {"medbind": MEDBindConfig, "mmclip": MMCLIPConfig, "selip": SeLIPConfig}


def _load(name: str) -> TrainConfig:
    return load_train_config(CONFIG_DIR / f"{name}.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_validates(path):
    cfg = load_train_config(path)
    assert isinstance(cfg, TrainConfig)
    assert set(cfg.data.modalities) <= set(MODALITIES) and set(cfg.teachers) >= set(
        cfg.data.modalities
    )


def _method_block(path: Path) -> dict | None:
    """The method options a config states in its comment block (``#   medbind: {...}``), parsed."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.search(r"need an? `\w+:` field", line):
            body = []
            for nxt in lines[i + 1 :]:
                if not nxt.startswith("#   "):
                    break
                body.append(nxt[2:])
            return yaml.safe_load("\n".join(body))
    return None


@pytest.mark.parametrize(
    "name,method",
    [
        ("medbind_nm", "medbind"),
        ("medbind_bd", "medbind"),
        ("mmclip", "mmclip"),
        ("selip", "selip"),
    ],
)
def test_method_options_validate(name, method):
    path = CONFIG_DIR / f"{name}.yaml"
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if method in fields:  # the schema has the field: the config must set it
        raw = yaml.safe_load(path.read_text())
        assert method in raw, f"{name}.yaml should set {method}:"
        return
    block = _method_block(path)
    assert block is not None and set(block) == {method}
    opts = from_dict(METHODS[method], block[method], where=f"{name}.{method}")
    assert isinstance(opts, METHODS[method])


def test_medbind_recipes_use_medbind_encoder_settings():
    nm, bd = _load("medbind_nm"), _load("medbind_bd")
    for cfg in (nm, bd, _load("ecg_clip")):
        assert cfg.dim == 256
        ecg = cfg.teacher("ecg")
        assert ecg.image.arch == "ecg_transformer" and ecg.image.in_chans == 12
        seq_len = ecg.image.params["seq_len"]
        assert seq_len == 1000 == round(ecg.preprocess["fs"] * ecg.preprocess["seconds"])
    assert nm.data.modalities == bd.data.modalities == ["cxr", "ecg"]
    assert nm.teacher("cxr").image.name.startswith("swin")
    assert nm.bind.emcl_weight == 0 and bd.bind.emcl_weight > 0
    assert not nm.bind.train_logit_scale  # τ stays at the initial 0.07
    for cfg in (nm, bd):  # TMCL trains both teachers; the cohort has a paired CXR-ECG subset
        assert cfg.medbind.text_loss == "tmcl" and set(cfg.medbind.modalities) == {"cxr", "ecg"}
        assert cfg.stage0_objective("cxr") == cfg.stage0_objective("ecg") == "medbind"
        assert cfg.data.generate_kwargs["paired_fraction"] > 0


def test_medbind_ecg_encoder_takes_12x1000():
    from m3bind.encoders import build_image_encoder

    img = _load("ecg_clip").teacher("ecg").image
    small = dataclasses.replace(
        img, params={**img.params, "depth": 1}
    )  # same input contract, faster
    trunk = build_image_encoder(small)
    assert trunk(torch.zeros(1, 12, 1000)).shape == (1, trunk.embed_dim)
    with pytest.raises(ValueError):
        trunk(torch.zeros(1, 12, 500))


def test_ablation_modalities_are_added_one_at_a_time():
    sets = [
        _load(f"ablation_modalities_{n}").data.modalities for n in range(2, len(MODALITIES) + 1)
    ]
    for prev, cur in zip(sets, sets[1:]):
        assert cur[:-1] == prev and len(cur) == len(prev) + 1
    assert sets[-1] == list(MODALITIES)


@pytest.mark.parametrize(
    "stem,path_to_flag",
    [("ablation_balancing", ("bind", "balancing")), ("ablation_seskd", ("distill", "enabled"))],
)
def test_on_off_ablations_differ_in_one_flag(stem, path_to_flag):
    on, off = _load(f"{stem}_on"), _load(f"{stem}_off")
    sect, flag = path_to_flag
    assert getattr(getattr(on, sect), flag) is True and getattr(getattr(off, sect), flag) is False
    a, b = dataclasses.asdict(on), dataclasses.asdict(off)
    a.pop("name"), b.pop("name")
    a[sect].pop(flag), b[sect].pop(flag)
    assert a == b


def test_method_configs_reject_bad_values():
    from m3bind.errors import ConfigError

    with pytest.raises(ConfigError):
        from_dict(MMCLIPConfig, {"lambda1": 0.0})
    with pytest.raises(ConfigError):
        from_dict(SeLIPConfig, {"extractor": "gpt"})
    with pytest.raises(ConfigError):
        from_dict(MEDBindConfig, {"text_loss": "infonce"})
    with pytest.raises(ConfigError):
        from_dict(SeLIPConfig, {"alpha": 0.0, "beta": 0.0})
