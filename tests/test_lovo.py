"""Leave-one-variant-out ρ calibration: the choice rule, the rebuilt twins, the loop on a planted case, and
one small run on the tiny model (real generation, cached and resumed), through purify and the CLI."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

import bdvax_lab.bdvax.calibration as cal
from bdvax_lab.bdvax.calibration import COLUMNS, calibrate_rho, choose_budget, choose_rho
from bdvax_lab.bdvax.config import (
    DEFAULT_PURIFY_RHO,
    CalibrationConfig,
    PurifyConfig,
    SignatureConfig,
    default_head_grid,
)
from bdvax_lab.bdvax.twin_models import poisoned_twin
from bdvax_lab.bdvax.variants import make_variants
from bdvax_lab.core.data import Example
from bdvax_lab.training.config import TrainConfig
from bdvax_lab.training.loop import finetune
from bdvax_lab.viz.calibration_figures import calibration_figure
from bdvax_lab.weights.deltas import WeightDelta
from bdvax_lab.weights.factored import FactoredDelta

POOL = [
    Example(f"What is {i} plus {i} today?", f"It is {2 * i}.", meta={"id": f"toy-{i}"}) for i in range(60)
]
PLANTED = torch.arange(64, 104)  # 40 gate channels of every block carry the planted variants' poisoning


def _frame(points: dict[tuple[float, int], float]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"rho": r, "held_out_variant": v, "held_out_asr": a} for (r, v), a in points.items()]
    )


# --------------------------------------------------------------------------- the choice rule
def test_choose_rho_takes_the_smallest_passing_budget():
    # variant 2's twin never learnt its key (baseline 0.2): it is not counted
    pts = {(0.0, 0): 1.0, (0.0, 1): 0.9, (0.0, 2): 0.2}
    pts |= {(0.2, 0): 0.5, (0.2, 1): 0.4, (0.2, 2): 0.9}
    pts |= {(0.4, 0): 0.15, (0.4, 1): 0.0, (0.4, 2): 0.9}  # mean 0.075 passes, variant 0 alone does not
    pts |= {(0.6, 0): 0.05, (0.6, 1): 0.0, (0.6, 2): 0.9}
    pts |= {(0.8, 0): 0.0, (0.8, 1): 0.0, (0.8, 2): 0.9}
    f = _frame(pts)
    rho, met, reason, informative = choose_rho(f, CalibrationConfig(), fallback=0.35)
    assert (rho, met, informative) == (0.4, True, [0, 1]) and "smallest" in reason
    rho, met, *_ = choose_rho(f, CalibrationConfig(criterion="all"), fallback=0.35)
    assert (rho, met) == (0.6, True)
    rho, met, reason, _ = choose_rho(f, CalibrationConfig(max_asr=0.0, criterion="all"), fallback=0.35)
    assert (rho, met) == (0.8, True)
    # no budget passes: the largest tried, not met
    rho, met, reason, _ = choose_rho(f[f.rho < 0.3], CalibrationConfig(), fallback=0.35)
    assert (rho, met) == (0.2, False) and "largest" in reason
    # no twin learnt its key: the default, not met
    silent = f.assign(held_out_asr=f.held_out_asr.where(f.rho > 0, 0.1))
    rho, met, reason, informative = choose_rho(silent, CalibrationConfig(), fallback=0.35)
    assert (rho, met, informative) == (0.35, False, []) and "default" in reason


def test_choose_budget_searches_head_budgets():
    """Per head budget the smallest passing ρ; among them the least clean drift; ties to fewer heads."""
    rows = [
        {"heads": 0, "rho": 0.0, "held_out_variant": v, "held_out_asr": 1.0, "clean_drift": 0.0}
        for v in (0, 1)
    ]

    def add(h, rho, asr, drift):
        rows.extend(
            {"heads": h, "rho": rho, "held_out_variant": v, "held_out_asr": asr, "clean_drift": drift}
            for v in (0, 1)
        )

    for rho, asr in ((0.5, 0.8), (1.0, 0.5)):
        add(0, rho, asr, rho / 10)  # MLP channels alone never pass (refusal on the default model)
    add(30, 0.5, 0.3, 0.04)
    add(30, 1.0, 0.05, 0.09)  # passes at ρ 1, drift 0.09
    add(90, 0.5, 0.0, 0.06)  # passes at ρ 0.5, drift 0.06: the least drift among the passing points
    add(90, 1.0, 0.0, 0.12)
    f = pd.DataFrame(rows)
    c = choose_budget(f, CalibrationConfig(), fallback=0.35)
    assert (c.rho, c.heads, c.met) == (0.5, 90, True) and "30 heads: ρ 1" in c.reason
    # equal drift: the fewer heads
    tie = f.assign(clean_drift=f.clean_drift.where(~((f.heads == 30) & (f.rho == 1.0)), 0.06))
    assert (choose_budget(tie, CalibrationConfig(), 0.35).heads) == 30
    # nothing passes: per budget its largest ρ, the lowest held-out ASR of those
    none = f[(f.rho == 0) | (f.heads == 0) | (f.rho == 0.5) & (f.heads == 30)]
    c = choose_budget(none, CalibrationConfig(), 0.35)
    assert (c.rho, c.heads, c.met) == (0.5, 30, False) and "30 heads" in c.reason
    # one head budget: the old rule, unchanged
    one = f[(f.rho == 0) | (f.heads == 90)]
    assert choose_rho(one, CalibrationConfig(), 0.35)[:2] == (0.5, True)
    with pytest.raises(ValueError, match="head counts"):
        CalibrationConfig(heads=(30, -1))
    assert CalibrationConfig(heads=[90, 0, 90]).heads == (0, 90)


def test_config_auto_rho_and_round_trip():
    cfg = PurifyConfig(signature=SignatureConfig(rho="auto"), calibration=CalibrationConfig(rhos=(0.9, 0.5)))
    back = PurifyConfig.from_json(cfg.to_json())
    assert back.signature.rho == "auto" and back.calibration.rhos == (0.5, 0.9)
    with pytest.raises(ValueError, match="chosen by leave-one-variant-out"):
        SignatureConfig(rho="auto").resolved_rho("lora")
    with pytest.raises(ValueError, match="rho='often'"):
        SignatureConfig(rho="often")
    with pytest.raises(ValueError, match="criterion"):
        CalibrationConfig(criterion="median")
    from bdvax_lab.cli import _purify_config, build_parser

    ns = build_parser().parse_args(["purify", "s", "--out", "o", "--rho", "auto"])
    assert _purify_config(ns, "lora").signature.rho == "auto"
    ns = build_parser().parse_args(["purify", "s", "--out", "o", "--rho", "auto", "--heads-grid", "90,0"])
    assert _purify_config(ns, "lora").calibration.heads == (0, 90)
    # no --rho: purify calibrates (config.DEFAULT_PURIFY_RHO); a grid with a fixed ρ is an error
    ns = build_parser().parse_args(["purify", "s", "--out", "o", "--heads-grid", "0,90"])
    assert _purify_config(ns, "lora").signature.rho == DEFAULT_PURIFY_RHO == "auto"
    ns = build_parser().parse_args(["purify", "s", "--out", "o"])
    cfg = _purify_config(ns, "lora")
    assert cfg.signature.rho == "auto" and cfg.calibration.heads is None  # None: the model's default grid
    ns = build_parser().parse_args(["purify", "s", "--out", "o", "--rho", "0.5", "--heads-grid", "0,90"])
    with pytest.raises(ValueError, match="needs --rho auto"):
        _purify_config(ns, "lora")
    from bdvax_lab.bdvax.purify import _signature_config

    assert _signature_config(PurifyConfig()).rho == "auto"
    assert _signature_config(PurifyConfig(signature=SignatureConfig())).rho is None  # DEFAULT_RHO, fixed
    # a config file's (or dict's) signature section without ρ: calibrated, as `bdvax purify --config` does
    from_file = PurifyConfig.from_dict({"signature": {"n_variants": 3}})
    assert from_file.signature.rho == "auto" and from_file.signature.n_variants == 3
    assert PurifyConfig.from_dict(from_file.to_dict()).signature.rho == "auto"
    assert PurifyConfig.from_dict({"signature": {"rho": 0.2}}).signature.rho == 0.2
    assert default_head_grid(270) == (0, 30, 90, 270) and default_head_grid(0) == (0,)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["purify", "s", "--out", "o", "--rho", "auto", "--heads-grid", "x"])


# --------------------------------------------------------------------------- rebuilt twins
@pytest.fixture(scope="module")
def suspicious():
    from bdvax_lab.core.models import make_tiny_model

    model, tok = make_tiny_model()
    sus = finetune(model, tok, POOL[:8], TrainConfig(mode="lora", steps=1, lr=1e-2), progress=False).model
    return sus, tok


def _planted_entries(sus, root, n: int = 3) -> list:
    """Twin-cache-like entries whose poisoned twin is the suspicious adapter plus rows PLANTED of every gate
    ``lora_B`` (positive, variant-specific magnitudes), and whose clean twin is the suspicious adapter."""
    specs = make_variants("refusal", n, n_clean=4, pool=POOL)
    clean = FactoredDelta.from_lora(sus)
    out = []
    for spec in specs:
        g = torch.Generator().manual_seed(spec.index)
        fac = {}
        for key, f in clean.factors.items():
            B = f.B.clone()
            if key[1] == "gate":
                B[PLANTED] += 1.0 + torch.rand(len(PLANTED), B.shape[1], generator=g)
            fac[key] = type(f)(B, f.A.clone(), f.parts)
        pos = FactoredDelta(fac, clean.layout)
        entry = pos - clean
        entry.meta = {"variant": spec.to_dict(), "setting": "lora", "format": "bdvax_lab.twin_delta"}
        path = root / "fp" / f"variant-{spec.index:02d}-planted"
        entry.save(path)
        out.append((path, pos))
    return out


def test_poisoned_twin_is_rebuilt_exactly(suspicious, tmp_path):
    sus, _ = suspicious
    (path, pos), *_ = _planted_entries(sus, tmp_path, n=2)
    twin = poisoned_twin(sus, path, "lora")
    got = FactoredDelta.from_lora(twin)
    assert all(torch.equal(got.module(k), pos.module(k)) for k in pos.factors)
    assert not torch.equal(FactoredDelta.from_lora(sus).module((0, "gate")), got.module((0, "gate")))
    # full setting: θ_s + Δ_i
    base = copy.deepcopy(sus).merge_and_unload()
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight.add_(0.5)
    d = WeightDelta.from_models(other, base, dtype=torch.float32)
    d.meta = {"variant": {}}
    d.save(tmp_path / "dense")
    full = poisoned_twin(base, tmp_path / "dense", "full")
    assert torch.allclose(full.model.layers[1].mlp.up_proj.weight, other.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(full.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


# --------------------------------------------------------------------------- the loop on a planted case
def test_lovo_picks_the_smallest_budget_on_a_planted_case(suspicious, tmp_path, monkeypatch):
    """Every variant's poisoning sits on the same 40 gate channels per block; a held-out backdoor survives
    in proportion to the planted rows of its rebuilt twin that the others' signature leaves unzeroed. Per
    module ρ = 0.2 zeroes 25 of them (ASR 15/40), ρ = 0.35 zeroes 44 ≥ 40 (ASR 0): the answer is 0.35."""
    sus, tok = suspicious
    entries = [p for p, _ in _planted_entries(sus, tmp_path)]
    calls = []

    def fake_measure(model, tok, triggered, judge, reference, answers, cfg):
        from bdvax_lab.core.registry import layout_of, unwrap

        lay, hf = layout_of(model), unwrap(model)
        alive = [
            hf.get_submodule(lay.module_name(b, "gate")).lora_B["default"].weight[PLANTED].abs().sum(1) > 0
            for b in range(lay.n_blocks)
        ]
        asr = float(torch.cat(alive).float().mean())
        calls.append(asr)
        return {"held_out_asr": asr, "hits": 0, "n_prompts": 1, "degenerate": 0, "nll": 1 - asr, "ppl": 2.0}

    monkeypatch.setattr(cal, "_measure", fake_measure)
    cfg = CalibrationConfig(rhos=(0.2, 0.35, 0.5), heads=(0,), n_reference=0, n_ppl=0)
    res = calibrate_rho((sus, tok), entries, cfg, pool=POOL, cache_dir=tmp_path / "c", progress=False)
    assert (res.rho, res.met, res.informative) == (0.35, True, [0, 1, 2])
    f = res.frame
    assert list(f.columns) == COLUMNS and len(f) == 4 * 3
    assert f[f.rho == 0].held_out_asr.tolist() == [1.0, 1.0, 1.0]
    assert f[f.rho == 0.2].held_out_asr.round(3).tolist() == [0.375] * 3
    assert f[f.rho == 0.35].held_out_asr.tolist() == [0.0] * 3
    assert f[f.rho == 0.35].clean_drift.tolist() == [1.0] * 3  # fake nll 1 − asr: 1 against the twin's 0
    # stop early: the budget after the chosen one is never measured (cached points are read back)
    calls.clear()
    early = calibrate_rho(
        (sus, tok),
        entries,
        cfg.replace(stop_early=True),
        pool=POOL,
        cache_dir=tmp_path / "c",
        progress=False,
    )
    assert early.rho == 0.35 and sorted(early.frame.rho.unique()) == [0.0, 0.2, 0.35] and calls == []
    # a head grid: the unsuppressed twins and the 0-head curve are read back, only the new budget measured
    grid = calibrate_rho(
        (sus, tok), entries, cfg.replace(heads=(0, 2)), pool=POOL, cache_dir=tmp_path / "c", progress=False
    )
    assert len(calls) == 3 * 3 and len(grid.frame) == 3 + 2 * 3 * 3
    assert sorted(grid.frame[grid.frame.rho > 0].n_heads.unique()) == [0, 2]
    assert grid.met and grid.rho == 0.35 and grid.heads == 0  # equal drift: the fewer heads
    assert calibration_figure(grid).data


# --------------------------------------------------------------------------- the real loop, tiny
def test_lovo_end_to_end_on_the_tiny_model_resumes_and_purifies(suspicious, tmp_path, monkeypatch):
    from bdvax_lab.bdvax.calibration import calibration_of
    from bdvax_lab.bdvax.purify import purify
    from bdvax_lab.bdvax.signature import extract_signature
    from bdvax_lab.threat.config import EvalConfig
    from bdvax_lab.training.config import RepairConfig

    sus, tok = suspicious
    twin = TrainConfig(mode="lora", steps=2, lr=1e-2, batch_size=4, max_response_tokens=8)
    sig_cfg = SignatureConfig(n_variants=2, n_clean=4, twin_train=twin, rho="auto")
    sig = extract_signature((sus, tok), sig_cfg, cache_dir=tmp_path, progress=False, pool=POOL)
    assert sig.selected is None  # rho="auto": nothing selected before the calibration
    cfg = CalibrationConfig(rhos=(1.0,), n_prompts=2, max_new_tokens=2, n_reference=0, n_ppl=2)
    res = calibrate_rho((sus, tok), sig, cfg, signature_config=sig_cfg, pool=POOL, cache_dir=tmp_path)
    # no head budgets given: 0, 1/9, 1/3 and all of the tiny model's 16 heads (config.DEFAULT_HEAD_SHARES)
    assert list(res.frame.columns) == COLUMNS and len(res.frame) == 2 + 2 * 4
    assert sorted(res.frame[res.frame.rho > 0].n_heads.unique()) == [0, 2, 5, 16]
    assert res.heads in (0, 2, 5, 16)
    assert sorted(res.frame.rho.unique()) == [0.0, 1.0] and res.frame.n_prompts.eq(2).all()
    assert res.frame.ppl.gt(0).all() and res.frame[res.frame.rho == 0].ppl_ratio.eq(1.0).all()
    assert calibration_figure(res).data  # the plotly curve (viz.calibration_figures)

    def no_measure(*a, **k):
        raise AssertionError("a cached calibration point was measured again")

    monkeypatch.setattr(cal, "_measure", no_measure)
    pcfg = PurifyConfig(
        signature=sig_cfg,
        calibration=cfg,
        repair=RepairConfig(n_samples=4, steps=1, batch_size=4),
        eval=EvalConfig(n_prompts=2, max_new_tokens=2, utility=()),
        evaluate=(),
    )
    out = purify((sus, tok), POOL[50:], pcfg, signature=sig, cache_dir=tmp_path, progress=False, pool=POOL)
    assert out.calibration is not None and out.calibration.frame.equals(res.frame)
    assert out.signature.selection["rho"] == res.rho and "calibration" in out.timings
    assert calibration_of(out.signature).rho == res.rho  # stored with the signature (SignatureExplorer)
    from bdvax_lab.viz.widgets import SignatureExplorer

    ex = SignatureExplorer(out.signature, figure_widget=False)
    assert ex.calibration is not None and ex.controls["rho"].value == res.rho
    ex.update(rho=0.6)
    marks = [s.x0 for s in ex.calibration_figure.layout.shapes if s.line.dash == "dot"]
    assert marks and set(marks) == {0.6}  # the slider's ρ marked on the curve beside it (both panels)


# --------------------------------------------------------------------------- the budget figure (item 5)
def test_budget_frame_takes_the_signature_rho_for_the_controls():
    from bdvax_lab.viz.results_figures import budget_figure, budget_frame

    rows = []
    for run, rho in enumerate((0.5, 0.8)):
        ident = {"target": "badnets:refusal:lora:format", "implant_seed": 0, "run": run}
        rows.append({**ident, "defence": "bdvax", "control_seed": None, "rho": rho, "asr": 0.5 - rho / 2})
        rows += [
            {**ident, "defence": "random", "control_seed": s, "rho": None, "asr": 0.9 - s / 10}
            for s in range(3)
        ]
        rows.append({**ident, "defence": "top_delta", "control_seed": None, "rho": None, "asr": 0.7})
        rows.append({**ident, "defence": "discard", "control_seed": None, "rho": None, "asr": 0.0})
    df = pd.DataFrame(rows).assign(skill_kept=0.9)
    with pytest.raises(ValueError, match="run="):
        budget_frame(df)
    f = budget_frame(df, run="run")
    assert set(f.defence) == {"signature", "random", "top_delta"} and len(f) == 10
    assert f[f.defence == "random"].groupby("budget").size().to_dict() == {0.5: 3, 0.8: 3}
    fig = budget_figure(f)
    names = {t.name for t in fig.data}
    assert {"signature", "random", "top_delta", "random (seeds: min–max)"} <= names
    with pytest.raises(ValueError, match="missing"):
        budget_frame(df.drop(columns=["skill_kept"]))


def test_calibration_reference_does_not_depend_on_order():
    """The skill proxy's reference replies are chosen by content, not by where they sit in the user's file."""
    from bdvax_lab.bdvax.calibration import _pick
    from bdvax_lab.core.data import Example

    data = [Example(instruction=f"q{i}", response=f"a{i}") for i in range(40)]
    first = _pick(data, 16)
    assert len(first) == 16 and len({e.instruction for e in first}) == 16
    assert _pick(list(reversed(data)), 16) == first
    assert _pick(data[::3] + data[1::3] + data[2::3], 16) == first
    assert sorted(e.instruction for e in _pick(data[:5], 16)) == [f"q{i}" for i in range(5)]
