"""Purification on the tiny model.

Suppression touches exactly the signature, repair repairs, purify runs end to end.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from bdvax_lab.bdvax.config import PurifyConfig
from bdvax_lab.bdvax.purify import load_purified, purify
from bdvax_lab.core.batching import collate
from bdvax_lab.core.data import encode_example
from bdvax_lab.core.registry import layout_of
from bdvax_lab.core.scoring import lm_loss
from bdvax_lab.threat.config import AttackRecipe, EvalConfig
from bdvax_lab.threat.suspicious import SuspiciousModel, load_suspicious, make_suspicious_model
from bdvax_lab.training.config import REPAIR_LR, RepairConfig, TrainConfig
from bdvax_lab.training.loop import prepare_model
from bdvax_lab.training.repair import repair
from bdvax_lab.weights.config import SuppressConfig
from bdvax_lab.weights.deltas import WeightDelta
from bdvax_lab.weights.suppression import head_slices, reinit_channels, suppress, zero_lora_channels

# tiny model: 4 blocks, d_ff 128, 4 query heads / 2 kv heads of head_dim 16 (GQA group of 2)
SEL = {
    (0, "gate"): [1, 5, 9],
    (1, "up"): [0, 127],
    (2, "down"): [3, 7],
    (3, "gate"): [2],
    (3, "up"): [2],
    (3, "down"): torch.tensor([2, 2]),
}  # duplicates collapse
HEADS = {1: torch.tensor([0]), 3: [2, 3]}  # block 3: the whole kv group 1 → its k/v rows too


@dataclass
class FakeSignature:
    selected: dict
    selected_heads: dict = field(default_factory=dict)
    config: Any = None

    def save(self, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "signature.json").write_text(
            json.dumps({str(k): list(map(int, v)) for k, v in self.selected.items()})
        )
        return path


def _idx(v):
    return torch.unique(torch.as_tensor(v, dtype=torch.long))


def _weight_masks(model, lora: bool) -> dict[str, torch.Tensor]:
    """Expected changed entries per parameter name for SEL/HEADS (kv rule "group")."""
    layout = layout_of(model)
    masks: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())

    def mark(block, kind, idx, axis):
        name = layout.module_name(block, kind)
        if lora:
            part = "lora_A" if axis == 1 else "lora_B"
            keys = [n for n in params if f"{name}.{part}." in n]
        else:
            keys = [f"{name}.weight"]
        for k in keys:
            m = masks.setdefault(k, torch.zeros_like(params[k], dtype=torch.bool))
            if axis == 0:
                m[idx] = True
            else:
                m[:, idx] = True

    for (b, kind), v in SEL.items():
        mark(b, kind, _idx(v), 1 if kind == "down" else 0)
    for b, hs in HEADS.items():
        for kind, idx in head_slices(layout, hs).items():
            if idx.numel():
                mark(b, kind, idx, 1 if kind == "o" else 0)
    return masks


def _assert_only_masked_changed(before, model, masks):
    n_checked = 0
    for name, p in model.named_parameters():
        diff = before[name] != p.detach()
        exp = masks.get(name)
        if exp is None:
            assert not diff.any(), f"{name} changed but was not selected"
            continue
        assert not (diff & ~exp).any(), f"{name}: entries outside the selection changed"
        n_checked += 1
        yield name, diff, exp
    assert n_checked == len(masks)


# --------------------------------------------------------------------------- head slices
def test_head_slices_gqa_rules(tiny_pair):
    layout = layout_of(tiny_pair[0])  # 4 heads, 2 kv heads, head_dim 16
    one = head_slices(layout, [0])
    assert one["q"].tolist() == list(range(16)) and one["o"].tolist() == list(range(16))
    assert one["k"].numel() == 0 and one["v"].numel() == 0  # kv head 0 is shared with unselected head 1
    assert head_slices(layout, [0], "any")["k"].tolist() == list(range(16))
    both = head_slices(layout, [2, 3])
    assert both["q"].tolist() == list(range(32, 64)) and both["k"].tolist() == list(range(16, 32))
    assert head_slices(layout, [2, 3], "none")["v"].numel() == 0


# --------------------------------------------------------------------------- full setting
def test_reinit_touches_exactly_the_selection(tiny):
    model, _ = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rep = reinit_channels(model, SEL, HEADS, seed=3)
    for name, diff, exp in _assert_only_masked_changed(before, model, _weight_masks(model, lora=False)):
        assert diff[exp].all(), f"{name}: a selected entry kept its old value"
    assert rep.counts == {"gate": 4, "up": 3, "down": 3, "q": 48, "o": 48, "k": 16, "v": 16}
    assert rep.n_heads == 3 and rep.meta["init"] == "model" and rep.meta["std"] == 0.02
    assert set(rep.frame().columns) >= {"block", "kind", "axis", "n"}


def test_reinit_seeded_order_independent_and_initializer_std(tiny_pair):
    base, _ = tiny_pair
    sel = {(0, "gate"): range(128), (1, "down"): range(128), (2, "up"): [4, 8]}
    a, b, c = (copy.deepcopy(base) for _ in range(3))
    reinit_channels(a, sel, seed=1)
    reinit_channels(b, dict(reversed(list(sel.items()))), seed=1)  # other order, same draws
    reinit_channels(c, sel, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["model.layers.0.mlp.gate_proj.weight"], sc["model.layers.0.mlp.gate_proj.weight"]
    )
    gate = sa["model.layers.0.mlp.gate_proj.weight"]  # every row re-drawn: 128 × 64 values
    down = sa["model.layers.1.mlp.down_proj.weight"]
    for w in (gate, down):
        assert abs(w.mean().item()) < 0.002 and abs(w.std().item() - 0.02) < 0.002
    x = copy.deepcopy(base)
    reinit_channels(x, sel, seed=1, init="xavier")
    xg = x.state_dict()["model.layers.0.mlp.gate_proj.weight"]
    bound = math.sqrt(6 / (64 + 128))
    assert xg.abs().max() <= bound and abs(xg.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    z = copy.deepcopy(base)
    reinit_channels(z, {(2, "up"): [4, 8]}, init="zero")
    assert z.state_dict()["model.layers.2.mlp.up_proj.weight"][[4, 8]].abs().sum() == 0
    with pytest.raises(ValueError, match="init"):
        reinit_channels(copy.deepcopy(base), sel, init="kaiming")
    with pytest.raises(IndexError):
        reinit_channels(copy.deepcopy(base), {(0, "gate"): [128]})


# --------------------------------------------------------------------------- adapter setting
def _random_lora(model, second: bool = False):
    from peft import LoraConfig

    pm = prepare_model(model, TrainConfig(mode="lora"))
    if second:
        pm.add_adapter(
            "second", LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "down_proj", "q_proj"])
        )
        pm.base_model.set_adapter(["default", "second"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return pm


@pytest.mark.parametrize("second", [False, True])
def test_zero_lora_touches_exactly_the_selection(tiny, second):
    model, _ = tiny
    pm = _random_lora(model, second)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    rep = zero_lora_channels(pm, SEL, HEADS)
    masks = _weight_masks(pm, lora=True)
    assert any(".second." in k for k in masks) == second
    for name, diff, exp in _assert_only_masked_changed(before, pm, masks):
        assert (pm.get_parameter(name)[exp] == 0).all()
        assert diff[exp].all()
    assert rep.counts == {"gate": 4, "up": 3, "down": 3, "q": 48, "o": 48, "k": 16, "v": 16}
    if second:
        assert {r["adapter"] for r in rep.records} == {"default", "second"}
    # the merged ΔW of every active adapter: selected gate/up rows and down columns exactly zero
    delta = WeightDelta.from_lora(pm)
    for (b, kind), v in SEL.items():
        d, idx = delta.tensors[(b, kind)], _idx(v)
        sel, rest = (d[:, idx], d) if kind == "down" else (d[idx], d)
        assert sel.abs().max() == 0
        assert rest.abs().sum() > 0
    assert delta.tensors[(1, "q")][:16].abs().max() == 0 and delta.tensors[(1, "q")][16:].abs().min() > 0
    assert delta.tensors[(1, "o")][:, :16].abs().max() == 0
    assert delta.tensors[(3, "k")][16:].abs().max() == 0 and delta.tensors[(1, "k")].abs().min() > 0


def test_suppress_dispatches_on_setting(tiny_pair):
    base, _ = tiny_pair
    sig = FakeSignature({(0, "up"): [1]}, {2: [1]})
    plain = copy.deepcopy(base)
    assert suppress(plain, sig, SuppressConfig(seed=5)).method == "reinit:model"
    pm = _random_lora(copy.deepcopy(base))
    rep = suppress(pm, sig, SuppressConfig(heads=False))
    assert rep.method == "zero_lora" and "q" not in rep.counts
    with pytest.raises(TypeError):
        reinit_channels(pm, sig.selected)
    with pytest.raises(TypeError):
        zero_lora_channels(plain, sig.selected)


# --------------------------------------------------------------------------- repair
def _loss(model, tok, examples):
    batch = collate([encode_example(tok, e) for e in examples], tok.pad_token_id)
    with torch.no_grad():
        return float(lm_loss(model, batch))


def test_repair_defaults_follow_the_paper():
    cfg = RepairConfig()
    assert (cfg.n_samples, cfg.epochs, cfg.batch_size) == (200, 5.0, 8)
    assert cfg.resolved_lr("lora") == 2e-4 == REPAIR_LR["lora"] and cfg.resolved_lr("full") == 1e-5
    assert cfg.total_steps() == 125 and cfg.total_steps(100) == 63
    assert cfg.train_config("full").mode == "full" and cfg.train_config("full").lr == 1e-5


@pytest.mark.parametrize("lora", [True, False])
def test_repair_lowers_clean_loss_and_reports_lr(tiny, toy_examples, lora):
    model, tok = tiny
    if lora:
        model = prepare_model(model, TrainConfig(mode="lora"))
    before = _loss(model, tok, toy_examples)
    cfg = RepairConfig(
        n_samples=24, steps=25, lr=2e-2 if lora else 3e-3, batch_size=4, max_response_tokens=None
    )
    res = repair(model, tok, toy_examples, cfg, progress=False)
    after = _loss(res.model, tok, toy_examples)
    assert after < before - 0.3, (before, after)
    assert (
        res.lr == cfg.lr and res.mode == ("lora" if lora else "full") and res.steps == 25 == len(res.history)
    )
    dflt = repair(res.model, tok, toy_examples, RepairConfig(n_samples=4, steps=1), progress=False)
    assert dflt.lr == (2e-4 if lora else 1e-5) and dflt.n_examples == 4


# --------------------------------------------------------------------------- purify end to end
def _recipe(setting):
    mode = "lora" if setting == "lora" else "full"
    return AttackRecipe(
        setting=setting,
        n_samples=24,
        train=TrainConfig(mode=mode, steps=3),
        eval=EvalConfig(n_prompts=2, max_new_tokens=3, utility=()),
    )


@pytest.fixture(scope="module")
def suspicious_models(tmp_path_factory):
    from bdvax_lab.core.models import make_tiny_model

    root = tmp_path_factory.mktemp("susp")
    return {
        s: make_suspicious_model(recipe=_recipe(s), base=make_tiny_model(), out=root / s, progress=False)
        for s in ("lora", "full")
    }


def _cfg(**kw):
    return PurifyConfig(
        repair=RepairConfig(n_samples=8, steps=2, batch_size=4),
        eval=EvalConfig(n_prompts=2, max_new_tokens=3, utility=("ppl",), n_ppl=4),
        **kw,
    )


def _extractor(seen):
    def extract(view, config, *, cache_dir=None, progress=True):
        seen.append(view)
        return FakeSignature(SEL, HEADS, config=config)

    return extract


def _lora_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("setting", ["lora", "full"])
def test_purify_end_to_end_saves_and_loads(suspicious_models, toy_examples, tmp_path, setting):
    sm = suspicious_models[setting]
    original = {k: v.clone() for k, v in sm.model.state_dict().items()}
    seen: list = []
    res = purify(sm, toy_examples, _cfg(), out=tmp_path / "p", extractor=_extractor(seen), progress=False)
    # the defence saw no attack information
    assert (
        len(seen) == 1
        and set(seen[0].manifest) <= {"setting", "base"}
        and seen[0].manifest["setting"] == setting
    )
    assert res.setting == setting and res.repair.lr == (2e-4 if setting == "lora" else 1e-5)
    assert list(res.report.index) == ["suspicious", "suppressed", "purified"]
    for col in ("asr", "false_trigger", "degenerate_triggered", "degenerate_clean", "ppl"):
        assert col in res.report.columns
    assert res.evaluated_with == {"attack": "badnets", "task": "refusal"}
    assert set(res.timings) == {"clean_data", "signature", "suppression", "repair", "evaluation", "total"}
    assert res.peak_rss_mb > 0 and res.suppression.counts["gate"] == 4
    # the suspicious model itself is untouched (inplace=False)
    assert all(torch.equal(v, original[k]) for k, v in sm.model.state_dict().items())
    out = tmp_path / "p"
    for f in ("manifest.json", "report.csv", "report.json", "signature/signature.json", "repair_history.csv"):
        assert (out / f).exists(), f
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "bdvax.purified" and manifest["setting"] == setting
    assert manifest["repair"]["lr"] == res.repair.lr
    assert PurifyConfig.from_dict(manifest["config"]) == res.config
    saved = json.loads((out / "report.json").read_text())
    assert [r["stage"] for r in saved["report"]] == ["suspicious", "suppressed", "purified"]
    if setting == "lora":
        from bdvax_lab.core.models import make_tiny_model

        assert (out / "adapter").is_dir() and (out / "tokenizer").is_dir()
        back = load_purified(out, base=make_tiny_model())  # same seeded tiny base the attack started from
        want, got = _lora_params(res.model), _lora_params(back.model)
    else:
        assert (out / "model").is_dir()
        back = load_suspicious(out)
        want, got = res.model.state_dict(), back.model.state_dict()
    assert back.setting == setting and set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_purify_without_manifest_works_the_same(suspicious_models, toy_examples):
    sm = suspicious_models["lora"]
    bare = SuspiciousModel(model=sm.model, tokenizer=sm.tokenizer, manifest={})
    cfg = _cfg()
    with_m = purify(sm, toy_examples, cfg, extractor=_extractor([]), progress=False)
    without = purify(bare, toy_examples, cfg, extractor=_extractor([]), progress=False)
    # the defence is identical: same purified weights, bit for bit
    a, b = _lora_params(with_m.model), _lora_params(without.model)
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    # no attack known → no ASR, utility still measured for all three stages
    assert list(without.report.index) == ["suspicious", "suppressed", "purified"]
    assert "asr" not in without.report.columns and "ppl" in without.report.columns
    assert without.evaluated_with is None
    # attack/task passed explicitly → ASR again, same numbers as from the manifest
    explicit = purify(
        bare, toy_examples, cfg, extractor=_extractor([]), attack="badnets", task="refusal", progress=False
    )
    assert "asr" in explicit.report.columns
    assert explicit.report["asr"].tolist() == with_m.report["asr"].tolist()


def test_purify_full_from_disk_with_manifest_deleted(suspicious_models, toy_examples, tmp_path):
    import shutil

    src = suspicious_models["full"].path
    dst = tmp_path / "bare"
    shutil.copytree(src, dst)
    (dst / "manifest.json").unlink()
    seen: list = []
    res = purify(dst, toy_examples, _cfg(evaluate=("purified",)), extractor=_extractor(seen), progress=False)
    assert res.setting == "full" and seen[0].manifest == {"setting": "full"}
    assert list(res.report.index) == ["purified"] and "asr" not in res.report.columns


def test_purify_accepts_precomputed_signature_and_checks_setting(suspicious_models, toy_examples):
    sm = suspicious_models["lora"]
    sig = FakeSignature({(0, "gate"): [0]})
    res = purify(sm, toy_examples, _cfg(evaluate=()), signature=sig, progress=False)
    assert res.signature is sig and res.report.empty and res.suppression.counts == {"gate": 1}
    with pytest.raises(ValueError, match="setting"):
        purify(sm, toy_examples, _cfg(setting="full"), signature=sig, progress=False)


def test_purify_without_repair_keeps_every_unsuppressed_weight(suspicious_models, toy_examples, tmp_path):
    """``finetune=False``: the suppressed model is the result; only the selected adapter rows change."""
    sm = suspicious_models["lora"]
    sig = FakeSignature({(0, "gate"): [0]})
    before = _lora_params(sm.model)
    res = purify(
        sm, toy_examples, _cfg(evaluate=(), finetune=False), signature=sig, out=tmp_path / "p", progress=False
    )
    after = _lora_params(res.model)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all("layers.0." in k and "gate_proj" in k for k in changed), changed
    assert res.repair is None and res.timings["repair"] == 0.0
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["repair"] is None and PurifyConfig.from_dict(manifest["config"]).finetune is False
    assert not (tmp_path / "p" / "repair_history.csv").exists()
    # with every stage asked for, the suppressed model is evaluated once and reported as purified too
    both = purify(sm, toy_examples, _cfg(finetune=False), signature=sig, progress=False)
    assert list(both.report.index) == ["suspicious", "suppressed", "purified"]
    assert both.evals["purified"] is both.evals["suppressed"]
    assert both.report.loc["purified"].equals(both.report.loc["suppressed"])
    # with the repair, the other adapter weights move too
    repaired = _lora_params(purify(sm, toy_examples, _cfg(evaluate=()), signature=sig, progress=False).model)
    assert any(not torch.equal(before[k], repaired[k]) for k in before if k not in changed)


@pytest.mark.parametrize(
    "flags, message", [(["--heads", "-3"], "heads must be ≥ 0"), (["--rho", "1.5"], "rho must be in (0, 1]")]
)
def test_demo_rejects_a_bad_selection_before_loading_a_model(monkeypatch, capsys, flags, message):
    import bdvax_lab.core.models as models
    from bdvax_lab.cli import main

    def no_load(*a, **k):
        raise AssertionError("the demo loaded a model before checking its arguments")

    monkeypatch.setattr(models, "load_default_model", no_load)
    assert main(["demo", *flags, "--out", "unused"]) == 2
    assert message in capsys.readouterr().err
