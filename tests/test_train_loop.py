"""The shared training loop against a slow, obvious reference loop: same weights after finite
steps (with and without clipping), the same steps skipped for a NaN loss and an inf gradient,
and one host read of a device value per step."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from train.config import RuntimeConfig
from train.distributed import DistInfo
from train.stages.common import MetricsLog, Runtime, train_loop, warmup_cosine

TOTAL, WARMUP = 7, 2
NAN_LOSS_STEP, INF_GRAD_STEP = 2, 4


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def _problem():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x = torch.randn(16, 4)
    y = torch.randn(16, 2)
    return net, x, y


def _step_fn(net, x, y):
    def step_fn(step):
        out = net(x)
        if step == INF_GRAD_STEP:
            out = _InfGrad.apply(out)
        mse = ((out - y) ** 2).mean()
        if step == NAN_LOSS_STEP:
            mse = mse * float("nan")
        return {"mse_loss": mse, "l1_loss": 0.1 * (out - y).abs().mean()}
    return step_fn


def _optimizer(net):
    return torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.01)


def _reference(net, x, y, grad_clip: float) -> tuple[int, dict[str, float]]:
    """The loop as one would first write it: per-parameter checks, clip_grad_norm_, AdamW."""
    opt = _optimizer(net)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(WARMUP, TOTAL))
    step_fn = _step_fn(net, x, y)
    skipped, last = 0, {}
    for step in range(TOTAL):
        opt.zero_grad(set_to_none=True)
        terms = step_fn(step)
        loss = sum(terms.values())
        ok = bool(torch.isfinite(loss).all())
        if ok:
            loss.backward()
            ok = all(bool(torch.isfinite(p.grad).all()) for p in net.parameters())
        if ok:
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            opt.step()
        else:
            skipped += 1
        sched.step()
        last = {k: float(v.detach()) for k, v in terms.items()}
    return skipped, last


def _run_loop(net, x, y, tmp_path, grad_clip: float, log_every: int = 1) -> dict:
    rt = Runtime(RuntimeConfig(device="cpu", progress=False, grad_clip=grad_clip, log_every=log_every,
                               ckpt_every=100), DistInfo(), tmp_path)
    return train_loop("toy", rt, {"net": net}, _optimizer(net), TOTAL, WARMUP, _step_fn(net, x, y),
                      MetricsLog(tmp_path / "m.csv", True))


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_loop_matches_reference_loop(tmp_path, grad_clip):
    net, x, y = _problem()
    ref = copy.deepcopy(net)
    out = _run_loop(net, x, y, tmp_path, grad_clip)
    ref_skipped, ref_last = _reference(ref, x, y, grad_clip)
    assert ref_skipped == 2 and out["skipped_steps"] == 2
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert out["last"] == pytest.approx(ref_last, rel=1e-6)
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert any(r.startswith(f"toy,{TOTAL},") and ",skipped_steps,2" in r for r in rows)


def test_loop_reads_the_device_once_per_step(tmp_path, monkeypatch):
    """Host reads of tensors (bool, item, float, tolist) made by the loop's own code: one per step
    plus one per logging step (here only the last). The old loop made 1 + parameters + terms."""
    net, x, y = _problem()
    reads: list[str] = []
    loop_files = ("train/stages/common.py", "train/distributed.py")

    def counting(name, orig):
        def read(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.replace("\\", "/").endswith(loop_files):
                reads.append(name)
            return orig(self, *args, **kwargs)
        return read

    for name in ("__bool__", "item", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    out = _run_loop(net, x, y, tmp_path, grad_clip=0.05, log_every=TOTAL)
    monkeypatch.undo()
    assert out["skipped_steps"] == 2
    assert len(reads) == TOTAL + 1, reads
