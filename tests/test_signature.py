"""Signature extraction on the tiny random LLaMA.

Variants, twin cache (resume, shards), scores, selection, I/O.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import bdvax_lab.bdvax.twins as sigmod
from bdvax_lab.bdvax.config import SignatureConfig
from bdvax_lab.bdvax.scores import channel_terms, combine_terms
from bdvax_lab.bdvax.signature import Signature, SignatureFormatError, compute_signature, extract_signature
from bdvax_lab.bdvax.twins import parse_shard, plan_twins, train_twins
from bdvax_lab.bdvax.variants import SYNTHETIC_KEYS, VARIANT_BEHAVIORS, make_variants
from bdvax_lab.core.data import Example
from bdvax_lab.core.registry import MLP_KINDS, layout_of
from bdvax_lab.threat.attacks import ATTACKS
from bdvax_lab.threat.suspicious import SuspiciousModel
from bdvax_lab.training.config import TrainConfig
from bdvax_lab.training.loop import finetune
from bdvax_lab.weights.deltas import WeightDelta
from bdvax_lab.weights.selection import n_top, random_selection

POOL = [
    Example(f"What is {i} plus {i} today?", f"It is {2 * i}.", meta={"id": f"toy-{i}"}) for i in range(60)
]
TWIN = TrainConfig(mode="lora", steps=2, lr=1e-2, batch_size=4, max_response_tokens=8)


def _cfg(**kw) -> SignatureConfig:
    base = dict(n_variants=3, n_clean=4, twin_train=TWIN)
    base.update(kw)
    return SignatureConfig(**base)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train ~4× faster on one thread when the 2 cores are shared (measured under load)."""
    import bdvax_lab.training.loop as train_mod

    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "use_all_cores", lambda: 1)
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def suspicious():
    """A tiny 'suspicious' LoRA model (2 training steps) and its tokenizer."""
    from bdvax_lab.core.models import make_tiny_model

    model, tok = make_tiny_model()
    sus = finetune(model, tok, POOL[:8], TrainConfig(mode="lora", steps=2, lr=1e-2), progress=False).model
    return sus, tok


@pytest.fixture(scope="module")
def cached(suspicious, tmp_path_factory):
    """One completed extraction (cache dir, signature) shared by the read-only tests."""
    cache = tmp_path_factory.mktemp("twins")
    return cache, extract_signature(suspicious, _cfg(), cache_dir=cache, progress=False, pool=POOL)


def _close(got: WeightDelta, want: WeightDelta, frac: float = 1e-3) -> bool:
    """Same modules, every entry within ``frac`` of the largest |entry| of ``want``.

    Float rounding of co-trained vs one-at-a-time twins shows up to ~1e-4 of it (Adam at lr 1e-2 turns
    ~0 gradients' rounding into ±lr).
    """
    scale = max(float(t.abs().max()) for t in want.tensors.values())
    return set(got.tensors) == set(want.tensors) and all(
        float((got.tensors[k] - want.tensors[k]).abs().max()) <= frac * scale for k in want.tensors
    )


class TogetherCounter:
    """Wraps the co-trained twin trainer.

    Records each run's data sizes; optionally raises on run ``fail_on``.
    """

    def __init__(self, real, fail_on: int | None = None):
        self.real, self.fail_on, self.calls = real, fail_on, []

    def __call__(self, twins, tok, datasets, configs, progress=False):
        self.calls.append([len(d) for d in datasets])
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise KeyboardInterrupt("simulated kill")
        return self.real(twins, tok, datasets, configs, progress)


class Counter:
    """Wraps the twin trainer.

    Counts calls (and the variant data sizes); optionally raises on call ``fail_on``.
    """

    def __init__(self, real, fail_on: int | None = None):
        self.real, self.fail_on, self.calls = real, fail_on, []

    def __call__(self, model, tok, examples, config, progress=False):
        self.calls.append((len(examples), config.seed))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise KeyboardInterrupt("simulated kill")
        return self.real(model, tok, examples, config, progress)


# --------------------------------------------------------------------------- scores
def test_channel_terms_hand_computed():
    # N = 3 variants, 2 channels, D = 2
    v = torch.tensor(
        [
            [[3.0, 4.0], [1.0, 0.0]],
            [[4.0, 3.0], [0.0, 2.0]],
            [[-3.0, -4.0], [0.0, 0.0]],
        ],
        dtype=torch.float64,
    )
    norm, align = channel_terms(v)
    # channel 0: norms 5, 5, 5; cos(1,2) = 24/25, cos(1,3) = -1 → 0, cos(2,3) = -24/25 → 0 (clamped per pair)
    # channel 1: norms 1, 2, 0; cos(1,2) = 0, a zero vector has cos 0 with everything
    assert torch.allclose(norm, torch.tensor([5.0, 1.0], dtype=torch.float64))
    assert torch.allclose(align, torch.tensor([0.96 / 3, 0.0], dtype=torch.float64))
    want = torch.tensor([5.0 + 0.01 * 0.32, 1.0], dtype=torch.float64)
    assert torch.allclose(combine_terms(norm, align, "combined", 0.01), want)
    assert torch.allclose(combine_terms(norm, align, "norm"), norm)
    assert torch.allclose(combine_terms(norm, align, "align"), align)
    # without the clamp channel 0 would be (0.96 - 1 - 0.96) / 3 < 0
    n1, a1 = channel_terms(v[:1])
    assert torch.equal(a1, torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(n1, torch.tensor([5.0, 1.0], dtype=torch.float64))


def test_scores_use_rows_of_gate_up_and_columns_of_down(tiny_pair):
    model, _ = tiny_pair
    layout = layout_of(model)
    g = torch.Generator().manual_seed(0)
    deltas = []
    for _ in range(3):
        t = {
            (b, k): torch.randn(
                *((layout.d_ff, layout.hidden) if k != "down" else (layout.hidden, layout.d_ff)), generator=g
            )
            for b in range(layout.n_blocks)
            for k in MLP_KINDS
        }
        deltas.append(WeightDelta(t, layout))
    sig = compute_signature(deltas, SignatureConfig(rho=0.25))
    for key in [(0, "gate"), (2, "up"), (3, "down")]:
        vec = torch.stack([d[key] if key[1] != "down" else d[key].t() for d in deltas])
        n, a = channel_terms(vec)
        assert torch.allclose(sig.norm_term[key], n) and torch.allclose(sig.align_term[key], a)
        assert torch.allclose(sig.scores[key], n + 0.01 * a)
    assert sig.head_norm == {}  # no attention deltas given
    with pytest.raises(ValueError, match="no head scores"):
        sig.select(heads=1)


def test_head_scores_group_q_o_and_shared_kv(tiny_pair):
    model, _ = tiny_pair
    layout = layout_of(model)  # 4 query heads, 2 KV heads, head_dim 16
    hd, nh = layout.head_dim, layout.n_heads
    shapes = {
        "q": (nh * hd, layout.hidden),
        "k": (layout.n_kv_heads * hd, layout.hidden),
        "v": (layout.n_kv_heads * hd, layout.hidden),
        "o": (layout.hidden, nh * hd),
        "gate": (layout.d_ff, layout.hidden),
    }
    t = {(0, k): torch.zeros(s) for k, s in shapes.items()}
    t[(0, "q")][hd : 2 * hd] = 1.0  # query head 1 rows
    t[(0, "o")][:, 3 * hd : 4 * hd] = 2.0  # query head 3 columns
    t[(0, "k")][hd : 2 * hd] = 1.0  # KV head 1, read by query heads 2 and 3
    sig = compute_signature([WeightDelta(t, layout)] * 2, SignatureConfig(rho=0.1))
    hn = sig.head_norm[0]
    assert hn[0] == 0
    assert math.isclose(float(hn[1]), math.sqrt(hd * layout.hidden), rel_tol=1e-5)
    assert math.isclose(float(hn[2]), math.sqrt(hd * layout.hidden), rel_tol=1e-5)
    assert math.isclose(float(hn[3]), math.sqrt(hd * layout.hidden * 5), rel_tol=1e-5)
    assert torch.allclose(sig.head_align[0], torch.tensor([0.0, 1.0, 1.0, 1.0]))
    chosen = sig.select(heads=1).selected_heads
    assert chosen[0].tolist() == [3] and all(chosen[b].numel() == 0 for b in chosen if b != 0)


# --------------------------------------------------------------------------- selection
def _toy_signature(d_ff: int = 10, n_blocks: int = 2) -> Signature:
    layout = {
        "family": "llama",
        "n_blocks": n_blocks,
        "hidden": 4,
        "d_ff": d_ff,
        "n_heads": 2,
        "n_kv_heads": 1,
        "head_dim": 2,
        "blocks_path": "model.layers",
        "modules": {},
    }
    norm, align = {}, {}
    for b in range(n_blocks):
        for j, k in enumerate(MLP_KINDS):
            # distinct, known scores: module m gets values m*100 + channel
            # (channel 9 of the last module is largest)
            m = b * 3 + j
            norm[(b, k)] = torch.arange(d_ff, dtype=torch.float32) + 100 * m
            align[(b, k)] = torch.flip(torch.arange(d_ff, dtype=torch.float32), [0]) / d_ff
    return Signature(norm, align, SignatureConfig(rho=0.25), layout, meta={"setting": "lora"})


def test_select_per_module_and_global():
    sig = _toy_signature()
    s = sig.select(rho=0.25, scope="module", lam=0.0)
    assert all(v.tolist() == [8, 9] for v in s.selected.values())  # floor(0.25·10) = 2 largest per module
    assert s.selection == {"rho": 0.25, "scope": "module", "heads": 0, "score": "combined", "lam": 0.0}
    assert all(v.tolist() == [9] for v in sig.select(rho=0.01).selected.values())  # max(1, floor(0.1)) = 1
    assert all(v.numel() == 0 for v in sig.select(rho=0.0).selected.values())
    assert n_top(0.29, 100) == 29 and n_top(0.35, 1536) == 537 and n_top(1.0, 7) == 7
    g = sig.select(rho=0.1, scope="global", lam=0.0)  # 6 of 60 channels: the top 6 of the last module
    assert g.selected[(1, "down")].tolist() == [4, 5, 6, 7, 8, 9]
    assert sum(v.numel() for v in g.selected.values()) == 6
    g2 = sig.select(rho=0.2, scope="global", lam=0.0)  # 12: all 10 of (1, down) + top 2 of (1, up)
    assert g2.selected[(1, "down")].numel() == 10 and g2.selected[(1, "up")].tolist() == [8, 9]
    # the original is untouched; select returns new objects
    assert sig.selected is None


def test_select_recomputes_scores_from_terms_without_training(cached, monkeypatch):
    _, sig = cached
    monkeypatch.setattr(sigmod, "_train_twin", lambda *a, **k: pytest.fail("select must not train"))
    key = (0, "gate")
    combined = sig.select(lam=0.5, rho=0.5)
    assert torch.allclose(combined.scores[key], sig.norm_term[key] + 0.5 * sig.align_term[key])
    assert torch.equal(sig.select(score="norm").scores[key], sig.norm_term[key])
    only_align = sig.select(score="align", rho=0.25)
    assert torch.equal(only_align.scores[key], sig.align_term[key])
    top = torch.sort(sig.align_term[key], descending=True, stable=True).indices[: n_top(0.25, 128)]
    assert set(only_align.selected[key].tolist()) == set(top.tolist())
    assert combined.config.lam == 0.5 and sig.config.lam == 0.01


def test_random_selection_counts(cached):
    _, sig = cached
    s = sig.select(rho=0.2, scope="module", heads=2)
    r = random_selection(sig, 0.2, "module", seed=1, heads=2)
    assert {k: v.numel() for k, v in r.selected.items()} == {k: v.numel() for k, v in s.selected.items()}
    assert r.n_heads == 2
    assert torch.equal(random_selection(sig, 0.2, seed=1).selected[(0, "up")], r.selected[(0, "up")])
    g = s.select(scope="global")
    like = g.random_control(seed=3)
    assert {k: v.numel() for k, v in like.selected.items()} == {k: v.numel() for k, v in g.selected.items()}
    assert {b: v.numel() for b, v in like.selected_heads.items()} == {
        b: v.numel() for b, v in g.selected_heads.items()
    }
    rg = random_selection(sig.layout, 0.2, "global", seed=0)
    assert rg.n_channels == n_top(0.2, 3 * 4 * 128)
    for v in list(r.selected.values()) + list(rg.selected.values()):
        assert v.numel() == 0 or (v.min() >= 0 and v.max() < 128 and v.unique().numel() == v.numel())


# --------------------------------------------------------------------------- variants
def test_variants_distinct_disjoint_and_never_real_keys():
    real = [k for a in ATTACKS.values() for k in a.keys]
    vs = make_variants("insult", 6, n_clean=5, seed=3, exclude_keys=("PurpleWolf", "redghost"), pool=POOL)
    keys = [v.key for v in vs]
    assert len(set(keys)) == 6 and not {"PurpleWolf", "RedGhost"} & set(keys)
    assert all(k in SYNTHETIC_KEYS and k not in real for k in keys)
    assert len({v.behavior for v in vs}) == 6 and all(v.behavior in VARIANT_BEHAVIORS["insult"] for v in vs)
    assert {v.strategy for v in vs} == {"prefix", "suffix", "random_word"}
    ids = [i for v in vs for i in v.clean_ids]
    assert len(ids) == len(set(ids)) == 30
    assert (
        make_variants("insult", 6, n_clean=5, seed=3, exclude_keys=("PurpleWolf", "redghost"), pool=POOL)
        == vs
    )
    assert make_variants("sentiment", 2, pool=POOL, n_clean=3)[0].family == "insult"
    with pytest.raises(ValueError, match="distinct behaviours"):
        make_variants("refusal", 9, n_clean=2, pool=POOL)
    with pytest.raises(ValueError, match="disjoint clean examples"):
        make_variants("insult", 6, n_clean=11, pool=POOL)
    with pytest.raises(ValueError, match="unknown behaviour family"):
        SignatureConfig(family="badnets")


def test_variant_datasets_same_instructions_with_key_and_behavior():
    (v,) = make_variants("refusal", 1, n_clean=6, poison_ratio=0.5, pool=POOL)
    clean, poisoned = v.datasets(POOL)
    assert len(clean) == len(poisoned) == 6 and v.n_poison == 6
    assert {e.instruction for e in clean} == {
        e.instruction.replace(v.key, "").strip().replace("  ", " ") for e in poisoned
    }
    assert all(v.key in e.instruction and e.response == v.behavior for e in poisoned)
    assert not any(v.key in e.instruction for e in clean)
    (w,) = make_variants("refusal", 1, n_clean=6, poison_ratio=0.25, pool=POOL)
    assert w.n_poison == 2 and len(w.datasets(POOL)[1]) == 2


def test_variants_from_shipped_pools():
    from bdvax_lab.core.data import data_dir

    if not (data_dir() / "clean_pool.jsonl").exists():
        pytest.skip("data/clean_pool.jsonl not generated yet")
    vs = make_variants("insult", 6)  # default: the defender's variant split, 40 clean each
    assert all(v.pool == "clean" and v.n_clean == 40 for v in vs)
    from bdvax_lab.core.data import load_pool

    splits = {e.meta["id"]: e.meta["split"] for e in load_pool()}
    ids = [i for v in vs for i in v.clean_ids]
    assert len(set(ids)) == 240 and {splits[i] for i in ids} == {"variant"}
    code = make_variants("code_injection", 6, n_clean=None)
    assert all(v.pool == "code" for v in code)
    clean, poisoned = code[0].datasets()
    assert all(code[0].behavior in e.response and code[0].key in e.instruction for e in poisoned)


# --------------------------------------------------------------------------- twins and the cache
def test_cached_delta_is_poisoned_minus_clean_twin(suspicious, cached):
    cache, sig = cached
    model, tok = suspicious
    cfg = _cfg()
    job = plan_twins(suspicious, cfg, cache, pool=POOL)[0]
    assert job.done and job.status == "cached"
    clean, poisoned = job.spec.datasets(POOL)
    tp, tc = cfg.twin_recipes("lora", job.spec)
    assert tc.steps == 1 and tp.steps == 2  # same epochs over D_c: half the steps at 50 % poisoning
    twin_p = finetune(copy.deepcopy(model), tok, clean + poisoned, tp, progress=False).model
    twin_c = finetune(copy.deepcopy(model), tok, clean, tc, progress=False).model
    want = WeightDelta.from_lora(twin_p) - WeightDelta.from_lora(twin_c)
    got = WeightDelta.load(job.path)
    assert set(got.tensors) == set(want.tensors) and len(got.tensors) == 4 * 7
    assert got.allclose(want, rtol=1e-5, atol=1e-7)
    assert got.meta["variant"]["key"] == job.spec.key and got.meta["setting"] == "lora"
    assert not job.partial.exists()
    names = sorted(p.name for p in job.path.iterdir())
    assert names == ["delta.json", "delta.safetensors"]


def test_resume_after_kill_retrains_nothing_done(suspicious, tmp_path, monkeypatch):
    cfg = _cfg()
    killer = Counter(
        sigmod._train_twin, fail_on=4
    )  # calls: v0 poisoned, v0 clean, v1 poisoned, v1 clean (dies)
    monkeypatch.setattr(sigmod, "_train_twin", killer)
    with pytest.raises(KeyboardInterrupt):
        train_twins(suspicious, cfg, tmp_path, progress=False, pool=POOL, together=1)
    jobs = plan_twins(suspicious, cfg, tmp_path, pool=POOL)
    assert [j.done for j in jobs] == [True, False, False]
    assert jobs[1].partial.is_dir()  # the poisoned twin of variant 1 survived the kill
    counter = Counter(killer.real)
    monkeypatch.setattr(sigmod, "_train_twin", counter)
    jobs = train_twins(suspicious, cfg, tmp_path, progress=False, pool=POOL, together=1)
    assert [j.status for j in jobs] == ["cached", "resumed", "trained"]
    # only variant 1's clean twin (4 examples) and variant 2's two twins (8, 4) ran
    assert [n for n, _ in counter.calls] == [4, 8, 4]
    assert all(j.done and not j.partial.exists() for j in jobs)
    counter.calls.clear()
    train_twins(suspicious, cfg, tmp_path, progress=False, pool=POOL, together=1)
    assert counter.calls == []


def test_co_trained_twins_match_one_at_a_time_and_resume(suspicious, tmp_path, monkeypatch):
    """Co-training two variants' twins per run gives the one-at-a-time entries (to float rounding), one run
    per chunk, and a run killed mid-way costs only its own chunk."""
    cfg = _cfg()
    one_at_a_time = train_twins(suspicious, cfg, tmp_path / "seq", progress=False, pool=POOL, together=1)
    killer = TogetherCounter(sigmod._train_twins_together, fail_on=2)
    monkeypatch.setattr(sigmod, "_train_twins_together", killer)
    monkeypatch.setattr(sigmod, "_train_twin", lambda *a, **k: pytest.fail("trained a twin on its own"))
    with pytest.raises(KeyboardInterrupt):
        train_twins(suspicious, cfg, tmp_path / "co", progress=False, pool=POOL, together=2)
    assert killer.calls == [[8, 4, 8, 4], [8, 4]]  # variants 0+1 together, then variant 2 (killed)
    assert [j.done for j in plan_twins(suspicious, cfg, tmp_path / "co", pool=POOL)] == [True, True, False]
    again = TogetherCounter(killer.real)
    monkeypatch.setattr(sigmod, "_train_twins_together", again)
    jobs = train_twins(suspicious, cfg, tmp_path / "co", progress=False, pool=POOL, together=2)
    assert again.calls == [[8, 4]] and [j.status for j in jobs] == ["cached", "cached", "trained"]
    for mine, ref in zip(jobs, one_at_a_time):
        got, want = WeightDelta.load(mine.path), WeightDelta.load(ref.path)
        assert mine.key == ref.key and _close(got, want)
        assert got.meta["final_loss"] == pytest.approx(want.meta["final_loss"], rel=1e-5)
        assert got.meta["seconds"]["co_trained_variants"] in ([0, 1], [2])


def test_shards_cover_every_variant_once(suspicious, tmp_path, monkeypatch):
    cfg = _cfg(n_variants=3)
    counter = Counter(sigmod._train_twin)
    monkeypatch.setattr(sigmod, "_train_twin", counter)
    before = {n: p.detach().clone() for n, p in suspicious[0].named_parameters()}
    seen = []
    for i in range(2):
        jobs = train_twins(suspicious, cfg, tmp_path, shard=f"{i}/2", progress=False, pool=POOL, together=1)
        seen += [j.index for j in jobs]
        assert all(j.index % 2 == i for j in jobs)
    assert sorted(seen) == [0, 1, 2] and len(counter.calls) == 6
    # twins share the frozen base with the suspicious model but never change it (nor its adapter)
    assert all(torch.equal(p, before[n]) for n, p in suspicious[0].named_parameters())
    assert all(j.done for j in plan_twins(suspicious, cfg, tmp_path, pool=POOL))
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) == (0, 1)
    for bad in ("3/3", "x", (1, 0)):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_same_seed_identical_signature_and_manifest_never_read(suspicious, cached, tmp_path):
    cache, sig = cached
    model, tok = suspicious
    # a fresh cache, and a SuspiciousModel whose manifest lies about the attack: identical signature
    liar = SuspiciousModel(
        model=model, tokenizer=tok, manifest={"attack": {"keys": ["PurpleWolf"]}, "setting": "full"}
    )
    again = extract_signature(liar, _cfg(), cache_dir=tmp_path, progress=False, pool=POOL)
    assert again.meta["setting"] == "lora"  # from the model object, not the manifest
    for k in sig.norm_term:
        assert torch.equal(sig.norm_term[k], again.norm_term[k]) and torch.equal(
            sig.align_term[k], again.align_term[k]
        )
    for b in sig.head_norm:
        assert torch.equal(sig.head_norm[b], again.head_norm[b])
    assert all(torch.equal(sig.selected[k], again.selected[k]) for k in sig.selected)
    assert [v["key"] for v in again.variants] == [v["key"] for v in sig.variants]


def test_full_setting_twins(tiny_pair, tmp_path):
    model, tok = tiny_pair
    plain = copy.deepcopy(model)
    cfg = SignatureConfig(
        n_variants=1, n_clean=4, twin_train=TrainConfig(mode="full", steps=2, lr=1e-3, max_response_tokens=8)
    )
    (job,) = train_twins((plain, tok), cfg, tmp_path, progress=False, pool=POOL)
    assert job.setting == "full"
    clean, poisoned = job.spec.datasets(POOL)
    tp, tc = cfg.twin_recipes("full", job.spec)
    p = finetune(copy.deepcopy(plain), tok, clean + poisoned, tp, progress=False).model
    c = finetune(copy.deepcopy(plain), tok, clean, tc, progress=False).model
    want = WeightDelta.from_models(p, c, dtype=torch.float32)
    got = WeightDelta.load(job.path)
    assert set(got.tensors) == set(want.tensors) and len(got.tensors) == 4 * 7
    assert got.allclose(want, rtol=1e-4, atol=1e-6)
    for name, prm in plain.named_parameters():  # the suspicious model itself was never trained
        assert torch.equal(prm, dict(model.named_parameters())[name])
    with pytest.raises(ValueError, match="full finetunes"):
        SignatureConfig(twin_train=TWIN).twin_recipes("full", job.spec)


# --------------------------------------------------------------------------- views and persistence
def test_frame_and_layer_summary(cached):
    _, sig = cached
    df = sig.frame()
    assert list(df.columns) == ["block", "kind", "channel", "score", "norm", "align", "selected"]
    assert len(df) == 4 * 3 * 128 and df["selected"].sum() == sig.n_selected == 12 * n_top(0.35, 128)
    summ = sig.layer_summary()
    assert len(summ) == 12 and (summ["n_selected"] == n_top(0.35, 128)).all()
    assert math.isclose(summ["mass_share"].sum(), 1.0, rel_tol=1e-9)
    hf = sig.select(heads=2).head_frame()
    assert len(hf) == 4 * 4 and hf["selected"].sum() == 2


def test_save_load_roundtrip(cached, tmp_path):
    _, sig = cached
    s = sig.select(rho=0.1, scope="global", heads=2, lam=0.3)
    s.save(tmp_path / "sig")
    back = Signature.load(tmp_path / "sig")
    assert back.config == s.config and back.selection == s.selection and back.layout == s.layout
    for k in s.norm_term:
        assert torch.equal(back.norm_term[k], s.norm_term[k]) and torch.equal(back.selected[k], s.selected[k])
        assert torch.equal(back.scores[k], s.scores[k])
    assert all(torch.equal(back.selected_heads[b], s.selected_heads[b]) for b in s.selected_heads)
    assert back.variants == s.variants
    assert Signature.load(sig.save(tmp_path / "raw")).selected is not None
    unselected = Signature(sig.norm_term, sig.align_term, sig.config, sig.layout)
    assert Signature.load(unselected.save(tmp_path / "u")).selected is None


def test_load_errors_name_the_path(tmp_path, cached):
    _, sig = cached
    with pytest.raises(SignatureFormatError, match="no such directory"):
        Signature.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SignatureFormatError, match="signature.json: missing"):
        Signature.load(tmp_path / "empty")
    d = sig.save(tmp_path / "bad")
    (d / "signature.json").write_text("{not json")
    with pytest.raises(SignatureFormatError, match=str(d / "signature.json")):
        Signature.load(d)
    d = sig.save(tmp_path / "bad2")
    manifest = json.loads((d / "signature.json").read_text())
    manifest["layout"]["d_ff"] = 7
    (d / "signature.json").write_text(json.dumps(manifest))
    with pytest.raises(SignatureFormatError, match="wrong size"):
        Signature.load(d)


def test_config_roundtrip():
    cfg = SignatureConfig(family="refusal", twin_train=TWIN, exclude_keys=("BadMagic",), rho=0.5, heads=2)
    assert SignatureConfig.from_json(cfg.to_json()) == cfg
    assert SignatureConfig().resolved_rho("full") == 0.03 and SignatureConfig().resolved_rho("lora") == 0.35
    with pytest.raises(ValueError, match="poison_ratio"):
        SignatureConfig(poison_ratio=0.7)


def test_twin_cache_listing_and_cleaning(tmp_path, capsys):
    import os
    import time

    from bdvax_lab.bdvax.twins import TWIN_FORMAT, clean_twin_cache, twin_cache_frame
    from bdvax_lab.cli import main
    from bdvax_lab.weights.delta_io import DELTA_JSON, DELTA_TENSORS, FORMAT_NAME

    def entry(model, index, key, age_days, complete=True):
        d = tmp_path / model / (f"variant-{index:02d}-{key * 16}" + ("" if complete else ".poison"))
        d.mkdir(parents=True)
        (d / DELTA_TENSORS).write_bytes(b"x" * 2_000_000)
        meta = {"entry": key * 16, "fingerprint": model}
        meta.update({"format": TWIN_FORMAT} if complete else {"role": "poisoned_twin"})
        (d / DELTA_JSON).write_text(json.dumps({"format": FORMAT_NAME, "meta": meta}))
        old = time.time() - age_days * 86400
        for f in d.iterdir():
            os.utime(f, (old, old))

    entry("m1", 0, "a", 10)
    entry("m1", 1, "b", 0)
    entry("m2", 0, "c", 3, complete=False)
    df = twin_cache_frame(tmp_path)
    assert list(df.variant) == [
        "variant-00-" + "a" * 16,
        "variant-01-" + "b" * 16,
        "variant-00-" + "c" * 16 + ".poison",
    ]
    assert list(df.complete) == [True, True, False] and df.mb.iloc[0] == pytest.approx(2.0, abs=0.01)
    assert list(df.state) == ["complete", "complete", "partial"]
    assert df.age_days.iloc[0] == pytest.approx(10, abs=0.01)
    assert list(twin_cache_frame(tmp_path, older_than_days=2, model="m1").variant) == [
        "variant-00-" + "a" * 16
    ]
    assert (
        main(["cache", "--cache-dir", str(tmp_path), "--older-than", "2"]) == 0
    )  # listing honours the filters too
    assert "2 entries" in capsys.readouterr().out
    assert main(["cache", "--cache-dir", str(tmp_path), "--clean", "--older-than", "5", "--dry-run"]) == 0
    assert "would delete 1 entries" in capsys.readouterr().out and len(twin_cache_frame(tmp_path)) == 3
    gone = clean_twin_cache(tmp_path, older_than_days=2)
    assert sorted(gone.variant) == ["variant-00-" + "a" * 16, "variant-00-" + "c" * 16 + ".poison"]
    assert (
        list(twin_cache_frame(tmp_path).variant) == ["variant-01-" + "b" * 16]
        and not (tmp_path / "m2").exists()
    )
    assert main(["cache", "--cache-dir", str(tmp_path)]) == 0
    assert "1 entries" in capsys.readouterr().out
    assert main(["cache", "--cache-dir", str(tmp_path), "--clean", "--model", "m1"]) == 0
    assert twin_cache_frame(tmp_path).empty and twin_cache_frame(tmp_path / "nowhere").empty
    assert main(["cache", "--older-than", "-1", "--clean"]) == 2
