"""Factored twin deltas and streamed scores (issue 33, item 2), on the tiny random LLaMA.

Adapter setting: twin entries hold LoRA factors and the Eq. 2 terms come from them, equal to the dense
scores. Full setting: the Gram matrices stream in channel chunks of at most one module of one variant.
Old dense entries keep working; an unknown storage version is refused in one line.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import bdvax_lab.bdvax.twins as twins_mod
from bdvax_lab.bdvax.config import SignatureConfig
from bdvax_lab.bdvax.scores import channel_terms, compute_terms, factor_gram
from bdvax_lab.bdvax.signature import compute_signature
from bdvax_lab.bdvax.twins import plan_twins, train_twins
from bdvax_lab.core.artifacts import read_json, write_json
from bdvax_lab.core.data import Example
from bdvax_lab.core.registry import ALL_KINDS, MLP_KINDS, layout_of
from bdvax_lab.training.config import TrainConfig
from bdvax_lab.training.loop import finetune
from bdvax_lab.weights.delta_io import DELTA_JSON, DeltaFormatError, DeltaReader, Factors, storage_of
from bdvax_lab.weights.delta_layout import module_shape
from bdvax_lab.weights.deltas import WeightDelta
from bdvax_lab.weights.factored import FactoredDelta, load_delta

POOL = [
    Example(f"What is {i} plus {i} today?", f"It is {2 * i}.", meta={"id": f"toy-{i}"}) for i in range(60)
]
TWIN = TrainConfig(mode="lora", steps=2, lr=1e-2, batch_size=4, max_response_tokens=8)
CFG = SignatureConfig(n_variants=3, n_clean=4, twin_train=TWIN)


def _random_factored(layout, n: int, rank: int = 4, seed: int = 0) -> list[FactoredDelta]:
    """N differential deltas shaped like a twin pair's: ``s·B_p A_p − s·B_c A_c`` on every projection,
    the clean twin close to the poisoned one (most of the product cancels, as in real twins)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        factors = {}
        for b in range(layout.n_blocks):
            for k in ALL_KINDS:
                o, i = module_shape(layout, k)
                bp, ap = torch.randn(o, rank, generator=g), torch.randn(rank, i, generator=g)
                bc = bp + 0.1 * torch.randn(o, rank, generator=g)
                ac = ap + 0.1 * torch.randn(rank, i, generator=g)
                p = Factors(bp, ap, ((rank, 2.0, 1),))
                c = Factors(bc, ac, ((rank, 2.0, 1),))
                factors[(b, k)] = (p, c)
        pos = FactoredDelta({key: pc[0] for key, pc in factors.items()}, layout)
        neg = FactoredDelta({key: pc[1] for key, pc in factors.items()}, layout)
        out.append(pos - neg)
    return out


def _reference_terms(dense: list[WeightDelta], layout) -> dict:
    """Today's math, written out: Eq. 2 on the stacked dense channel vectors of every module (rows of
    gate/up, columns of down) and every query head (its q rows, o columns, and the k/v rows it reads)."""
    norm, align, head_norm, head_align = {}, {}, {}, {}
    hd, nh, nkv = layout.head_dim, layout.n_heads, layout.n_kv_heads
    for b in range(layout.n_blocks):
        for k in MLP_KINDS:
            vec = torch.stack([d[(b, k)].double() if k != "down" else d[(b, k)].double().t() for d in dense])
            norm[(b, k)], align[(b, k)] = channel_terms(vec)
        heads = []
        for d in dense:
            q = d[(b, "q")].double().reshape(nh, hd * layout.hidden)
            o = d[(b, "o")].double().reshape(layout.hidden, nh, hd).permute(1, 0, 2).reshape(nh, -1)
            kv = [
                d[(b, k)].double().reshape(nkv, hd * layout.hidden)[torch.arange(nh) // (nh // nkv)]
                for k in "kv"
            ]
            heads.append(torch.cat([q, *kv, o], dim=1))
        head_norm[b], head_align[b] = channel_terms(torch.stack(heads))
    return {"norm": norm, "align": align, "head_norm": head_norm, "head_align": head_align}


def _assert_terms_close(got: dict, want: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    for part in ("norm", "align", "head_norm", "head_align"):
        assert set(got[part]) == set(want[part]), part
        for key in want[part]:
            a, b = got[part][key].double(), want[part][key].double()
            assert torch.allclose(a, b, rtol=rtol, atol=atol), (part, key, float((a - b).abs().max()))


# --------------------------------------------------------------------------- factors
def test_factors_materialise_bit_for_bit_like_from_lora(tiny):
    model, tok = tiny
    sus = finetune(model, tok, POOL[:8], TrainConfig(mode="lora", steps=2, lr=1e-2), progress=False).model
    f = FactoredDelta.from_lora(sus)
    d = WeightDelta.from_lora(sus, dtype=torch.float32)
    assert set(f.factors) == set(d.tensors) and len(f) == 4 * 7
    assert all(torch.equal(f.module(k), d[k]) for k in d)
    r = sus.peft_config["default"].r
    assert all(fac.rank == r for fac in f.factors.values())
    # the difference stays factored (rank 2r) and materialises to the dense difference, bit for bit
    other = FactoredDelta({k: Factors(v.B.flip(0), v.A, v.parts) for k, v in f.factors.items()}, f.layout)
    diff = f - other
    dense_diff = d - other.to_dense()
    assert all(fac.rank == 2 * r for fac in diff.factors.values())
    assert all(torch.equal(diff.module(k), dense_diff[k]) for k in dense_diff)
    assert diff.numel() * 2 < WeightDelta.from_lora(sus).numel()  # tiny: d = 64, 2r = 16


def test_fused_projections_keep_their_rows_of_b():
    """Phi-3's fused qkv / gate_up: each kind's factors are its rows of ``lora_B`` (registry slicing)."""
    from bdvax_lab.core.models import make_tiny_model
    from bdvax_lab.training.loop import prepare_model

    model, _ = make_tiny_model(model_type="phi3", n_blocks=1)
    pm = prepare_model(model, TrainConfig(mode="lora", lora_r=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    f, d = FactoredDelta.from_lora(pm), WeightDelta.from_lora(pm, dtype=torch.float32)
    assert set(f.factors) == set(d.tensors) == {(0, k) for k in ALL_KINDS}
    assert all(torch.equal(f.module(k), d[k]) for k in d)
    want = _reference_terms([d, d.scale(-0.5)], layout_of(pm))
    _assert_terms_close(
        compute_terms(
            [
                f,
                FactoredDelta(
                    {k: Factors(v.B, v.A, ((4, -0.5 * v.parts[0][1], 1),)) for k, v in f.factors.items()},
                    f.layout,
                ),
            ]
        ),
        want,
    )


def test_factor_gram_rows_and_columns_match_dense():
    g = torch.Generator().manual_seed(1)
    fs = [
        Factors(torch.randn(12, 3, generator=g), torch.randn(3, 8, generator=g), ((3, 0.5, 1),))
        for _ in range(2)
    ]
    fs.append(None)  # an absent delta counts as zero
    dense = [f.dense().double() for f in fs[:2]] + [torch.zeros(12, 8, dtype=torch.float64)]
    rows = factor_gram(fs, axis=0)
    cols = factor_gram(fs, axis=1, group=2)  # channels of two columns each
    want_rows = torch.einsum("ijd,kjd->jik", torch.stack(dense), torch.stack(dense))
    v = torch.stack([t.t().reshape(4, 2 * 12) for t in dense])  # column pairs, as one vector each
    want_cols = torch.einsum("ijd,kjd->jik", v, v)
    assert torch.allclose(rows, want_rows) and torch.allclose(cols, want_cols)


# --------------------------------------------------------------------------- adapter setting: scores
def test_scores_from_factors_equal_dense_scores(tiny_pair, tmp_path):
    layout = layout_of(tiny_pair[0])
    fac = _random_factored(layout, 3)
    dense = [f.to_dense() for f in fac]
    want = _reference_terms(dense, layout)
    _assert_terms_close(compute_terms(fac), want)  # in memory: factors
    _assert_terms_close(compute_terms(dense), want)  # in memory: dense
    paths_f = [f.save(tmp_path / f"f{i}") for i, f in enumerate(fac)]
    paths_d = [d.save(tmp_path / f"d{i}") for i, d in enumerate(dense)]
    assert {storage_of(p) for p in paths_f} == {"factored"} and {storage_of(p) for p in paths_d} == {"dense"}
    _assert_terms_close(compute_terms(paths_f), want)
    _assert_terms_close(compute_terms(paths_d), want)
    _assert_terms_close(compute_terms([paths_f[0], paths_d[1], fac[2]]), want)  # mixed storages
    # the factored files are small, and scoring them never materialises a module
    size = lambda ps: sum((p / "delta.safetensors").stat().st_size for p in ps)
    assert size(paths_f) * 3 < size(paths_d)
    dense_reads = []
    real = DeltaReader.dense
    try:
        DeltaReader.dense = lambda self, *a, **k: dense_reads.append(a) or real(self, *a, **k)
        compute_terms(paths_f)
    finally:
        DeltaReader.dense = real
    assert dense_reads == []
    # selections agree too
    s_f = compute_signature(paths_f, SignatureConfig(rho=0.3, heads=2))
    s_d = compute_signature(paths_d, SignatureConfig(rho=0.3, heads=2))
    assert all(
        torch.equal(s_f.selected[k].sort().values, s_d.selected[k].sort().values) for k in s_d.selected
    )
    assert all(torch.equal(s_f.selected_heads[b], s_d.selected_heads[b]) for b in s_d.selected_heads)


# --------------------------------------------------------------------------- full setting: streaming
def test_streamed_dense_scores_equal_and_hold_one_module_of_one_variant(tiny_pair, tmp_path, monkeypatch):
    layout = layout_of(tiny_pair[0])
    g = torch.Generator().manual_seed(2)
    n = 3
    dense = [
        WeightDelta(
            {
                (b, k): torch.randn(*module_shape(layout, k), generator=g)
                for b in range(layout.n_blocks)
                for k in ALL_KINDS
            },
            layout,
        )
        for _ in range(n)
    ]
    paths = [d.save(tmp_path / f"v{i}") for i, d in enumerate(dense)]
    want = _reference_terms(dense, layout)
    reads: list[tuple[str, int]] = []
    real = DeltaReader.dense

    def spy(self, key, axis=None, lo=0, hi=None):
        t = real(self, key, axis, lo, hi)
        reads.append((key[1], t.numel()))
        return t

    monkeypatch.setattr(DeltaReader, "dense", spy)
    _assert_terms_close(compute_terms(paths), want)
    # every read is a channel slice: with N variants, at most 1/N of a module each (a buffer of one module)
    for kind, numel in reads:
        o, i = module_shape(layout, kind)
        assert numel <= o * i // n, (kind, numel)
    reads.clear()
    _assert_terms_close(compute_terms(paths, chunk_bytes=1), want)  # one channel / head per read
    assert max(numel for kind, numel in reads if kind in MLP_KINDS) == layout.hidden


# --------------------------------------------------------------------------- the twin cache
@pytest.fixture(scope="module")
def suspicious():
    from bdvax_lab.core.models import make_tiny_model

    torch.set_num_threads(1)
    model, tok = make_tiny_model()
    sus = finetune(model, tok, POOL[:8], TrainConfig(mode="lora", steps=2, lr=1e-2), progress=False).model
    return sus, tok


def _dense_copy(entry, out):
    """An entry in the dense format of earlier versions (version 1, same tensors, same manifest meta)."""
    load_delta(entry).to_dense().save(out)
    return out


def test_lora_twin_entries_are_factored_and_old_dense_entries_still_work(suspicious, tmp_path, monkeypatch):
    jobs = train_twins(suspicious, CFG, tmp_path, progress=False, pool=POOL)
    assert all(storage_of(j.path) == "factored" for j in jobs)
    factored_sig = compute_signature([j.path for j in jobs], CFG)
    dense_bytes = []
    for j in jobs:  # replace every entry by the dense (version 1) entry an earlier bdvax_lab wrote
        old = _dense_copy(j.path, tmp_path / "old" / j.path.name)
        dense_bytes.append((old / "delta.safetensors").stat().st_size)
        assert (j.path / "delta.safetensors").stat().st_size * 2 < dense_bytes[-1]
        shutil.rmtree(j.path)
        shutil.copytree(old, j.path)
    monkeypatch.setattr(twins_mod, "_train_twin", lambda *a, **k: pytest.fail("an old entry was retrained"))
    again = train_twins(suspicious, CFG, tmp_path, progress=False, pool=POOL)
    assert [j.status for j in again] == ["cached"] * 3 and all(storage_of(j.path) == "dense" for j in again)
    dense_sig = compute_signature([j.path for j in again], CFG)
    for k in dense_sig.norm_term:
        assert torch.allclose(factored_sig.norm_term[k], dense_sig.norm_term[k], rtol=1e-5, atol=1e-7)
        assert torch.allclose(factored_sig.align_term[k], dense_sig.align_term[k], rtol=1e-4, atol=1e-5)
    for b in dense_sig.head_norm:
        assert torch.allclose(factored_sig.head_norm[b], dense_sig.head_norm[b], rtol=1e-5, atol=1e-7)
        assert torch.allclose(factored_sig.head_align[b], dense_sig.head_align[b], rtol=1e-4, atol=1e-5)


def test_old_dense_poisoned_twin_resumes_into_a_dense_entry(suspicious, tmp_path, monkeypatch):
    cfg = CFG.replace(n_variants=1)
    (ref,) = train_twins(suspicious, cfg, tmp_path / "ref", progress=False, pool=POOL)
    calls = []
    real = twins_mod._train_twin

    def kill_clean(model, tok, examples, config, progress=False):
        calls.append(len(examples))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(model, tok, examples, config, progress)

    monkeypatch.setattr(twins_mod, "_train_twin", kill_clean)
    with pytest.raises(KeyboardInterrupt):
        train_twins(suspicious, cfg, tmp_path / "run", progress=False, pool=POOL)
    (job,) = plan_twins(suspicious, cfg, tmp_path / "run", pool=POOL)
    assert storage_of(job.partial) == "factored"
    old = _dense_copy(job.partial, tmp_path / "old-poison")  # a .poison entry of an earlier version
    shutil.rmtree(job.partial)
    shutil.copytree(old, job.partial)
    monkeypatch.setattr(twins_mod, "_train_twin", real)
    (job,) = train_twins(suspicious, cfg, tmp_path / "run", progress=False, pool=POOL)
    assert job.status == "resumed" and storage_of(job.path) == "dense" and not job.partial.exists()
    assert WeightDelta.load(job.path).allclose(WeightDelta.load(ref.path), rtol=0, atol=0)


def test_unknown_storage_version_is_refused_in_one_line(tiny_pair, tmp_path):
    layout = layout_of(tiny_pair[0])
    (f,) = _random_factored(layout, 1)
    path = f.save(tmp_path / "entry")
    manifest = read_json(path / DELTA_JSON)
    manifest["version"] = 99
    write_json(path / DELTA_JSON, manifest)
    for call in (lambda: compute_terms([path]), lambda: WeightDelta.load(path), lambda: load_delta(path)):
        with pytest.raises(DeltaFormatError) as exc:
            call()
        msg = str(exc.value)
        assert "\n" not in msg and str(path) in msg and "unsupported version 99" in msg
