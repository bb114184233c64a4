"""Signature figures and the SignatureExplorer widget on hand-made signatures and the tiny random LLaMA."""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pandas as pd
import pytest
import torch

from bdvax_lab.bdvax.budget import rho_curve, try_selection
from bdvax_lab.bdvax.config import SignatureConfig
from bdvax_lab.bdvax.signature import Signature
from bdvax_lab.core.data import Example
from bdvax_lab.core.registry import MLP_KINDS, layout_of
from bdvax_lab.threat.config import EvalConfig
from bdvax_lab.threat.suspicious import SuspiciousModel
from bdvax_lab.training.config import TrainConfig
from bdvax_lab.training.loop import finetune
from bdvax_lab.viz import signature_grid as sg
from bdvax_lab.viz import signature_viz as sv
from bdvax_lab.viz.widgets import CONTAINER_CLASSES, CONTROLS, SignatureExplorer
from bdvax_lab.weights.delta_layout import layout_summary
from bdvax_lab.weights.selection import n_top, random_selection

# by module path: the package re-exports functions named like some modules (bdvax_lab.purify is the function)
repair_mod = importlib.import_module("bdvax_lab.training.repair")
twins_mod = importlib.import_module("bdvax_lab.bdvax.twins")
scores_mod = importlib.import_module("bdvax_lab.bdvax.scores")
sigmod = importlib.import_module("bdvax_lab.bdvax.signature")
train_mod = importlib.import_module("bdvax_lab.training.loop")

PROBES = [Example(f"Tell me about the number {i}.", f"{i} is a number.") for i in range(2)]
REPAIR = [Example(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(8)]
TINY_EVAL = EvalConfig(
    n_prompts=2, max_new_tokens=3, batch_size=4, utility=("ppl",), n_ppl=2, ppl_max_tokens=8
)


def _signature(layout: dict, seed: int = 0, heads: bool = True) -> Signature:
    """Norm term rising with the channel index, alignment term falling, so λ / score mode flip the ranking.

    Module m = 3·block + kind index adds m to the norm term: later modules win a global percentile.
    """
    d_ff, nb = layout["d_ff"], layout["n_blocks"]
    g = torch.Generator().manual_seed(seed)
    norm, align = {}, {}
    for b in range(nb):
        for j, k in enumerate(MLP_KINDS):
            ramp = torch.arange(d_ff, dtype=torch.float32) / d_ff
            norm[(b, k)] = ramp + (3 * b + j) + 1e-4 * torch.rand(d_ff, generator=g)
            align[(b, k)] = torch.flip(ramp, [0]) + 1e-4 * torch.rand(d_ff, generator=g)
    hn = {b: torch.rand(layout["n_heads"], generator=g) for b in range(nb)} if heads else {}
    ha = {b: torch.rand(layout["n_heads"], generator=g) for b in range(nb)} if heads else {}
    return Signature(
        norm, align, SignatureConfig(rho=0.25, lam=0.0), layout, hn, ha, meta={"setting": "lora"}
    )


@pytest.fixture(scope="module")
def tiny_layout(tiny_pair):
    return layout_summary(layout_of(tiny_pair[0]))  # 4 blocks, d_ff 128, 4 heads / 2 kv heads


@pytest.fixture(scope="module")
def sig(tiny_layout):
    return _signature(tiny_layout)


@pytest.fixture
def no_training(monkeypatch):
    """Any training call fails the test: re-selection must come from cached terms only."""

    def boom(*a, **k):
        pytest.fail("the explorer must not train when a selection control changes")

    for mod, name in [
        (train_mod, "finetune"),
        (twins_mod, "_train_twin"),
        (twins_mod, "train_twins"),
        (sigmod, "train_twins"),
        (scores_mod, "compute_terms"),
        (sigmod, "compute_terms"),
        (repair_mod, "repair"),
        (repair_mod, "finetune"),
    ]:
        monkeypatch.setattr(mod, name, boom)


def _sets(s) -> set:
    return {(b, k, int(j)) for (b, k), v in s.selected.items() for j in v.tolist()}


# --------------------------------------------------------------------------- figures
def test_score_heatmap_layer_by_kind(sig):
    s = sig.select(rho=0.25, scope="global")
    fig = sv.score_heatmap(s, "selected_mass")
    z = np.asarray(fig.data[0].z, dtype=float)
    assert (
        z.shape == (3, 4) and list(fig.data[0].y) == list(MLP_KINDS) and list(fig.data[0].x) == [0, 1, 2, 3]
    )
    table = sg.module_table(s)
    want = table.pivot(index="kind", columns="block", values="selected_mass").reindex(list(MLP_KINDS))
    assert np.allclose(z, want.to_numpy())
    assert table.n_selected.sum() == s.n_selected and np.isclose(table.mass_share.sum(), 1.0)
    # annotation: % selected per cell (global scope: the last modules hold all of it)
    text = np.asarray(fig.data[0].text)
    assert text.shape == (3, 4) and text[2, 3] == "100" and text[0, 0] == "0"
    for value in sv.HEATMAP_VALUES:
        sv.score_heatmap(s, value)
    with pytest.raises(ValueError, match="value"):
        sv.score_heatmap(s, "nope")
    assert sv.score_heatmap(sig).data  # an unselected signature is selected with its own config


def test_channel_heatmap_marks_selected_bins(sig):
    s = sig.select(rho=0.25)  # per module: the top 32 of 128 channels = the last 32 (norm rises, λ = 0)
    fig = sv.channel_heatmap(s, bins=8)
    heat = [t for t in fig.data if t.type == "heatmap"]
    dots = [t for t in fig.data if t.type == "scatter"]
    assert len(heat) == 3 and len(dots) == 3
    assert np.asarray(heat[0].z).shape == (4, 8)
    assert set(dots[0].x) == {6, 7} and len(dots[0].x) == 2 * 4  # bins 6 and 7 of every block
    frac = sv.channel_heatmap(s, bins=8, mark="fraction")
    z = np.asarray(frac.data[0].z, dtype=float)
    assert np.allclose(z[:, 6:], 1.0) and np.allclose(z[:, :6], 0.0)
    bins = sg.channel_bins(s, bins=8)
    assert bins.n_selected.sum() == s.n_selected and len(bins) == 4 * 3 * 8
    odd = sg.channel_bins(s, bins=5, agg="max")  # bins that do not divide d_ff
    assert odd.groupby(["block", "kind"]).size().eq(5).all() and odd.n_selected.sum() == s.n_selected
    assert len(sg.channel_bins(s, bins=1000)) == 4 * 3 * 128  # capped at d_ff


def test_histogram_and_thresholds(sig):
    for scope in ("module", "global"):
        s = sig.select(rho=0.3, scope=scope)
        fig = sv.score_histogram(s, bins=20)
        rest, chosen = fig.data
        assert sum(chosen.y) == s.n_selected and sum(rest.y) + sum(chosen.y) == 4 * 3 * 128
        thr = sg.selection_thresholds(s).threshold.dropna()
        shapes = fig.layout.shapes
        lines = [sh for sh in shapes if sh.type == "line"]
        assert lines, "threshold not marked"
        if scope == "global":
            assert np.isclose(lines[0].x0, thr.min())
        else:
            assert any(sh.type == "rect" for sh in shapes) and np.isclose(lines[0].x0, thr.median())


def test_layer_counts(sig):
    s = sig.select(rho=0.1, heads=3)
    c = sv.layer_counts(s)
    assert list(c.columns) == ["block", "gate", "up", "down", "heads", "channels", "frac"]
    assert c.channels.sum() == s.n_selected and c.heads.sum() == 3
    assert (c[list(MLP_KINDS)] == n_top(0.1, 128)).all().all()
    fig = sv.layer_counts_figure(s)
    assert [t.name for t in fig.data] == ["gate channels", "up channels", "down channels", "heads"]
    assert [t.name for t in sv.layer_counts_figure(sig.select(rho=0.1)).data] == [
        "gate channels",
        "up channels",
        "down channels",
    ]


def test_rho_curve_and_stage_figures():
    rows = [
        {"rho": r, "selection": sel, "seed": seed, "asr": 1 - r, "false_trigger": 0.0, "ppl": 10 + r}
        for r in (0.0, 0.5, 1.0)
        for sel, seed in (("signature", None), ("random", 0), ("random", 1))
    ]
    fig = sv.rho_curve_figure(pd.DataFrame(rows))
    assert len(fig.data) == 3 * 2  # asr / false_trigger / ppl × signature / random
    assert fig.data[1].error_y.array is not None  # two random seeds → error bars
    with pytest.raises(ValueError, match="metric"):
        sv.rho_curve_figure(pd.DataFrame({"rho": [0.1], "foo": [1]}))
    rep = pd.DataFrame(
        {"asr": [1, 0.4, 0.1], "false_trigger": [0, 0, 0.05], "mcq_acc": [0.3, 0.2, 0.3], "ppl": [9, 30, 11]},
        index=pd.Index(["suspicious", "suppressed", "purified"], name="stage"),
    )
    fig = sv.stage_metrics_figure({"lora": rep, "full": rep.drop(columns="mcq_acc")})
    assert len(fig.data) == 2 * 4 and list(fig.data[0].x) == ["suspicious", "suppressed", "purified"]


def test_compare_selections(sig):
    a, b = sig.select(rho=0.25), sig.select(rho=0.25, score="align")
    ov = sv.compare_selections({"norm-ish": a, "align": b, "same": a})
    assert ov.loc["norm-ish", "same"] == 1.0 and ov.loc["norm-ish", "align"] == 0.0
    assert ov.loc["align", "align"] == b.n_selected


SMOLLM2_LAYOUT = {
    "family": "llama",
    "n_blocks": 30,
    "hidden": 576,
    "d_ff": 1536,
    "n_heads": 9,
    "n_kv_heads": 3,
    "head_dim": 64,
    "blocks_path": "model.layers",
    "modules": {},
}


def test_figures_at_smollm2_size():
    """Every signature figure builds at the default model's size with one cell per block and module.

    How fast they build is a benchmark (benchmarks/figure_speed.py), not a test.
    """
    big = _signature(SMOLLM2_LAYOUT).select(rho=0.35, heads=8)
    heat = sv.score_heatmap(big, "selected_mass")
    z = np.asarray(heat.data[0].z, dtype=float)
    assert z.shape[0] * z.shape[1] >= 30 * 3 and np.isfinite(z).all()
    assert len(sv.channel_heatmap(big).data) >= 1
    assert len(sv.score_histogram(big).data) >= 1
    counts = sv.layer_counts_figure(big)
    assert sum(np.asarray(tr.y, dtype=float).sum() for tr in counts.data) > 0


# --------------------------------------------------------------------------- explorer: selection
def test_explorer_css_and_descriptions(sig):
    ex = SignatureExplorer(sig)
    for name, (desc, css) in CONTROLS.items():
        w = ex.controls[name]
        assert w.description == desc and css in w._dom_classes, name
    assert CONTAINER_CLASSES["widget"] in ex.widget._dom_classes

    def walk(w):
        yield w
        for child in getattr(w, "children", ()):
            yield from walk(child)

    classes = {c for w in walk(ex.widget) for c in getattr(w, "_dom_classes", ())}
    assert set(CONTAINER_CLASSES.values()) <= classes
    assert {css for _, css in CONTROLS.values()} <= classes
    assert ex.controls["run"].disabled  # no suspicious model given
    with pytest.raises(ValueError, match="no suspicious model"):
        ex.run()


def test_rho_changes_selected_count_and_heatmap(sig, no_training):
    ex = SignatureExplorer(sig)
    assert ex.settings["rho"] == 0.25 and ex.signature.n_selected == 4 * 3 * n_top(0.25, 128)
    z0 = np.asarray(ex.heatmap.data[0].z, dtype=float).copy()
    counts0 = ex.counts.copy()
    summary0 = ex.summary.value
    ex.controls["rho"].value = 0.5  # as a user moves the slider
    assert ex.signature.n_selected == 4 * 3 * n_top(0.5, 128)
    assert not np.allclose(np.asarray(ex.heatmap.data[0].z, dtype=float), z0)
    assert (ex.counts.channels == 3 * 64).all() and not ex.counts.equals(counts0)
    assert ex.summary.value != summary0 and "768" in ex.summary.value
    assert np.asarray(ex.counts_figure.data[0].y).tolist() == [64] * 4
    if ex._heat.output is not None:  # no anywidget: the figure is re-rendered into an Output widget
        shown = ex._heat.output.outputs[0]["data"]["application/vnd.plotly.v1+json"]
        title = ex.heatmap.layout.title.text
        assert shown["layout"]["title"]["text"] == title and "ρ=0.50" in title
    ex.update(rho=0.0)
    assert ex.signature.n_selected == 0 and np.allclose(np.asarray(ex.heatmap.data[0].z, dtype=float), 0)
    ex.update(value="frac_selected", rho=1.0)
    assert np.allclose(np.asarray(ex.heatmap.data[0].z, dtype=float), 1.0)
    assert ex.last_update_seconds >= 0.0  # measured per update; its speed is benchmarks/figure_speed.py


def test_lam_score_scope_heads_rerank_without_training(sig, no_training):
    ex = SignatureExplorer(sig)
    norm_top = _sets(ex.signature)
    assert all(
        v.tolist() == list(range(96, 128)) for v in ex.signature.selected.values()
    )  # λ = 0: top by norm
    ex.update(lam=100.0)  # λ large: the alignment term (falling with the index) dominates
    assert all(v.tolist() == list(range(32)) for v in ex.signature.selected.values())
    assert ex.signature.selection["lam"] == 100.0 and len(_sets(ex.signature)) == len(norm_top)
    ex.update(lam=0.0, score="align")
    assert all(v.tolist() == list(range(32)) for v in ex.signature.selected.values())
    ex.update(score="norm")
    assert _sets(ex.signature) == norm_top
    ex.controls["scope"].value = "global"  # the last modules score highest overall
    sel = ex.signature.selected
    assert sel[(3, "down")].numel() == 128 and sel[(0, "gate")].numel() == 0
    assert ex.signature.n_selected == n_top(0.25, 4 * 3 * 128)
    ex.controls["heads"].value = 3
    assert sum(v.numel() for v in ex.signature.selected_heads.values()) == 3
    assert ex.controls["heads"].max == 4 * 4  # n_blocks · n_heads (under the cap)
    with pytest.raises(ValueError, match="unknown control"):
        ex.update(rhoo=0.1)
    with pytest.raises(ValueError, match="not on the slider"):
        ex.update(lam=0.123)
    assert sig.selected is None  # the explorer never changes the signature it was given


def test_explorer_without_head_scores(tiny_layout):
    ex = SignatureExplorer(_signature(tiny_layout, heads=False).select(rho=0.1))
    assert ex.controls["heads"].disabled and ex.controls["heads"].max == 0
    assert ex.settings["rho"] == 0.1  # starts from the given selection


# --------------------------------------------------------------------------- explorer: the button
@pytest.fixture(scope="module")
def suspicious_lora(tiny_pair):
    model, tok = copy.deepcopy(tiny_pair[0]), tiny_pair[1]
    res = finetune(
        model, tok, REPAIR, TrainConfig(mode="lora", steps=2, lr=1e-2, batch_size=4), progress=False
    )
    return SuspiciousModel(model=res.model, tokenizer=tok, manifest={"setting": "lora"})


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_button_suppress_repair_asr_on_tiny_model(suspicious_lora, sig):
    before = _state(suspicious_lora.model)
    ex = SignatureExplorer(
        sig,
        suspicious=suspicious_lora,
        probe_prompts=PROBES,
        attack="badnets",
        task="refusal",
        repair_steps=2,
        repair_data=REPAIR,
        eval_config=TINY_EVAL,
    )
    assert not ex.controls["run"].disabled
    ex.update(rho=0.5, heads=2)
    ex.controls["run"].click()  # the button's on_click callback
    df = ex.result
    assert list(df.index) == ["suspicious", "suppressed", "purified"]
    for col in (
        "asr",
        "false_trigger",
        "degenerate_triggered",
        "ppl",
        "n_channels",
        "repair_steps",
        "repair_lr",
    ):
        assert col in df.columns, col
    assert df.loc["suppressed", "n_channels"] == 4 * 3 * 64 and df.loc["suppressed", "n_heads"] == 2
    assert df.loc["purified", "repair_steps"] == 2 and df.loc["purified", "repair_lr"] == 2e-4
    assert df.loc["suspicious", "n_prompts"] == len(PROBES)
    after = _state(suspicious_lora.model)
    assert all(torch.equal(before[k], after[k]) for k in before), "the user's model was modified"
    assert not ex.controls["run"].disabled and "done" in ex.status.value
    shown = [o["data"] for o in ex.output.outputs]
    assert len(shown) == 2 and "<table" in shown[1]["text/html"] and "purified" in shown[1]["text/plain"]
    # a second run re-uses the suspicious row and adds to the history
    ex.controls["repair_steps"].value = 0
    ex.update(rho=1.0)
    df2 = ex.run()
    assert list(df2.index) == ["suspicious", "suppressed"]
    assert df2.loc["suspicious"].equals(df.loc["suspicious"])
    assert sorted(ex.history.run.unique()) == [0, 1] and set(ex.history.rho) == {0.5, 1.0}


def test_try_selection_full_setting_and_random_control(tiny_pair, sig):
    model, tok = copy.deepcopy(tiny_pair[0]), tiny_pair[1]
    before = _state(model)
    rand = random_selection(sig.layout, 0.25, seed=0)
    df = try_selection(
        (model, tok),
        rand,
        prompts=PROBES,
        attack="badnets",
        task="refusal",
        repair_steps=1,
        repair_data=REPAIR,
        eval_config=TINY_EVAL,
    )
    assert list(df.index) == ["suspicious", "suppressed", "purified"]
    assert df.loc["purified", "repair_lr"] == 1e-5  # full setting: the paper's full-finetune lr
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # no attack known: utility only; an unselected Signature is selected with its own config (ρ = 0.25)
    df = try_selection((model, tok), sig, prompts=PROBES, repair_steps=0, eval_config=TINY_EVAL)
    assert "asr" not in df.columns and "ppl" in df.columns
    assert df.loc["suppressed", "n_channels"] == 4 * 3 * n_top(0.25, 128)
    with pytest.raises(TypeError, match="Selection"):
        try_selection(
            (model, tok), {"not": "a selection"}, prompts=PROBES, repair_steps=0, eval_config=TINY_EVAL
        )


def test_rho_curve_signature_vs_random(suspicious_lora, sig):
    df = rho_curve(
        suspicious_lora,
        sig,
        rhos=(0.5, 1.0),
        random_seeds=(0, 1),
        prompts=PROBES,
        attack="badnets",
        task="refusal",
        eval_config=TINY_EVAL,
        progress=False,
    )
    assert len(df) == 2 + 2 + 4  # ρ = 0 for both curves, 2 signature points, 2 × 2 random points
    assert set(df.selection) == {"signature", "random"} and {"asr", "false_trigger", "utility"} <= set(
        df.columns
    )
    at = df.set_index(["selection", "rho"])
    assert (at.loc[("signature", 1.0), "n_channels"] == at.loc[("random", 1.0), "n_channels"]).all()
    assert (df[df.rho == 0.0].n_channels == 0).all()
    assert sv.rho_curve_figure(df).data
