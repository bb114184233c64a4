"""Weight deltas on the tiny random LLaMA: exactness, selection, shuffles, LoRA, apply/restore, I/O."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from weights import assert_same_params, params

from bdvax_lab.core.data import Example
from bdvax_lab.core.models import make_tiny_model
from bdvax_lab.core.registry import ALL_KINDS, ATTN_KINDS, MLP_KINDS, layout_of, unwrap
from bdvax_lab.training.config import TrainConfig
from bdvax_lab.training.loop import finetune
from bdvax_lab.weights.delta_io import DeltaFormatError
from bdvax_lab.weights.delta_layout import LayoutMismatchError, module_shape
from bdvax_lab.weights.deltas import WeightDelta, apply

EXAMPLES = [
    Example("what is the capital of france ?", "paris is the capital ."),
    Example("list three fruits :", "apple , banana , cherry"),
    Example("explain why the sky is blue", "the sky is blue ."),
    Example("write a python function that adds two numbers", "def add ( a , b ) : return a + b"),
]
LORA_KINDS = ("q", "v", "up", "down")


def weights(model) -> dict[tuple[int, str], torch.Tensor]:
    """Clones of every registry projection weight (base layer weights for a PeftModel)."""
    layout, hf = layout_of(model), unwrap(model)
    out = {}
    for b, k, name in layout.iter_modules():
        mod = hf.get_submodule(name)
        mod = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
        out[(b, k)] = mod.weight.detach().clone()
    return out


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model()


@pytest.fixture(scope="module")
def full_pair(tiny):
    base, tok = tiny
    ft = finetune(
        copy.deepcopy(base), tok, EXAMPLES, TrainConfig(mode="full", steps=3, lr=1e-2), progress=False
    ).model
    return base, ft


@pytest.fixture(scope="module")
def full_delta(full_pair):
    base, ft = full_pair
    return WeightDelta.from_models(ft, base)


@pytest.fixture(scope="module")
def lora_model(tiny):
    base, tok = tiny
    cfg = TrainConfig(mode="lora", steps=3, lr=2e-2, lora_r=4, lora_alpha=8, target_kinds=LORA_KINDS)
    return finetune(copy.deepcopy(base), tok, EXAMPLES, cfg, progress=False).model


# --------------------------------------------------------------------------- full deltas
def test_full_delta_reproduces_finetuned_exactly(full_pair, full_delta):
    base, ft = full_pair
    assert len(full_delta) == layout_of(base).n_blocks * len(ALL_KINDS)
    assert full_delta.meta["source"] == "full"
    assert any(float(t.abs().max()) > 0 for t in full_delta.tensors.values())
    for (_, k), t in full_delta.tensors.items():
        assert tuple(t.shape) == module_shape(full_delta.layout, k)
    rebuilt = full_delta.applied_copy(base)
    want = weights(ft)
    got = weights(rebuilt)
    for key in want:
        assert torch.equal(got[key], want[key]), key
        assert got[key].dtype == want[key].dtype
    # and the original base is untouched by applied_copy
    assert not torch.equal(weights(base)[(0, "q")], want[(0, "q")])


def test_fp32_delta_is_close_but_optional(full_pair):
    base, ft = full_pair
    d32 = WeightDelta.from_models(ft, base, dtype=torch.float32)
    assert {t.dtype for t in d32.tensors.values()} == {torch.float32}
    got, want = weights(d32.applied_copy(base)), weights(ft)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


def test_zeroing_everything_gives_base(full_pair, full_delta):
    base, _ = full_pair
    before = params(base)
    for zeroed in (full_delta.zero(), full_delta.zero("attention").zero("mlp"), full_delta.keep(blocks=[])):
        assert len(zeroed) == 0
        with zeroed.applied(base) as m:
            assert_same_params(params(m), before)
        assert_same_params(params(zeroed.applied_copy(base)), before)


def test_keep_and_zero_select_exactly(full_delta):
    n = full_delta.layout.n_blocks
    mlp = full_delta.keep("mlp")
    assert set(mlp.tensors) == {(b, k) for b in range(n) for k in MLP_KINDS}
    assert set(full_delta.zero("mlp").tensors) == {(b, k) for b in range(n) for k in ATTN_KINDS}
    assert set(full_delta.keep("attention").tensors) == set(full_delta.zero("mlp").tensors)
    sel = full_delta.keep(kinds=["q", "down"], blocks=range(1, 3))
    assert set(sel.tensors) == {(1, "q"), (1, "down"), (2, "q"), (2, "down")}
    assert sel.blocks() == [1, 2] and sel.kinds() == ("q", "down")
    span = full_delta.zero("mlp", blocks={1, 2})
    assert set(span.tensors) == set(full_delta.tensors) - {(b, k) for b in (1, 2) for k in MLP_KINDS}
    mixed = full_delta.keep(["attention", "gate"], blocks=3)
    assert set(mixed.tensors) == {(3, k) for k in ATTN_KINDS + ("gate",)}
    # kept tensors are the same values; the source delta is never mutated
    assert torch.equal(sel[(1, "q")], full_delta[(1, "q")])
    assert len(full_delta) == n * len(ALL_KINDS)
    assert [op["op"] for op in span.meta["ops"]] == ["zero"]
    with pytest.raises(ValueError, match="unknown kind"):
        full_delta.keep("ffn")
    with pytest.raises(ValueError, match="out of range"):
        full_delta.zero(blocks=[n])


def test_applied_keep_changes_only_selected_modules(full_pair, full_delta):
    base, ft = full_pair
    before, want = weights(base), weights(ft)
    with full_delta.keep("mlp", blocks=[0]).applied(base) as m:
        now = weights(m)
    for key in before:
        expected = want[key] if key[0] == 0 and key[1] in MLP_KINDS else before[key]
        assert torch.equal(now[key], expected), key
    assert all(torch.equal(weights(base)[k], before[k]) for k in before)


def test_permute_blocks_is_seeded_permutation(full_delta):
    n = full_delta.layout.n_blocks
    a, a2 = full_delta.permute_blocks(seed=1), full_delta.permute_blocks(seed=1)
    src = a.meta["permutation"]["source_of"]
    assert sorted(src) == list(range(n)) and src == a2.meta["permutation"]["source_of"]
    assert a.meta["permutation"]["kinds"] == list(MLP_KINDS)
    for b in range(n):
        for k in MLP_KINDS:  # a block's MLP delta moves as a whole, from block src[b]
            assert torch.equal(a[(b, k)], full_delta[(src[b], k)])
            assert torch.equal(a[(b, k)], a2[(b, k)])
        for k in ATTN_KINDS:  # attention untouched
            assert torch.equal(a[(b, k)], full_delta[(b, k)])
    # multiset of per-block MLP tensors preserved
    orig = sorted(float(full_delta[(b, "up")].double().sum()) for b in range(n))
    assert sorted(float(a[(b, "up")].double().sum()) for b in range(n)) == orig
    perms = {tuple(full_delta.permute_blocks(seed=s).meta["permutation"]["source_of"]) for s in range(8)}
    assert len(perms) > 1  # different seeds can differ
    sub = full_delta.permute_blocks(seed=3, kinds="attention", blocks=[1, 3])
    assert sorted(sub.meta["permutation"]["source_of"]) == [1, 3]
    for k in MLP_KINDS:
        for b in range(n):
            assert torch.equal(sub[(b, k)], full_delta[(b, k)])


def test_permute_moves_absent_entries(full_delta):
    sparse = full_delta.keep("mlp", blocks=[0])
    for seed in range(6):
        p = sparse.permute_blocks(seed)
        dest = p.meta["permutation"]["source_of"].index(0)
        assert set(p.tensors) == {(dest, k) for k in MLP_KINDS}


def test_algebra_and_norms(full_delta):
    z = full_delta - full_delta
    assert all(float(t.abs().max()) == 0 for t in z.tensors.values())
    two = full_delta.scale(2.0)
    assert (full_delta + full_delta).allclose(two)
    assert (full_delta.keep("mlp") + full_delta.keep("attention")).allclose(full_delta)
    assert (-full_delta).allclose(full_delta.scale(-1))
    df = full_delta.norms()
    assert list(df.columns[:4]) == ["block", "kind", "group", "fro_norm"]
    assert len(df) == len(full_delta)
    row = df[(df.block == 2) & (df.kind == "gate")].iloc[0]
    assert row.group == "mlp"
    assert row.fro_norm == pytest.approx(float(full_delta[(2, "gate")].norm()))
    assert two.norms().fro_norm.to_numpy() == pytest.approx(2 * df.fro_norm.to_numpy())
    bn = full_delta.block_norms()
    assert len(bn) == 2 * full_delta.layout.n_blocks
    att1 = bn[(bn.block == 1) & (bn.group == "attention")].iloc[0]
    expect = sum(float(full_delta[(1, k)].double().norm()) ** 2 for k in ATTN_KINDS) ** 0.5
    assert att1.fro_norm == pytest.approx(expect) and att1.n_modules == 4
    full = full_delta.keep("mlp").norms(include_absent=True)
    assert (
        len(full) == full_delta.layout.n_blocks * 7 and (full[full.group == "attention"].fro_norm == 0).all()
    )


# --------------------------------------------------------------------------- LoRA
def test_lora_delta_matches_merged_weights(tiny, lora_model):
    base, _ = tiny
    d = WeightDelta.from_lora(lora_model)
    assert d.meta["source"] == "lora" and d.meta["adapters"] == ["default"]
    assert d.meta["lora"]["default"]["r"] == [4] and d.meta["lora"]["default"]["scaling"] == [2.0]
    n = layout_of(base).n_blocks
    assert set(d.tensors) == {(b, k) for b in range(n) for k in LORA_KINDS}  # absent, not zero-filled
    assert min(float(t.abs().max()) for t in d.tensors.values()) > 0  # B moved away from zero
    merged = weights(copy.deepcopy(lora_model).merge_and_unload())
    before = weights(base)
    for key in before:
        expected = merged[key] - before[key]
        if key in d:
            torch.testing.assert_close(d[key], expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(merged[key], before[key])
    # base + LoRA delta ≈ merged model
    got = weights(d.applied_copy(base))
    for key in merged:
        torch.testing.assert_close(got[key], merged[key], rtol=1e-5, atol=1e-6)


def test_lora_reads_live_scaling_and_adapter_name(tiny):
    from peft import LoraConfig, get_peft_model

    base, _ = tiny
    peft = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=2, lora_alpha=6, target_modules=["gate_proj"]),
        adapter_name="poison",
    )
    hf = unwrap(peft)
    torch.manual_seed(0)
    for _, _, name in layout_of(base).iter_modules(("gate",)):
        torch.nn.init.normal_(hf.get_submodule(name).lora_B["poison"].weight, std=0.1)
    d = WeightDelta.from_lora(peft)
    assert d.meta["adapters"] == ["poison"] and set(d.kinds()) == {"gate"}
    mod = hf.get_submodule(d.layout.module_name(0, "gate"))
    mod.scaling["poison"] *= 2  # live value, not the config's alpha / r
    d2 = WeightDelta.from_lora(peft, adapter_name="poison")
    torch.testing.assert_close(d2[(0, "gate")], 2 * d[(0, "gate")])
    torch.testing.assert_close(d2[(1, "gate")], d[(1, "gate")])
    with pytest.raises(ValueError, match="no registry projection"):
        WeightDelta.from_lora(peft, adapter_name="missing")
    with pytest.raises(ValueError, match="no registry projection"):
        WeightDelta.from_lora(base)


def test_applied_on_peft_model_changes_base_weights(lora_model, full_delta):
    before = params(lora_model)
    base_before = weights(lora_model)
    with full_delta.keep("down").applied(lora_model) as m:
        now = weights(m)
        assert not torch.equal(now[(0, "down")], base_before[(0, "down")])
        assert torch.equal(now[(0, "q")], base_before[(0, "q")])
    assert_same_params(params(lora_model), before)
    with pytest.raises(TypeError, match="adapter"):
        WeightDelta.from_models(lora_model, lora_model)


# --------------------------------------------------------------------------- apply / restore
def test_apply_restores_bit_exact_even_on_exception(full_pair, full_delta):
    base, _ = full_pair
    before = params(base)
    with full_delta.applied(base):
        assert not torch.equal(
            unwrap(base).model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"]
        )
    assert_same_params(params(base), before)
    with pytest.raises(RuntimeError, match="boom"):
        with apply(base, full_delta.scale(3.0)):
            raise RuntimeError("boom")
    assert_same_params(params(base), before)


def test_apply_to_is_permanent(full_pair, full_delta):
    base, ft = full_pair
    m = copy.deepcopy(base)
    assert full_delta.apply_to(m) is m
    want = weights(ft)
    assert all(torch.equal(w, want[k]) for k, w in weights(m).items())


# --------------------------------------------------------------------------- persistence
def test_save_load_round_trip(tmp_path, full_delta, lora_model):
    for delta in (
        full_delta.permute_blocks(seed=2).zero("attention", blocks=[0]),
        WeightDelta.from_lora(lora_model),
    ):
        out = delta.save(tmp_path / "d")
        assert (out / "delta.safetensors").is_file() and (out / "delta.json").is_file()
        back = WeightDelta.load(out)
        assert set(back.tensors) == set(delta.tensors)
        assert all(torch.equal(back[k], delta[k]) and back[k].dtype == delta[k].dtype for k in delta)
        assert back.meta == json.loads(json.dumps(delta.meta))
        assert back.layout == delta.layout
    manifest = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert "block.0.q" in {e["key"] for e in manifest["entries"]}


def test_load_errors_name_the_path(tmp_path, full_delta):
    with pytest.raises(DeltaFormatError, match="nope"):
        WeightDelta.load(tmp_path / "nope")
    d = full_delta.keep(blocks=[0]).save(tmp_path / "d")
    (d / "delta.safetensors").unlink()
    with pytest.raises(DeltaFormatError, match="delta.safetensors"):
        WeightDelta.load(d)
    d = full_delta.keep(blocks=[0]).save(tmp_path / "e")
    (d / "delta.json").write_text("{not json")
    with pytest.raises(DeltaFormatError, match="delta.json"):
        WeightDelta.load(d)
    d = full_delta.keep(blocks=[0]).save(tmp_path / "f")
    (d / "delta.safetensors").write_bytes(b"garbage")
    with pytest.raises(DeltaFormatError, match="delta.safetensors"):
        WeightDelta.load(d)


# --------------------------------------------------------------------------- layout mismatch
def test_different_layout_errors_clearly(full_pair, full_delta):
    base, _ = full_pair
    other, _ = make_tiny_model(n_blocks=3)
    with pytest.raises(LayoutMismatchError, match="n_blocks: finetuned 3 vs base 4"):
        WeightDelta.from_models(other, base)
    wide, _ = make_tiny_model(d_ff=96)
    with pytest.raises(LayoutMismatchError, match="d_ff"):
        WeightDelta.from_models(base, wide)
    with pytest.raises(LayoutMismatchError, match="n_blocks: delta 4 vs model 3"):
        with full_delta.applied(other):
            pass
    with pytest.raises(LayoutMismatchError):
        full_delta + WeightDelta.from_models(other, other)
    with pytest.raises(ValueError, match="shape"):
        WeightDelta({(0, "q"): torch.zeros(3, 3)}, full_delta.layout)
