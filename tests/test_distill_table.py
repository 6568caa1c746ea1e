"""Stage 2's teacher text table: with ``kd_texts: own`` each teacher runs on its own pool only."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from m3bind.encoders.text import build_text_encoder
from m3bind.testing import tiny_text_config
from train.losses import seskd_kd_loss
from train.stages import distill
from train.stages.common import PrefixFeatureCache, shared_prefix_blocks, transformer_layers

POOLS = {
    "cxr": ["no pleural effusion.", "cardiomegaly with small effusions.", "a chest x-ray of no finding.",
            "shared text in two pools.", "lung mass in the right upper lobe, suspicious."],
    "ecg": ["atrial fibrillation.", "sinus rhythm.", "shared text in two pools.",
            "an ecg of left bundle branch block with secondary repolarisation changes."],
    "mri": ["no acute intracranial abnormality.", "glioma.", "a head mri of a meningioma at the convexity."],
}
TEXTS = sorted({t for pool in POOLS.values() for t in pool})
RT = SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext)


class _Teacher(torch.nn.Module):
    """What ``_text_table`` reads of a ``ModalityCLIP``: its ``text_encoder``."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder


def _teachers(shared_prefix: bool) -> dict[str, _Teacher]:
    """Frozen tiny teachers that differ in block 1 and the head (and, without a shared prefix, in
    the embeddings too)."""
    torch.manual_seed(0)
    base = build_text_encoder(tiny_text_config(), dim=16)
    out = {}
    for i, m in enumerate(POOLS):
        enc = copy.deepcopy(base).eval()
        with torch.no_grad():
            for p in list(transformer_layers(enc.backbone)[1].parameters()) + list(enc.head.parameters()):
                p.add_(0.05 * i * torch.randn_like(p))
            if not shared_prefix:
                enc.backbone.embeddings.word_embeddings.weight.add_(0.01 * i)
        for p in enc.parameters():
            p.requires_grad_(False)
        out[m] = _Teacher(enc)
    assert shared_prefix_blocks([t.text_encoder for t in out.values()]) == (1 if shared_prefix else 0)
    return out


def _slow_table(teachers: dict[str, _Teacher]) -> dict[str, torch.Tensor]:
    """The obvious reference: each teacher's full text encoder on each text alone (eval mode)."""
    with torch.no_grad():
        return {m: torch.stack([torch.nn.functional.normalize(t.text_encoder(**t.text_encoder.tokenize([x])).float(),
                                                              dim=-1)[0] for x in TEXTS])
                for m, t in teachers.items()}


def _own_rows(m: str) -> torch.Tensor:
    return torch.tensor([x in set(POOLS[m]) for x in TEXTS])


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_own_table_equals_full_table_on_own_rows_and_is_zero_elsewhere(shared_prefix):
    teachers = _teachers(shared_prefix)
    full = distill._text_table(teachers, TEXTS, RT, None, batch_size=3)
    own = distill._text_table(teachers, TEXTS, RT, POOLS, batch_size=3)
    slow = _slow_table(teachers)
    for m in POOLS:
        rows = _own_rows(m)
        assert own[m].shape == full[m].shape == (len(TEXTS), 16)
        assert torch.allclose(full[m], slow[m], atol=1e-5)
        assert torch.allclose(own[m][rows], slow[m][rows], atol=1e-5)
        assert torch.equal(own[m][~rows], torch.zeros_like(own[m][~rows]))
        assert torch.isfinite(own[m]).all()


def test_kd_loss_and_student_gradient_are_the_same_from_both_tables():
    teachers = _teachers(True)
    full = distill._text_table(teachers, TEXTS, RT, None, batch_size=4)
    own = distill._text_table(teachers, TEXTS, RT, POOLS, batch_size=4)
    g = torch.Generator().manual_seed(1)
    idx = torch.cat([torch.arange(len(TEXTS)), torch.randint(len(TEXTS), (7,), generator=g)])
    masks = {m: _own_rows(m)[idx] for m in POOLS}
    base = torch.randn(len(idx), 16, generator=g)
    losses, grads = [], []
    for table in (full, own):
        student = base.clone().requires_grad_(True)
        loss = seskd_kd_loss(student, {m: table[m][idx] for m in POOLS}, masks)
        loss.backward()
        losses.append(loss.detach())
        grads.append(student.grad)
    assert torch.isfinite(losses[1]) and torch.isfinite(grads[1]).all()
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_each_teacher_encodes_only_its_own_texts_once(monkeypatch):
    teachers = _teachers(True)
    seen: dict[int, list[str]] = {}

    class Recording(PrefixFeatureCache):
        def __call__(self, texts):
            seen.setdefault(id(self.enc), []).extend(texts)
            return super().__call__(texts)

    rows: dict[str, int] = {}
    hooks = [t.text_encoder.head.register_forward_hook(
        lambda _mod, args, _out, m=m: rows.__setitem__(m, rows.get(m, 0) + args[0].shape[0]))
        for m, t in teachers.items()]
    monkeypatch.setattr(distill, "PrefixFeatureCache", Recording)
    try:
        distill._text_table(teachers, TEXTS, RT, POOLS, batch_size=2)
    finally:
        for h in hooks:
            h.remove()
    for m, t in teachers.items():
        got = seen[id(t.text_encoder)]
        assert sorted(got) == sorted(POOLS[m])  # its own texts, each once, nothing else
        assert rows[m] == len(POOLS[m])  # the teacher's forward (head) saw only those rows
