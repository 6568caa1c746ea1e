"""The training loop every stage shares: resume, seeds, autocast, clipping, skipping, logging.

:func:`train_loop` runs ``step_fn(step) -> {"<name>_loss": tensor}`` for ``total`` steps with
AdamW + warm-up/cosine, gradient averaging across ranks (the DDP gradient mean, done by hand
so that the loss functions can call any method of the modules, not only ``forward``),
gradient clipping, non-finite steps skipped and counted, a tqdm bar, a metrics CSV (and
TensorBoard when installed and asked for) and an atomic checkpoint every ``ckpt_every`` steps,
from which a rerun resumes.

For kill/resume tests the environment variable ``M3BIND_KILL_AT=<loop name>:<step>`` makes the
process SIGKILL itself right after completing that step (and its checkpoint, if one is due).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from m3bind.errors import M3BindError
from train import distributed as D
from train.checkpoint import load_checkpoint, save_checkpoint
from train.config import RuntimeConfig
from train.data import stream_seed

log = logging.getLogger(__name__)

KILL_ENV = "M3BIND_KILL_AT"


@dataclass
class Runtime:
    """Resolved runtime: device, distributed info, autocast, output folder."""

    cfg: RuntimeConfig
    dist: D.DistInfo
    out: Path
    metrics_path: Path = field(init=False)

    def __post_init__(self):
        self.metrics_path = self.out / "metrics.csv"

    @property
    def device(self) -> torch.device:
        """The torch device of this process."""
        return torch.device(self.dist.device)

    @property
    def on_gpu(self) -> bool:
        """True on CUDA."""
        return self.device.type == "cuda"

    def autocast(self):
        """bf16 autocast on GPU when enabled, else a no-op context."""
        if self.on_gpu and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def seed(self, stream: str, index: int = 0) -> int:
        """A stable seed for one stream/step of this run."""
        return stream_seed(self.cfg.seed, stream, index)


def warmup_cosine(warmup: int, total: int, floor: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` at ``total``."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class MetricsLog:
    """Append-only CSV of ``stage, step, time, lr, <loss terms>`` (rank 0 only); TensorBoard optional."""

    def __init__(self, path: Path, enabled: bool, tensorboard: bool = False):
        self.path, self.enabled = path, enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                log.info("TensorBoard not installed; metrics go to %s only", path)

    def write(self, stage: str, step: int, values: Mapping[str, float]) -> None:
        """One row (columns ``stage, step, time, name, value`` in long format)."""
        if not self.enabled:
            return
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["stage", "step", "time", "name", "value"])
            now = f"{time.time():.3f}"
            for k, v in values.items():
                w.writerow([stage, step, now, k, f"{float(v):.6g}"])
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{stage}/{k}", float(v), step)


def trainable(modules: Mapping[str, nn.Module]) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` of the given modules (each once)."""
    seen, out = set(), []
    for mod in modules.values():
        for p in mod.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def broadcast_parameters(modules: Mapping[str, nn.Module]) -> None:
    """Rank 0's parameters and buffers on every rank (identical starting points)."""
    if not D.is_distributed():
        return
    for mod in modules.values():
        for t in list(mod.parameters()) + list(mod.buffers()):
            torch.distributed.broadcast(t.data, src=0)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Mean of each gradient over ranks, as DDP does (no-op in one process)."""
    if not D.is_distributed():
        return
    world = D.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= world


def changing_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The part of ``module``'s state dict a training step can change: trainable parameters and
    buffers (e.g. BatchNorm statistics). Frozen weights are rebuilt identically on resume (the same
    pretrained files, seeded initialisation), so checkpoints leave them out: a frozen MiniLM is
    90 MB per text encoder, written at every checkpoint otherwise."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    names |= {n for n, _ in module.named_buffers()}
    return {k: v for k, v in module.state_dict().items() if k in names}


def _load_changing_state(module: nn.Module, saved: Mapping[str, torch.Tensor], name: str) -> None:
    result = module.load_state_dict(dict(saved), strict=False)
    expected = set(changing_state(module))
    if result.unexpected_keys or expected - set(saved):
        raise M3BindError(f"{name}: the checkpoint does not match the module "
                          f"(unexpected {sorted(result.unexpected_keys)[:3]}, "
                          f"missing {sorted(expected - set(saved))[:3]})")


def _maybe_kill(name: str, step: int) -> None:
    target = os.environ.get(KILL_ENV, "")
    if target and target == f"{name}:{step}":
        log.warning("%s=%s: killing the process after step %d of %s", KILL_ENV, target, step, name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def _floats(terms: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors as Python floats, read from the device in one go."""
    if not terms:
        return {}
    values = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).tolist()
    return dict(zip(terms, values))


def train_loop(name: str, rt: Runtime, modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer,
               total: int, warmup: int, step_fn: Callable[[int], Mapping[str, torch.Tensor]],
               metrics: MetricsLog, start_step: int = 0, state: dict | None = None,
               after_step: Callable[[int], Mapping[str, float]] | None = None) -> dict:
    """Run ``step_fn`` from the latest checkpoint of ``name`` (or ``start_step``) to ``total``.

    Args:
        name: Loop name (checkpoint folder ``<out>/checkpoints/<name>``, metrics stage column).
        rt: Runtime.
        modules: Name -> module whose state dict is checkpointed (trainable or not).
        optimizer: The optimizer (its param groups carry each group's peak ``lr``).
        total: Total steps.
        warmup: Warm-up steps of the LR schedule.
        step_fn: Computes the named loss terms of one step (forward only).
        metrics: Metrics log.
        start_step: First step when no checkpoint exists.
        state: Extra JSON state to checkpoint (updated in place from a checkpoint).
        after_step: Called with the step count after each optimizer step (outside autocast, the
            modules in train mode); the values it returns, if any, go to the metrics log at that
            step (a held-out curve). It must not draw from the global RNG.

    Returns:
        Summary ``{"steps", "skipped_steps", "last": {term: value}, "seconds"}``.

    A step waits for the device once (the finite check of the loss and the total gradient norm;
    clipping reuses that norm); the loss terms are read as floats only at logging steps.
    """
    stage_dir = rt.out / "checkpoints" / name
    state = state if state is not None else {}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total))
    params = trainable(modules)
    skipped, step = 0, start_step
    ckpt = load_checkpoint(stage_dir)
    if ckpt is not None:
        for key, mod in modules.items():
            if key in ckpt["tensors"]:
                _load_changing_state(mod, ckpt["tensors"][key], name)
        if ckpt["optim"] is not None:
            optimizer.load_state_dict(ckpt["optim"]["optimizer"])
            scheduler.load_state_dict(ckpt["optim"]["scheduler"])
        step = ckpt["step"]
        skipped = int(ckpt["state"].get("skipped_steps", 0))
        state.update(ckpt["state"].get("extra", {}))
        log.info("%s: resumed from step %d (%s)", name, step, ckpt["dir"])
    else:
        broadcast_parameters(modules)
    last: dict[str, float] = {}
    last_terms: dict[str, torch.Tensor] = {}
    t0 = time.time()
    bar = tqdm(total=total, initial=step, desc=name, disable=not (rt.cfg.progress and rt.dist.is_main),
               dynamic_ncols=True, leave=False)
    for mod in modules.values():
        mod.train()
    while step < total:
        torch.manual_seed(rt.seed(name, step))  # dropout etc. depend on the step only
        optimizer.zero_grad(set_to_none=True)
        with rt.autocast():
            terms = step_fn(step)
        loss = sum(terms.values())
        # backward always runs (every rank joins the gradient all-reduce) and the step is judged
        # by one host read of "loss and gradient norm finite"; a NaN/inf loss gives NaN gradients
        loss.backward()
        average_gradients(params)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        finite = torch.isfinite(loss.detach()).all() & torch.isfinite(norm.to(loss.device))
        if D.any_rank(~finite, rt.dist.device):
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            log.warning("%s step %d: non-finite loss or gradient, step skipped (%d so far)", name, step, skipped)
        else:
            if rt.cfg.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, rt.cfg.grad_clip, norm)
            optimizer.step()
        scheduler.step()
        step += 1
        last_terms = {k: v.detach() for k, v in terms.items()}
        bar.update(1)
        if step % rt.cfg.log_every == 0 or step == total:
            last = _floats(last_terms)
            vals = {k: D.all_reduce_mean(v, rt.dist.device) for k, v in last.items()}
            vals["lr"] = optimizer.param_groups[0]["lr"]
            vals["skipped_steps"] = skipped
            metrics.write(name, step, vals)
            bar.set_postfix({k: f"{v:.3g}" for k, v in vals.items() if k.endswith("_loss")})
        extra = after_step(step) if after_step is not None else None
        if extra:
            metrics.write(name, step, extra)
        if rt.dist.is_main and (step % rt.cfg.ckpt_every == 0 or step == total):
            save_checkpoint(stage_dir, step, {k: changing_state(m) for k, m in modules.items()},
                            {"skipped_steps": skipped, "extra": state},
                            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
        D.barrier()
        _maybe_kill(name, step)
    bar.close()
    for mod in modules.values():
        mod.eval()
    secs = time.time() - t0
    log.info("%s: %d steps (%d skipped) in %.1fs, last %s", name, total, skipped, secs,
             {k: round(v, 4) for k, v in last.items()})
    return {"steps": total, "skipped_steps": skipped, "last": last, "seconds": round(secs, 2)}


def transformer_layers(backbone: nn.Module) -> nn.ModuleList | None:
    """The stack of transformer blocks of a Hugging Face encoder (BERT ``encoder.layer``,
    ``layers``, ``transformer.layer``, ...): the longest ``nn.ModuleList`` whose name ends in
    ``layer``/``layers``/``blocks``; None when there is none."""
    best = None
    for name, mod in backbone.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers", "blocks"):
            if best is None or len(mod) > len(best):
                best = mod
    return best


def freeze_text_layers(text_encoder: nn.Module, n: int | None) -> int:
    """Freeze the token/position embeddings and the lowest ``n`` transformer blocks of a text
    encoder's backbone (``n`` >= the number of blocks freezes the whole backbone; the projection
    head stays trainable). ``None`` freezes nothing. Returns the number of frozen parameters."""
    if n is None:
        return 0
    backbone = getattr(text_encoder, "backbone", None)
    if backbone is None:
        raise ValueError("freeze_text_layers needs a text encoder with a .backbone")
    layers = transformer_layers(backbone)
    frozen: list[nn.Parameter] = []
    if layers is None or n >= len(layers):
        frozen = list(backbone.parameters())
    else:
        emb = getattr(backbone, "embeddings", None)
        frozen += list(emb.parameters()) if emb is not None else [backbone.get_input_embeddings().weight]
        for block in list(layers)[:n]:
            frozen += list(block.parameters())
    for p in frozen:
        p.requires_grad_(False)
    return sum(p.numel() for p in frozen)


def _first_trainable_block(layers: nn.ModuleList) -> int:
    for i, block in enumerate(layers):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(layers)


class _Passthrough(nn.Module):
    """Stands in for a backbone's embedding module: returns ``inputs_embeds`` unchanged."""

    def forward(self, *args, inputs_embeds=None, **kwargs):
        return inputs_embeds


def shared_prefix_blocks(encoders: list[nn.Module]) -> int:
    """How many lowest transformer blocks (with the embeddings) are identical across the text
    encoders' backbones (0 when the embeddings differ or there is no block stack)."""
    stacks = [transformer_layers(e.backbone) if hasattr(e, "backbone") else None for e in encoders]
    if not encoders or any(s is None for s in stacks):
        return 0

    def same(mods: list[nn.Module]) -> bool:
        ref = list(mods[0].parameters())
        return all(len(ref) == len(list(m.parameters())) and
                   all(torch.equal(a, b) for a, b in zip(ref, m.parameters())) for m in mods[1:])

    embs = [getattr(getattr(e.backbone, "base_model", e.backbone), "embeddings", None) for e in encoders]
    if any(x is None for x in embs) or not same(embs):
        return 0
    n = 0
    while n < min(len(s) for s in stacks) and same([s[n] for s in stacks]):
        n += 1
    return n


class _TextTable:
    """A table of per-text tensors computed once (eval mode, no grad) from a text encoder's
    frozen part; subclasses say what one tokenised chunk becomes (:meth:`_encode_chunk`)."""

    enc: nn.Module
    batch_size: int
    table: dict[str, torch.Tensor]

    def _device(self) -> torch.device:
        return next(self.enc.parameters()).device

    @property
    def caches(self) -> bool:
        """Whether this encoder has a frozen part to cache (else every call runs it whole)."""
        raise NotImplementedError

    def _encode_chunk(self, tok: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def _fill(self, texts: list[str]) -> None:
        # by length, so that a chunk pads little
        missing = sorted({t for t in texts if t not in self.table}, key=lambda t: (len(t), t))
        if not missing:
            return
        backbone = self.enc.backbone
        was_training = backbone.training
        backbone.eval()
        dev = self._device()
        try:
            for i in range(0, len(missing), self.batch_size):
                chunk = missing[i:i + self.batch_size]
                tok = {k: v.to(dev) for k, v in self.enc.tokenize(chunk).items()}
                self.table.update(zip(chunk, self._encode_chunk(tok)))
        finally:
            backbone.train(was_training)

    def warm(self, texts: list[str]) -> None:
        """Compute the entries of ``texts`` now, in length-sorted chunks (cheaper than on demand)."""
        if self.caches:
            self._fill(list(texts))

    def _full(self, texts: list[str]) -> torch.Tensor:
        tok = {k: v.to(self._device()) for k, v in self.enc.tokenize(texts).items()}
        return torch.nn.functional.normalize(self.enc(**tok).float(), dim=-1)


class PrefixFeatureCache(_TextTable):
    """Text embeddings of an encoder whose embeddings and lowest ``k`` blocks are frozen (LoRA or
    fine-tuning on the top blocks only): the hidden states entering block ``k`` are computed once
    per distinct text (eval mode, no grad) and each step runs only blocks ``k..`` + pooling + head.

    The result equals the full forward in eval mode (dropout in the cached blocks is skipped in
    training mode). Several encoders with identical frozen prefixes (one pretrained backbone, as in
    the demo's teachers) share one table through ``shared`` (keyed by a fingerprint of the prefix).
    With no frozen prefix it simply runs the full encoder.

    Args:
        text_encoder: A ``m3bind.encoders.text.TextEncoder`` (Hugging Face backbone, possibly peft-wrapped).
        batch_size: Texts per forward when filling the cache.
        shared: Optional dict of tables shared between caches.
        blocks: Cache the states after this many blocks instead of up to the first trainable one
            (for frozen encoders that share only their lowest blocks; see :func:`shared_prefix_blocks`).
    """

    def __init__(self, text_encoder: nn.Module, batch_size: int = 64, shared: dict | None = None,
                 blocks: int | None = None):
        self.enc, self.batch_size = text_encoder, batch_size
        backbone = getattr(text_encoder, "backbone", None)
        self.k = 0
        if backbone is not None and hasattr(text_encoder, "tokenize"):
            names = [(n, m) for n, m in backbone.named_modules()
                     if isinstance(m, nn.ModuleList) and n.rsplit(".", 1)[-1] in ("layer", "layers", "blocks")]
            if names:
                self.layers_name, layers = max(names, key=lambda nm: len(nm[1]))
                emb = [n for n, m in backbone.named_modules() if n.rsplit(".", 1)[-1] == "embeddings"]
                frozen_emb = emb and not any(p.requires_grad for p in backbone.get_submodule(emb[0]).parameters())
                if frozen_emb:
                    self.emb_name = emb[0]
                    self.k = _first_trainable_block(layers) if blocks is None else min(blocks, len(layers))
        self.table: dict[str, torch.Tensor] = {}
        if self.k > 0 and shared is not None:
            key = self._fingerprint()
            self.table = shared.setdefault(key, {})

    def _fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        backbone = self.enc.backbone
        layers = backbone.get_submodule(self.layers_name)
        mods = [backbone.get_submodule(self.emb_name)] + list(layers)[: self.k]
        for mod in mods:
            for p in mod.parameters():
                h.update(p.detach().float().cpu().numpy().tobytes())
        return f"{self.k}:{h.hexdigest()}"

    @property
    def caches(self) -> bool:
        return self.k > 0

    @contextmanager
    def _blocks(self, start: int, stop: int | None, cached_input: bool):
        """The backbone running blocks ``start:stop`` only (``cached_input``: its embedding layer
        passes cached hidden states through)."""
        backbone = self.enc.backbone
        parent_l, _, attr_l = self.layers_name.rpartition(".")
        parent_e, _, attr_e = self.emb_name.rpartition(".")
        lparent = backbone.get_submodule(parent_l) if parent_l else backbone
        eparent = backbone.get_submodule(parent_e) if parent_e else backbone
        layers, emb = getattr(lparent, attr_l), getattr(eparent, attr_e)
        try:
            setattr(lparent, attr_l, nn.ModuleList(list(layers)[start:stop]))
            if cached_input:
                setattr(eparent, attr_e, _Passthrough())
            yield backbone
        finally:
            setattr(lparent, attr_l, layers)
            setattr(eparent, attr_e, emb)

    def _encode_chunk(self, tok: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # the lowest k blocks only; block k-1's output is read by a hook (``hidden_states`` is not
        # used: transformers collects it through hooks bound to the modules of the first call)
        got: list[torch.Tensor] = []

        def keep(_module, _args, output):
            got.append(output[0] if isinstance(output, tuple) else output)

        with self._blocks(0, self.k, cached_input=False) as prefix:
            hook = self.enc.backbone.get_submodule(self.layers_name)[self.k - 1].register_forward_hook(keep)
            try:
                prefix(**tok)
            finally:
                hook.remove()
        h = got[-1].float()
        return [hi[: int(n)].clone() for hi, n in zip(h, tok["attention_mask"].sum(1).tolist())]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised embeddings ``[B, D]`` of ``texts`` (gradients reach blocks ``k..`` and the head)."""
        if not self.caches:
            return self._full(texts)
        from m3bind.encoders.text import pool

        self._fill(texts)
        dev = self._device()
        seqs = [self.table[t] for t in texts]
        n = max(len(s) for s in seqs)
        h = torch.zeros(len(seqs), n, seqs[0].shape[-1], device=dev)
        mask = torch.zeros(len(seqs), n, dtype=torch.long, device=dev)
        for i, s in enumerate(seqs):
            h[i, : len(s)] = s
            mask[i, : len(s)] = 1
        with self._blocks(self.k, None, cached_input=True) as top:
            out = top(inputs_embeds=h, attention_mask=mask)
        feats = pool(out.last_hidden_state, mask, self.enc.pooling, getattr(out, "pooler_output", None))
        return torch.nn.functional.normalize(self.enc.head(feats).float(), dim=-1)


class TextFeatureCache(_TextTable):
    """Text embeddings of an encoder whose backbone is frozen: the pooled backbone features of
    each distinct text are computed once (eval mode, no grad) and only the projection head runs
    per step. With any trainable backbone parameter it simply runs the full encoder.

    Args:
        text_encoder: A ``m3bind.encoders.text.TextEncoder`` (``.backbone``, ``.head``,
            ``.tokenize``, ``.features``).
        batch_size: Texts per backbone forward when filling the cache.
    """

    def __init__(self, text_encoder: nn.Module, batch_size: int = 64):
        self.enc, self.batch_size = text_encoder, batch_size
        self.frozen = hasattr(text_encoder, "features") and not any(
            p.requires_grad for p in text_encoder.backbone.parameters())
        self.table: dict[str, torch.Tensor] = {}

    @property
    def caches(self) -> bool:
        return self.frozen

    def _encode_chunk(self, tok: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return list(self.enc.features(**tok).float())

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised embeddings ``[B, D]`` of ``texts`` (gradients reach the head)."""
        if not self.caches:
            return self._full(texts)
        self._fill(texts)
        feats = torch.stack([self.table[t] for t in texts])
        return torch.nn.functional.normalize(self.enc.head(feats).float(), dim=-1)
