"""Under DDP (2 gloo ranks on CPU) every loss equals the single-process loss on the
concatenated batch, and so do the gradients (after DDP's mean over ranks)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train import losses as L

N, D, S = 5, 4, 2.5
SHARDS = [(0, 3), (3, 5)]
NAMES = ("clip", "align", "kd", "kd_own", "seskd_con", "tmcl", "emcl", "selip")  # unequal shards exercise the padding in gather_features


def _data():
    g = torch.Generator().manual_seed(0)
    t = {k: torch.randn(N, D, generator=g, dtype=torch.float64) for k in
         ("img", "txt", "a", "b", "stu", "c", "e")}
    sim = torch.rand(N, N, generator=g, dtype=torch.float64)
    sim.fill_diagonal_(1.0)
    ids = torch.tensor([0, 1, 0, 2, 1])
    return t, sim, ids


def _all_losses(t, sim, ids, n_batch):
    """Every loss on the given rows; returns name -> scalar."""
    return {
        "clip": L.clip_loss(t["img"], t["txt"], S),
        "align": L.text_alignment_loss({"cxr": t["a"], "ecg": t["b"], "mri": t["txt"]},
                                       {"cxr": 0.5, "ecg": 2.0, "mri": 1.0}),
        "kd": L.seskd_kd_loss(t["stu"], {"cxr": t["a"], "ecg": t["b"]}),
        # own texts: cxr rows only on rank 0, mri only on rank 1, ct on neither
        "kd_own": L.seskd_kd_loss(t["stu"], {"cxr": t["a"], "ecg": t["b"], "mri": t["c"], "ct": t["e"]},
                                  {"cxr": ids == 0, "ecg": ids == 1, "mri": ids == 2, "ct": ids == 5}),
        "seskd_con": L.seskd_contrastive_loss({"cxr": t["stu"], "ecg": t["a"]},
                                              {"cxr": t["img"], "ecg": t["b"]}, S),
        "tmcl": L.tmcl_loss(t["img"], t["txt"], ids, S),
        "emcl": L.emcl_loss(t["c"], t["e"], n_batch, S),
        "selip": L.selip_loss(t["img"], t["txt"], sim, S),
    }


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    t, sim, ids = _data()
    lo, hi = SHARDS[rank]
    results = {}
    for name in NAMES:
        local = {k: v[lo:hi].clone().requires_grad_(True) for k, v in t.items()}
        loss = _all_losses(local, sim, ids[lo:hi], hi - lo)[name]
        loss.backward()
        value = loss.detach().clone()
        dist.all_reduce(value)
        value /= world  # what DDP's gradient mean corresponds to
        grads = {k: (v.grad / world if v.grad is not None else torch.zeros_like(v)) for k, v in local.items()}
        gathered = {}
        for k, gk in grads.items():
            padded = torch.zeros(max(h - l_ for l_, h in SHARDS), D, dtype=gk.dtype)
            padded[: hi - lo] = gk
            bufs = [torch.zeros_like(padded) for _ in range(world)]
            dist.all_gather(bufs, padded)
            gathered[k] = torch.cat([b[: h - l_] for b, (l_, h) in zip(bufs, SHARDS)])
        results[name] = (value, gathered)
    params = _toy_training(rank, world, os.path.dirname(out_path) + f"/loop{rank}")
    if rank == 0:
        torch.save({"losses": {k: {"value": v, "grads": g} for k, (v, g) in results.items()},
                    "trained": params}, out_path)
    dist.destroy_process_group()


def _toy_training(rank, world, out_dir):
    """A few steps of the shared training loop on this rank's rows of a CLIP toy problem."""
    from pathlib import Path

    from train.config import RuntimeConfig
    from train.distributed import DistInfo
    from train.stages.common import MetricsLog, Runtime, train_loop

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    torch.manual_seed(rank)  # different init per rank: the loop must broadcast rank 0's
    proj = torch.nn.Linear(6, 3)
    opt = torch.optim.AdamW(proj.parameters(), lr=0.05)
    rows = list(range(rank, 8, world))
    rt = Runtime(RuntimeConfig(device="cpu", progress=False, grad_clip=0.5), DistInfo(rank=rank, world_size=world),
                 Path(out_dir))
    train_loop("toy", rt, {"proj": proj}, opt, 4, 1,
               lambda step: {"clip_loss": L.clip_loss(proj(x[rows]), y[rows], 3.0)},
               MetricsLog(Path(out_dir) / "m.csv", rank == 0))
    return {k: v.detach().clone() for k, v in proj.state_dict().items()}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_match_single_process(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    saved = torch.load(out, weights_only=True)
    got = saved["losses"]
    single = _toy_training(0, 1, str(tmp_path / "single"))
    for k, v in single.items():  # same parameters after DDP training as after one process
        torch.testing.assert_close(saved["trained"][k], v, rtol=1e-5, atol=1e-6)
    t, sim, ids = _data()
    assert set(got) == set(NAMES)
    for name in got:
        full = {k: v.clone().requires_grad_(True) for k, v in t.items()}
        loss = _all_losses(full, sim, ids, N)[name]
        loss.backward()
        assert got[name]["value"].item() == pytest.approx(loss.item(), rel=1e-10), name
        for k, v in full.items():
            want = v.grad if v.grad is not None else torch.zeros_like(v)
            torch.testing.assert_close(got[name]["grads"][k], want, rtol=1e-9, atol=1e-12,
                                       msg=f"{name} grad {k}")


def test_gather_features_is_identity_in_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert L.gather_features(x) is x
