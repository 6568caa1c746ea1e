"""Each loss of train/losses.py against a hand-worked example and an independent loop version."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from train import losses as L

E = math.e


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def _softmax_row(q, keys, s):
    logits = [s * float(q @ k) for k in keys]
    mx = max(logits)
    z = sum(math.exp(v - mx) for v in logits)
    return [math.exp(v - mx) / z for v in logits]


# ---------------------------------------------------------------- slow, obvious versions


def slow_ce(q, k, s):
    return sum(-math.log(_softmax_row(q[i], k, s)[i]) for i in range(len(q))) / len(q)


def slow_clip(img, txt, s):
    return 0.5 * (slow_ce(img, txt, s) + slow_ce(txt, img, s))


def slow_align(texts, w):
    total = 0.0
    for a, b in itertools.combinations(list(texts), 2):
        n = texts[a].shape[0]
        sq = sum(float(((texts[a][i] - texts[b][i]) ** 2).sum()) for i in range(n)) / n
        total += (w[a] * w[b] if w else 1.0) * sq
    return total


def slow_tmcl(z, t, ids, s):
    def direction(q, k):
        out = 0.0
        for i in range(len(q)):
            p = _softmax_row(q[i], k, s)
            pos = [j for j in range(len(k)) if ids[j] == ids[i]]
            out += -sum(math.log(p[j]) for j in pos) / len(pos)
        return out / len(q)
    return direction(t, z) + direction(z, t)


def slow_emcl(c, e, n, s):
    m = len(c)
    def direction(a, b):
        out = 0.0
        for u in range(m):
            num = math.exp(s * float(a[u] @ b[u]))
            den = (n / m) * sum(math.exp(s * float(a[u] @ b[q])) for q in range(m))
            out += -math.log(num / den)
        return out / m
    return direction(c, e) + direction(e, c)


def slow_selip(img, txt, S, s):
    def direction(q, k, sim):
        out = 0.0
        for i in range(len(q)):
            p = _softmax_row(q[i], k, s)
            f = [float(v) / float(sim[i].sum()) for v in sim[i]]
            out += sum(fj * math.log(fj / pj) for fj, pj in zip(f, p) if fj > 0)
        return out / len(q)
    return 0.5 * (direction(img, txt, S) + direction(txt, img, S.t()))


# ---------------------------------------------------------------- hand-worked examples

EYE = torch.eye(2, dtype=torch.float64)


def test_clip_loss_hand():
    # logits = I; every row's CE = -log(e/(e+1)) = log(1 + 1/e), both directions.
    assert L.clip_loss(EYE, EYE, 1.0).item() == pytest.approx(math.log(1 + 1 / E))


def test_text_alignment_hand():
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0]])
    # pairs: (a,b) 2*3*2, (a,c) 2*5*0, (b,c) 3*5*2
    got = L.text_alignment_loss({"cxr": a, "ecg": b, "ct": c}, {"cxr": 2.0, "ecg": 3.0, "ct": 5.0})
    assert got.item() == pytest.approx(12.0 + 0.0 + 30.0)
    assert L.text_alignment_loss({"cxr": a, "ecg": b}).item() == pytest.approx(2.0)
    assert L.text_alignment_loss({"cxr": a}).item() == 0.0


def test_seskd_hand():
    s = torch.tensor([[1.0, 0.0]])
    assert L.seskd_kd_loss(s, {"cxr": torch.tensor([[0.0, 1.0]]), "ecg": s.clone()}).item() == pytest.approx(2.0)
    got = L.seskd_contrastive_loss({"cxr": EYE, "ecg": EYE}, {"cxr": EYE, "ecg": EYE}, 1.0)
    assert got.item() == pytest.approx(2 * math.log(1 + 1 / E))
    # own texts: cxr's teacher sees row 0 only (distance² 2), ecg's rows 0-1 ((0 + 2) / 2)
    s2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    own = {"cxr": torch.tensor([True, False]), "ecg": torch.tensor([True, True]),
           "mri": torch.tensor([False, False])}
    teachers = {"cxr": torch.tensor([[0.0, 1.0], [5.0, 5.0]]), "ecg": torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
                "mri": torch.tensor([[3.0, 4.0], [3.0, 4.0]])}
    assert L.seskd_kd_loss(s2, teachers, own).item() == pytest.approx(2.0 + 1.0)


def test_tmcl_hand():
    # both rows share one text: positives are both columns; per row -(logp0+logp1)/2 = log(1+e) - 1/2
    got = L.tmcl_loss(EYE, EYE, torch.tensor([7, 7]), 1.0)
    assert got.item() == pytest.approx(2 * (math.log(1 + E) - 0.5))
    # distinct texts: TMCL reduces to twice the (symmetric) CLIP loss
    got = L.tmcl_loss(EYE, EYE, torch.tensor([0, 1]), 1.0)
    assert got.item() == pytest.approx(2 * math.log(1 + 1 / E))


def test_emcl_hand():
    got = L.emcl_loss(EYE, EYE, 4, 1.0)
    assert got.item() == pytest.approx(2 * (math.log(1 + 1 / E) + math.log(2)))


def test_selip_hand():
    # S = identity: F(S) one-hot, KL = CE, so the loss is the CLIP loss
    assert L.selip_loss(EYE, EYE, EYE, 1.0).item() == pytest.approx(math.log(1 + 1 / E))
    # S = ones: uniform targets; KL(u||p) = log(1/2) + log(1+e) - 1/2 for every row
    got = L.selip_loss(EYE, EYE, torch.ones(2, 2, dtype=torch.float64), 1.0)
    assert got.item() == pytest.approx(math.log(1 + E) - 0.5 - math.log(2))


# ---------------------------------------------------------------- against slow versions


@pytest.mark.parametrize("seed", [0, 1])
def test_against_slow_versions(seed):
    n, d, s = 6, 5, 3.7
    img, txt = _unit(n, d, seed), _unit(n, d, seed + 10)
    assert L.clip_loss(img, txt, s).item() == pytest.approx(slow_clip(img, txt, s), rel=1e-9)
    texts = {"cxr": _unit(n, d, seed + 1), "ecg": _unit(n, d, seed + 2), "mri": _unit(n, d, seed + 3)}
    w = {"cxr": 0.3, "ecg": 1.7, "mri": 0.9}
    assert L.text_alignment_loss(texts, w).item() == pytest.approx(slow_align(texts, w), rel=1e-9)
    student = _unit(n, d, seed + 4)
    kd = sum(float(((texts[m] - student) ** 2).sum()) / n for m in texts)
    assert L.seskd_kd_loss(student, texts).item() == pytest.approx(kd, rel=1e-9)
    own = {m: torch.rand(n, generator=torch.Generator().manual_seed(seed + k)) < 0.5 for k, m in enumerate(texts)}
    own["mri"][:] = False
    kd_own = sum(float(((texts[m][own[m]] - student[own[m]]) ** 2).sum()) / int(own[m].sum())
                 for m in texts if own[m].any())
    assert L.seskd_kd_loss(student, texts, own).item() == pytest.approx(kd_own, rel=1e-9)
    con = L.seskd_contrastive_loss({"cxr": txt, "ecg": img}, {"cxr": img, "ecg": txt}, s).item()
    assert con == pytest.approx(slow_ce(txt, img, s) + slow_ce(img, txt, s), rel=1e-9)
    ids = torch.tensor([0, 1, 0, 2, 1, 0])
    assert L.tmcl_loss(img, txt, ids, s).item() == pytest.approx(slow_tmcl(img, txt, ids.tolist(), s), rel=1e-9)
    assert L.emcl_loss(img[:4], txt[:4], 10, s).item() == pytest.approx(slow_emcl(img[:4], txt[:4], 10, s), rel=1e-9)
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(n, n, generator=g, dtype=torch.float64)
    S[S < 0.4] = 0.0  # zeros in S: the direction DESIGN.md specifies stays finite
    S.fill_diagonal_(1.0)
    assert L.selip_loss(img, txt, S, s).item() == pytest.approx(slow_selip(img, txt, S, s), rel=1e-9)


def test_losses_normalise_and_scale_gets_gradient():
    img, txt = _unit(4, 3, 5), _unit(4, 3, 6)
    assert L.clip_loss(img * 3.0, txt * 0.5, 2.0).item() == pytest.approx(L.clip_loss(img, txt, 2.0).item())
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    L.clip_loss(img, txt, scale.exp()).backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


def test_perfect_alignment_lowers_clip_loss():
    img = _unit(8, 16, 3)
    assert L.clip_loss(img, img, 10.0) < L.clip_loss(img, _unit(8, 16, 4), 10.0)


def test_objectives_registry_returns_named_terms():
    assert {"clip", "m3bind", "seskd_kd", "seskd", "medbind", "selip"} <= set(L.OBJECTIVES.names())
    img, txt = _unit(4, 3, 1), _unit(4, 3, 2)
    terms = L.OBJECTIVES.get("m3bind")(
        images={"cxr": img, "ecg": txt}, texts={"cxr": txt, "ecg": img},
        shared_texts={"cxr": img, "ecg": txt}, logit_scale=2.0,
        weights={"cxr": 0.5, "ecg": 2.0}, lambda_align=10.0)
    assert set(terms) == {"clip_loss", "align_loss"}
    want_clip = 0.5 * L.clip_loss(img, txt, 2.0) + 2.0 * L.clip_loss(txt, img, 2.0)
    assert terms["clip_loss"].item() == pytest.approx(want_clip.item())
    assert terms["align_loss"].item() == pytest.approx(10.0 * L.text_alignment_loss({"a": img, "b": txt}).item())
    assert L.total_loss(terms).item() == pytest.approx(sum(t.item() for t in terms.values()))
    selip = L.OBJECTIVES.get("selip")(img, txt, torch.eye(4, dtype=torch.float64), 2.0, alpha=0.5, beta=2.0)
    assert all(k.endswith("_loss") for k in selip)
    assert selip["se_loss"].item() == pytest.approx(2.0 * L.selip_loss(img, txt, torch.eye(4), 2.0).item())
