"""Every registered model family on a tiny random model built from transformers' config classes.

Load (save + reload), LoRA training, twins and a signature, suppression of channels and heads (grouped-query
attention: 4 query heads over 2 key-value heads; tied embeddings for the Gemmas), and a merged export that
plain transformers opens. Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` are checked row by row against
the registry's slicing (module docstring of ``bdvax_lab.core.registry``).
"""

from __future__ import annotations

import copy

import pytest
import torch

from bdvax_lab.core.models import load_model, make_tiny_model, save_model
from bdvax_lab.core.registry import ALL_KINDS, MLP_KINDS, layout_of, supported_architectures, unwrap

NEW_FAMILIES = ("gemma", "gemma2", "gemma3_text", "gemma3", "phi3", "olmo2")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BDVAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def family(request):
    model, tok = make_tiny_model(model_type=request.param, n_blocks=2)
    return request.param, model, tok


def _lora(model, seed=0):
    """A LoRA adapter on every registry projection, with random (non-zero) A and B."""
    from bdvax_lab.training.config import TrainConfig
    from bdvax_lab.training.loop import prepare_model

    pm = prepare_model(copy.deepcopy(model), TrainConfig(mode="lora", lora_r=4, seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pm


def test_every_family_is_registered():
    assert set(NEW_FAMILIES) <= set(supported_architectures())


def test_load_roundtrip_and_layout(family, tmp_path):
    fam, model, tok = family
    save_model(model, tok, tmp_path / "m")
    back, tok2 = load_model(tmp_path / "m", device="cpu")
    assert type(back) is type(model) and tok2.chat_template == tok.chat_template
    ids = torch.tensor([tok("the quick brown fox")["input_ids"]])
    assert torch.allclose(model(ids).logits, back(ids).logits, atol=1e-6)
    lay = layout_of(back)
    assert (lay.family, lay.n_blocks, lay.n_heads, lay.n_kv_heads, lay.d_ff) == (fam, 2, 4, 2, 128)
    for r in lay.to_frame().itertuples():
        assert tuple(lay.weight(back, r.block, r.kind).shape) == (r.out_features, r.in_features)
    if fam.startswith("gemma"):  # tied embeddings survive the round trip
        hf = unwrap(back)
        assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()


def test_phi3_fused_rows_are_views():
    model, _ = make_tiny_model(model_type="phi3", n_blocks=1)
    lay = layout_of(model)
    qkv = model.get_submodule(lay.module_name(0, "q")).weight
    gate_up = model.get_submodule(lay.module_name(0, "up")).weight
    rows = {k: lay.rows(k) for k in ALL_KINDS}
    assert rows["q"] == slice(0, 64) and rows["k"] == slice(64, 96) and rows["v"] == slice(96, 128)
    assert rows["gate"] == slice(0, 128) and rows["up"] == slice(128, 256) and rows["down"] is None
    with torch.no_grad():
        lay.weight(model, 0, "k")[3].fill_(7.0)
        lay.weight(model, 0, "up")[5].fill_(9.0)
    assert torch.all(qkv[64 + 3] == 7.0) and torch.all(gate_up[128 + 5] == 9.0)


def test_lora_delta_matches_the_merged_update(family):
    """ΔW per kind (the fused rows sliced) is exactly what merging the adapter adds to each projection."""
    from bdvax_lab.weights.deltas import WeightDelta

    fam, model, _ = family
    pm = _lora(model)
    delta = WeightDelta.from_lora(pm, dtype=torch.float64)
    lay = layout_of(model)
    merged = copy.deepcopy(pm).merge_and_unload()
    for b in range(lay.n_blocks):
        for kind in ALL_KINDS:
            diff = lay.weight(merged, b, kind).double() - lay.weight(model, b, kind).double()
            assert torch.allclose(delta.tensors[(b, kind)], diff, atol=1e-6), (fam, b, kind)


def test_training_twins_and_signature(family, tmp_path):
    """LoRA finetune, two variants' twins and a selected signature, end to end."""
    from bdvax_lab.bdvax.config import SignatureConfig
    from bdvax_lab.bdvax.signature import extract_signature
    from bdvax_lab.core.data import Example
    from bdvax_lab.training.config import TrainConfig
    from bdvax_lab.training.loop import finetune

    fam, model, tok = family
    data = [Example(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(12)]
    res = finetune(copy.deepcopy(model), tok, data, TrainConfig(mode="lora", steps=3, batch_size=4))
    assert len(res.history) == 3 and torch.isfinite(torch.tensor(res.history["loss"].to_numpy())).all()
    pool = [Example(f"Name a colour number {i}.", meta={"id": f"p{i}"}) for i in range(40)]
    twin = TrainConfig(mode="lora", steps=2, lr=1e-2, batch_size=4, max_response_tokens=8)
    cfg = SignatureConfig(n_variants=2, n_clean=6, twin_train=twin, rho=0.1, heads=1)
    sig = extract_signature((res.model, tok), cfg, cache_dir=tmp_path / "twins", progress=False, pool=pool)
    lay = layout_of(model)
    assert set(sig.selected) == {(b, k) for b in range(lay.n_blocks) for k in MLP_KINDS}
    assert all(v.numel() == 12 for v in sig.selected.values())  # floor(0.1 · 128) per module
    assert sum(v.numel() for v in sig.selected_heads.values()) == 1


def _rows_changed(before, after):
    return set(torch.nonzero((before != after).any(1)).flatten().tolist())


def _cols_changed(before, after):
    return set(torch.nonzero((before != after).any(0)).flatten().tolist())


def test_suppression_touches_exactly_the_selection(family):
    """Full setting: re-initialised rows/columns; adapter: zeroed ΔW rows/columns, heads GQA-aware."""
    from bdvax_lab.weights.deltas import WeightDelta
    from bdvax_lab.weights.suppression import reinit_channels, zero_lora_channels

    fam, model, _ = family
    lay = layout_of(model)
    sel = {(0, "gate"): [1, 5], (0, "up"): [2], (1, "down"): [3, 127]}
    heads = {1: [2, 3]}  # the whole kv group 1: its k and v rows too
    hd = lay.head_dim

    full = copy.deepcopy(model)
    before = {(b, k): lay.weight(full, b, k).detach().clone() for b in range(2) for k in ALL_KINDS}
    reinit_channels(full, sel, heads, init="matched")
    for (b, k), w0 in before.items():
        w1 = lay.weight(full, b, k).detach()
        if k in MLP_KINDS:
            want = set(sel.get((b, k), []))
            got = _cols_changed(w0, w1) if k == "down" else _rows_changed(w0, w1)
        else:
            want = set(range(2 * hd, 4 * hd)) if b == 1 and k in ("q", "o") else set()
            want |= set(range(1 * hd, 2 * hd)) if b == 1 and k in ("k", "v") else set()
            got = _cols_changed(w0, w1) if k == "o" else _rows_changed(w0, w1)
        assert got == want, (fam, b, k, sorted(got)[:5], sorted(want)[:5])
    for name, p in full.named_parameters():  # nothing outside the registry projections moved
        if not any(s in name for s in ("proj", "qkv")):
            assert torch.equal(p, dict(model.named_parameters())[name]), name

    pm = _lora(model)
    zero_lora_channels(pm, sel, heads)
    d = WeightDelta.from_lora(pm, dtype=torch.float64)
    for (b, k), idx in sel.items():
        t = d.tensors[(b, k)]
        assert (t[:, idx] if k == "down" else t[idx]).abs().max() == 0, (fam, b, k)
        other = [j for j in range(lay.d_ff) if j not in idx]
        assert (t[:, other].abs().sum(0) if k == "down" else t[other].abs().sum(1)).min() > 0  # kept
    assert d.tensors[(1, "q")][2 * hd : 4 * hd].abs().max() == 0
    assert d.tensors[(1, "k")][hd : 2 * hd].abs().max() == 0 and d.tensors[(1, "k")][:hd].abs().max() > 0
    assert d.tensors[(1, "o")][:, 2 * hd : 4 * hd].abs().max() == 0


def test_merged_export_loads_with_plain_transformers(family, tmp_path):
    """An adapter artifact exported with --merge: same logits from AutoModelForCausalLM, tied heads kept."""
    from transformers import AutoModelForCausalLM

    from bdvax_lab.threat.export import export_model
    from bdvax_lab.threat.suspicious import SuspiciousModel, save_suspicious

    fam, model, tok = family
    save_model(model, tok, tmp_path / "base")
    base, tok_b = load_model(tmp_path / "base", device="cpu")
    pm = _lora(base)
    sm = SuspiciousModel(pm, tok_b, {"kind": "bdvax.suspicious", "setting": "lora", "base": "custom"})
    save_suspicious(sm, tmp_path / "sus")
    export_model(tmp_path / "sus", tmp_path / "exp", merge=True, base=tmp_path / "base")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "exp")
    ids = torch.tensor([tok("what is the capital of france ?")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, pm(input_ids=ids).logits, atol=1e-4)
    assert (tmp_path / "exp" / "README.md").read_text().count("source fingerprint") == 1
    if fam.startswith("gemma"):
        head, embed = plain.get_output_embeddings(), plain.get_input_embeddings()
        assert head.weight.data_ptr() == embed.weight.data_ptr()


def test_shared_prefix_pass_and_batched_generation_match_the_plain_ones(family, monkeypatch):
    """The packed pass (one 4-D block mask) and the middle-padded generation compute what plain passes do,
    whatever the family's masks (sliding windows, soft-capping, q/k norms)."""
    from bdvax_lab.core.batching import collate
    from bdvax_lab.core.data import Example, encode_example
    from bdvax_lab.core.generate import generate
    from bdvax_lab.core.scoring import lm_loss
    from bdvax_lab.core.shared_prefix import decoder_hidden

    fam, model, tok = family
    monkeypatch.setattr("bdvax_lab.core.shared_prefix.MIN_SAVED_POSITIONS", 0)
    rows = [Example("Hi", "Hello there."), Example("What is two plus two?", "Four."), Example("Why?", "So.")]
    b = collate([encode_example(tok, e) for e in rows], tok.pad_token_id)
    dec = unwrap(model).get_decoder()
    prompts = ["what is the capital of france ?", "list three fruits", "hi"]
    with torch.no_grad():
        shared = decoder_hidden(dec, b["input_ids"], b["attention_mask"])
        loss_s = lm_loss(model, b)
        batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
        monkeypatch.setenv("BDVAX_SHARED_PREFIX", "0")
        plain = decoder_hidden(dec, b["input_ids"], b["attention_mask"])
        loss_p = lm_loss(model, b)
        one_by_one = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    keep = b["attention_mask"].bool()
    assert torch.allclose(shared[keep], plain[keep], atol=1e-4), fam
    assert loss_s.item() == pytest.approx(loss_p.item(), rel=1e-4)
    assert batched == one_by_one, fam
