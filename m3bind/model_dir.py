"""The model directory format: writing, checking (no pickles, sha256 manifest) and reading.

Layout::

    config.json                 format_version, name, model_id, dim, modalities, model (architecture
                                configs), preprocess, logit_scale(s), lora, provenance, files (sha256)
    image_<modality>.safetensors
    text_<key>.safetensors      key = "shared" (student) or a modality
    text_<key>/                 Hugging Face config.json + tokenizer files (+ adapter/ for kept LoRA)
    logit_scales.safetensors
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from m3bind.config import from_dict, to_dict
from m3bind.errors import M3BindError, ModelDirError

if TYPE_CHECKING:
    from m3bind.model import BoundModel

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG = "config.json"
MAX_CONFIG_BYTES = 16 * 1024**2
#: Extensions of pickle-based formats, never read from a model directory.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_pickle_like(path: Path) -> str | None:
    """Why ``path`` looks like a pickle (or a zip container of one), else None."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return f"pickle-based file type {path.suffix}"
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) >= 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5):
        return "file starts with pickle opcodes"
    if head == b"PK\x03\x04":
        return "zip archive (torch.save container holding a pickle)"
    return None


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def check_model_dir(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Check a model directory and return its parsed ``config.json``.

    Args:
        path: The directory.
        verify: Also compare every file with its recorded sha256 (pickles are refused always).

    Raises:
        ModelDirError: One clear line for each way a directory can be wrong.
    """
    root = Path(path)
    if not root.exists():
        raise ModelDirError("model directory not found", str(root))
    if not root.is_dir():
        raise ModelDirError("not a model directory (a file was given)", str(root))
    cfg_path = root / CONFIG
    if not cfg_path.is_file():
        raise ModelDirError("not a model directory: config.json missing", str(root))
    if cfg_path.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelDirError("config.json too large", str(cfg_path))
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"config.json is not valid JSON: {e}", str(cfg_path)) from None
    if not isinstance(config, dict) or "format_version" not in config:
        raise ModelDirError("config.json has no format_version (not an m3bind model directory)", str(root))
    if config["format_version"] != FORMAT_VERSION:
        raise ModelDirError(f"unsupported model format version {config['format_version']!r} "
                            f"(this m3bind reads {FORMAT_VERSION})", str(root))
    recorded = config.get("files")
    if not isinstance(recorded, dict):
        raise ModelDirError("config.json has no file manifest", str(root))
    for p in _files(root):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            raise ModelDirError(f"symbolic link in model directory: {rel}", str(root))
        why = _is_pickle_like(p)
        if why:
            raise ModelDirError(f"refusing model directory holding a pickle: {rel} ({why})", str(root))
        if rel != CONFIG and rel not in recorded and not p.name.startswith("."):
            raise ModelDirError(f"file not in the manifest: {rel}", str(root))
    for rel, digest in recorded.items():
        p = root / rel
        if ".." in Path(rel).parts or not p.is_file():
            raise ModelDirError(f"manifest file missing: {rel}", str(root))
        if verify and file_sha256(p) != digest:
            raise ModelDirError(f"file does not match its recorded sha256: {rel}", str(root))
    return config


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Write ``config.json`` (sorted keys, indented)."""
    path.write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path))


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in state.items()}


def _is_peft(module: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, PeftModel)


def _without_lora(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` itself, or a copy with LoRA layers injected by peft merged into their base layers."""
    if not any("lora_" in n for n, _ in module.named_parameters()):
        return module
    from peft.tuners.tuners_utils import BaseTunerLayer

    module = copy.deepcopy(module)
    for name, sub in list(module.named_modules()):
        if isinstance(sub, BaseTunerLayer):
            sub.merge()
            parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            setattr(parent, name.rsplit(".", 1)[-1], sub.get_base_layer())
    return module


def _save_text(key: str, enc: torch.nn.Module, cfg, root: Path, merge_lora: bool) -> tuple[Any, str | None]:
    """Save one text encoder; returns its config as stored and its LoRA mode."""
    from m3bind.encoders import TextEncoderConfig
    from m3bind.encoders.text import OpenClipTextEncoder

    sub = root / f"text_{key}"
    sub.mkdir()
    if isinstance(enc, OpenClipTextEncoder):
        _save_tensors(enc.state_dict(), root / f"text_{key}.safetensors")
        hf_tok = getattr(enc.tokenizer, "tokenizer", None)
        path = None
        if hf_tok is not None and hasattr(hf_tok, "save_pretrained"):
            hf_tok.save_pretrained(str(sub))
            path = sub.name
        else:
            sub.rmdir()
        return TextEncoderConfig(arch="open_clip", path=path, pooling="eos", max_length=enc.max_length,
                                 params=dict(cfg.params)), None
    backbone, lora = enc.backbone, None
    if _is_peft(backbone):
        backbone = copy.deepcopy(backbone)
        if merge_lora:
            backbone, lora = backbone.merge_and_unload(), "merged"
        else:
            backbone.save_pretrained(str(sub / "adapter"), safe_serialization=True)
            backbone, lora = backbone.unload(), "adapter"
    backbone.config.save_pretrained(str(sub))
    enc.tokenizer.save_pretrained(str(sub))
    state = {**_prefixed("backbone.", backbone.state_dict()), **_prefixed("head.", enc.head.state_dict())}
    _save_tensors(state, root / f"text_{key}.safetensors")
    return TextEncoderConfig(arch="hf", path=sub.name, pooling=enc.pooling, max_length=enc.max_length), lora


def save_bound_model(model: "BoundModel", path: Path, provenance: dict[str, Any], merge_lora: bool) -> str:
    """Write ``model`` to directory ``path`` atomically; returns the model id."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / CONFIG).is_file())):
        raise ModelDirError("refusing to overwrite: not an empty folder or model directory", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        cfg = copy.deepcopy(model.config)
        for m, enc in model.image_encoders.items():
            _save_tensors(_without_lora(enc).state_dict(), tmp / f"image_{m}.safetensors")
            cfg.image[m].weights = None  # the weights now live in the directory
        lora = {}
        for key, enc in model.text_encoders.items():
            cfg.text[key], lora[key] = _save_text(key, enc, cfg.text[key], tmp, merge_lora)
        _save_tensors(dict(model.logit_scales.items()), tmp / "logit_scales.safetensors")
        files = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in _files(tmp)}
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        model_id = f"{cfg.name}-{digest[:12]}"
        write_config(tmp / CONFIG, {
            "format_version": FORMAT_VERSION, "name": cfg.name, "model_id": model_id, "dim": cfg.dim,
            "modalities": list(model.image_encoders), "text_mode": "shared" if model.shared_text else "per_modality",
            "model": to_dict(cfg), "preprocess": to_dict(cfg.preprocess),
            "logit_scale": model.logit_scale,
            "logit_scales": {m: model.logit_scale_for(m) for m in model.image_encoders},
            "lora": lora, "provenance": provenance, "files": files})
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved model %s to %s", model_id, path)
    return model_id


def _load_state(module: torch.nn.Module, file: Path, root: Path) -> None:
    try:
        state = load_file(str(file))
        module.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise ModelDirError(f"cannot load {file.name}: {' '.join(str(e).split())[:300]}", str(root)) from None


def load_bound_model(path: Path, verify: bool = True) -> "BoundModel":
    """Check and read a model directory (see :func:`m3bind.model.load_model`)."""
    from m3bind.model import BoundModel, BoundModelConfig

    config = check_model_dir(path, verify=verify)
    try:
        cfg = from_dict(BoundModelConfig, config["model"], where="config.json:model")
    except (KeyError, M3BindError) as e:
        raise ModelDirError(f"invalid model config: {e}", str(path)) from None
    model = BoundModel.from_config(cfg, load_weights=False, root=path)
    for m, enc in model.image_encoders.items():
        _load_state(enc, path / f"image_{m}.safetensors", path)
    lora = config.get("lora") or {}
    for key, enc in model.text_encoders.items():
        _load_state(enc, path / f"text_{key}.safetensors", path)
        if lora.get(key) == "adapter":
            from peft import PeftModel

            enc.backbone = PeftModel.from_pretrained(enc.backbone, str(path / f"text_{key}" / "adapter"),
                                                     is_trainable=False)
    scales = load_file(str(path / "logit_scales.safetensors"))
    with torch.no_grad():
        for m, p in model.logit_scales.items():
            p.copy_(scales[m])
    model._model_id = config.get("model_id")
    return model.eval()
