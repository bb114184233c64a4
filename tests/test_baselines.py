"""Baseline defences on the tiny model (seconds).

Each runs in both settings; the scores and steps are exact.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bdvax_lab.baselines.config import (
    CROW_PUBLISHED_LR,
    BaselineConfig,
    CrowConfig,
    FinePruneConfig,
    PruneConfig,
    QuantizeConfig,
)
from bdvax_lab.baselines.controls import ControlConfig, delta_head_scores
from bdvax_lab.baselines.crow import crow, crow_consistency_loss, crow_published, fgsm_perturb
from bdvax_lab.baselines.defend import defend
from bdvax_lab.baselines.fine_prune import collect_input_norms, fine_prune, wanda_channel_scores, wanda_scores
from bdvax_lab.baselines.magnitude import magnitude_channel_scores, magnitude_prune
from bdvax_lab.baselines.quantize import fake_quantize, quantize_int4
from bdvax_lab.baselines.registry import defences
from bdvax_lab.core.registry import ALL_KINDS, MLP_KINDS, layout_of, unwrap
from bdvax_lab.threat.config import EvalConfig
from bdvax_lab.training.config import REPAIR_LR, RepairConfig, TrainConfig
from bdvax_lab.training.loop import prepare_model
from bdvax_lab.training.repair import repair
from bdvax_lab.weights.deltas import WeightDelta
from bdvax_lab.weights.selection import counts_like, select_lowest

RC = RepairConfig(n_samples=8, steps=2, batch_size=4)
D_FF = 128  # tiny model


@pytest.fixture(scope="module")
def models():
    """The tiny base (full setting) and a LoRA adapter on it with random B (so ΔW ≠ 0), seeded."""
    from bdvax_lab.core.models import make_tiny_model

    base, tok = make_tiny_model()
    peft = prepare_model(copy.deepcopy(base), TrainConfig(mode="lora"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return {"full": base, "lora": peft}, tok


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _weight(model, block, kind):
    name = layout_of(model).module_name(block, kind)
    m = unwrap(model).get_submodule(name)
    return (m.get_base_layer() if hasattr(m, "get_base_layer") else m).weight


def _channel(w, kind, j):
    return w[j] if kind != "down" else w[:, j]


# --------------------------------------------------------------------------- every baseline, both settings
@pytest.mark.parametrize("setting", ["lora", "full"])
@pytest.mark.parametrize(
    "method", [m for m, d in defences().items() if d.kind == "baseline" and d.budget == "repair"]
)
def test_each_baseline_runs_and_reports_lr_and_steps(models, toy_examples, method, setting):
    ms, tok = models
    sm = ms[setting]
    before = _state(sm)
    cfg = defences()[method].config_cls(repair=RC)
    if method == "crow_published" and setting == "full":
        with pytest.raises(ValueError, match="adapter setting only"):
            defences()[method].fn(sm, tok, toy_examples, cfg)
        return
    model, report = defences()[method].fn(sm, tok, toy_examples, cfg)
    assert report["method"] == method and report["setting"] == setting
    assert {"lr", "steps", "lr_source", "intervention", "seconds"} <= set(report)
    # the suspicious model is untouched (inplace=False)
    after = _state(sm)
    assert all(torch.equal(before[k], after[k]) for k in before)
    if method == "quantize_int4":
        assert report["lr"] is None and report["steps"] == 0 and report["setting_out"] == "full"
        assert type(model).__name__.startswith("Llama")  # an adapter is merged: the result is a full model
        return
    # every trained baseline runs the repair's budget: same steps, same clean examples
    assert report["steps"] == RC.total_steps(len(toy_examples)) == 2 and report["n_examples"] == 8
    want_lr = CROW_PUBLISHED_LR["lora"] if method == "crow_published" else REPAIR_LR[setting]
    assert report["lr"] == want_lr
    assert type(model).__name__.startswith("Peft") == (setting == "lora")
    assert len(report["history"]) == 2


def test_configs_round_trip_through_json():
    for cfg in (
        PruneConfig(rho=0.1, counts={"0.gate": 3}),
        FinePruneConfig(scope="global", seed=3),
        QuantizeConfig(symmetric=True, kinds=("gate", "up")),
        CrowConfig(lr="published"),
        CrowConfig(lr=3e-4, alpha=11.0),
    ):
        back = type(cfg).from_json(cfg.to_json())
        assert back == cfg
    with pytest.raises(ValueError, match="standard"):
        CrowConfig(lr="fast")
    with pytest.raises(ValueError, match="scope"):
        PruneConfig(scope="layer")


# --------------------------------------------------------------------------- magnitude pruning
def _assert_lowest(orig_scores, key, pruned, n_want):
    s = orig_scores[key]
    assert pruned.numel() == n_want
    kept = torch.ones(s.numel(), dtype=torch.bool)
    kept[pruned] = False
    assert s[pruned].max() <= s[kept].min()


def test_magnitude_prune_full_zeroes_exactly_the_lowest_channels(models, toy_examples):
    ms, tok = models
    orig = magnitude_channel_scores(ms["full"])
    cfg = PruneConfig(rho=0.1, finetune=False, repair=RC)
    model, report = magnitude_prune(ms["full"], tok, toy_examples, cfg)
    n_want = int(0.1 * D_FF)  # floor(12.8) = 12 per module
    sel = report["intervention"]["selected"]
    assert len(sel) == 12 and report["intervention"]["n_channels"] == 12 * n_want and report["steps"] == 0
    for key_s, idx in sel.items():
        b, kind = int(key_s.split(".")[0]), key_s.split(".")[1]
        idx = torch.tensor(idx)
        _assert_lowest(orig, (b, kind), idx, n_want)
        w, w0 = _weight(model, b, kind), _weight(ms["full"], b, kind)
        zero = torch.zeros(w.shape[0] if kind == "down" else w.shape[1])
        for j in range(D_FF):
            assert torch.equal(_channel(w, kind, j), zero) == (j in idx.tolist())
            if j not in idx.tolist():
                assert torch.equal(_channel(w, kind, j), _channel(w0, kind, j))
    # nothing outside the MLP changed
    a, b0 = model.state_dict(), ms["full"].state_dict()
    assert all(torch.equal(a[k], b0[k]) for k in a if "mlp" not in k)


def test_magnitude_prune_lora_zeroes_the_lowest_delta_channels(models, toy_examples):
    ms, tok = models
    orig = magnitude_channel_scores(ms["lora"])
    assert set(orig) == {(b, k) for b in range(4) for k in MLP_KINDS}
    model, report = magnitude_prune(ms["lora"], tok, toy_examples, PruneConfig(finetune=False, repair=RC))
    n_want = int(0.35 * D_FF)  # paper default ρ for the adapter setting: floor(44.8) = 44
    assert report["intervention"]["rho"] == 0.35
    after = WeightDelta.from_lora(model, kinds="mlp")
    for key_s, idx in report["intervention"]["selected"].items():
        b, kind = int(key_s.split(".")[0]), key_s.split(".")[1]
        idx = torch.tensor(idx)
        _assert_lowest(orig, (b, kind), idx, n_want)
        norms = after.tensors[(b, kind)].norm(dim=0 if kind == "down" else 1)
        assert torch.all(norms[idx] == 0) and (norms > 0).sum() == D_FF - n_want
    # the base weights are untouched: only the adapter was pruned
    assert all(
        torch.equal(_weight(model, b, k), _weight(ms["lora"], b, k)) for b in range(4) for k in ALL_KINDS
    )


def test_select_lowest_global_scope_and_counts_like():
    g = torch.Generator().manual_seed(1)
    scores = {(b, k): torch.rand(D_FF, generator=g) for b in range(2) for k in MLP_KINDS}
    glob = select_lowest(scores, rho=0.05, scope="global")
    flat = torch.cat([scores[k] for k in sorted(scores, key=lambda x: (x[0], MLP_KINDS.index(x[1])))])
    total = sum(v.numel() for v in glob.values())
    assert total == int(0.05 * flat.numel())
    cutoff = torch.sort(flat).values[total - 1]
    assert all(bool((scores[k][v] <= cutoff).all()) for k, v in glob.items())
    sig = {(0, "gate"): torch.tensor([1, 2, 3]), (1, "down"): torch.tensor([5]), (0, "q"): torch.tensor([0])}
    counts = counts_like(sig)
    assert counts == {"0.gate": 3, "1.down": 1}  # attention keys are not MLP channels
    got = select_lowest(scores, counts=counts)
    assert {k: v.numel() for k, v in got.items()} == {(0, "gate"): 3, (1, "down"): 1}
    assert torch.equal(got[(0, "gate")], torch.sort(torch.sort(scores[(0, "gate")]).indices[:3]).values)


# --------------------------------------------------------------------------- fine-pruning (Wanda)
def test_wanda_channel_score_matches_hand_computation():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [-0.5, 0.5, -1.0, 3.0], [0.0, 0.0, 2.0, -1.0]])  # [out=3, in=4]
    xn = torch.tensor([2.0, 1.0, 0.5, 3.0])
    # gate/up: channel = output row j → Σ_k |W_jk|·‖x_k‖
    rows = [1 * 2 + 2 * 1 + 0.5 * 0.5 + 0 * 3, 0.5 * 2 + 0.5 * 1 + 1 * 0.5 + 3 * 3, 0 + 0 + 2 * 0.5 + 1 * 3]
    assert torch.allclose(wanda_channel_scores(w, xn, "gate"), torch.tensor(rows, dtype=torch.double))
    assert torch.allclose(wanda_channel_scores(w, xn, "up"), torch.tensor(rows, dtype=torch.double))
    # down: channel = input column j → ‖a_j‖·Σ_i |W_ij|
    cols = [2 * (1 + 0.5 + 0), 1 * (2 + 0.5 + 0), 0.5 * (0.5 + 1 + 2), 3 * (0 + 3 + 1)]
    assert torch.allclose(wanda_channel_scores(w, xn, "down"), torch.tensor(cols, dtype=torch.double))
    # both are the per-weight Wanda score |W_ij|·‖X_j‖ summed over the channel's weights
    per_weight = w.abs().double() * xn.double()
    assert torch.allclose(wanda_channel_scores(w, xn, "gate"), per_weight.sum(1))
    with pytest.raises(ValueError, match="inputs"):
        wanda_channel_scores(w, xn[:3], "gate")


def test_input_norms_ignore_padding(models, toy_examples):
    ms, tok = models
    ex = toy_examples[:5] + [toy_examples[5].with_(instruction="A much longer question " * 6)]
    batched = collect_input_norms(ms["full"], tok, ex, batch_size=6)  # padded batch
    singles = [collect_input_norms(ms["full"], tok, [e], batch_size=1) for e in ex]  # no padding at all
    for key in batched:
        want = torch.sqrt(sum(s[key] ** 2 for s in singles))
        assert torch.allclose(batched[key], want, rtol=1e-6, atol=1e-7), key
    assert batched[(0, "gate")].numel() == 64 and batched[(0, "down")].numel() == D_FF


@pytest.mark.parametrize("score", ["channel", "module"])
def test_fine_prune_full_prunes_the_dormant_channels(models, toy_examples, score):
    ms, tok = models
    cfg = FinePruneConfig(rho=0.05, finetune=False, repair=RC, score=score)
    scores = wanda_scores(
        ms["full"],
        tok,
        toy_examples[:8],
        score=score,
        max_length=RC.max_length,
        max_response_tokens=RC.max_response_tokens,
    )
    model, report = fine_prune(ms["full"], tok, toy_examples, cfg)
    assert report["intervention"]["n_calib"] == 8  # the repair's own examples
    assert report["intervention"]["score"].startswith(f"wanda per {score}")
    n_want = int(0.05 * D_FF)
    sel = report["intervention"]["selected"]
    for key_s, idx in sel.items():
        b, kind = int(key_s.split(".")[0]), key_s.split(".")[1]
        _assert_lowest(scores, (b, kind), torch.tensor(idx), n_want)
        w = _weight(model, b, kind)
        assert all(float(_channel(w, kind, j).detach().abs().sum()) == 0 for j in idx)
    same = all(
        sel[f"{b}.gate"] == sel[f"{b}.up"] == sel[f"{b}.down"] for b in range(layout_of(ms["full"]).n_blocks)
    )
    assert same == (score == "channel")  # channel: a dormant channel is pruned whole
    with pytest.raises(TypeError, match="random"):
        wanda_scores(ms["lora"], tok, toy_examples[:2])
    with pytest.raises(ValueError, match="score"):
        FinePruneConfig(score="neuron")


def test_channel_wanda_score_is_the_down_columns_activation_times_weight(models, toy_examples):
    ms, tok = models
    norms = collect_input_norms(ms["full"], tok, toy_examples[:8], kinds=("down",))
    scores = wanda_scores(ms["full"], tok, toy_examples[:8], score="channel")
    for b in range(layout_of(ms["full"]).n_blocks):
        w = _weight(ms["full"], b, "down").detach().double()  # [d_model, d_ff]
        want = norms[(b, "down")].double() * w.abs().sum(0)
        for kind in ("gate", "up", "down"):
            assert torch.allclose(scores[(b, kind)], want)


def test_fine_prune_lora_random_with_signature_counts(models, toy_examples):
    ms, tok = models
    counts = {"0.gate": 5, "2.up": 7, "3.down": 2}
    cfg = FinePruneConfig(counts=counts, finetune=False, seed=4, repair=RC)
    model, report = fine_prune(ms["lora"], tok, toy_examples, cfg)
    sel = report["intervention"]["selected"]
    assert {k: len(v) for k, v in sel.items()} == counts and "random" in report["intervention"]["score"]
    _, again = fine_prune(ms["lora"], tok, toy_examples, cfg)
    assert again["intervention"]["selected"] == sel  # seeded
    delta = WeightDelta.from_lora(model, kinds="mlp")
    for key_s, idx in sel.items():
        b, kind = int(key_s.split(".")[0]), key_s.split(".")[1]
        norms = delta.tensors[(b, kind)].norm(dim=0 if kind == "down" else 1)
        assert torch.all(norms[idx] == 0) and int((norms == 0).sum()) == len(idx)


# --------------------------------------------------------------------------- INT4 fake quantization
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quant_has_at_most_16_levels_per_group_and_small_error(symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 300, generator=g)  # 300 = 2 groups of 128 + a ragged group of 44
    q = fake_quantize(w, bits=4, group_size=128, symmetric=symmetric)
    assert q.shape == w.shape and q.dtype == w.dtype
    for row in range(16):
        for lo, hi in ((0, 128), (128, 256), (256, 300)):
            levels = q[row, lo:hi].unique().numel()
            assert levels <= (15 if symmetric else 16)
            step = (
                (w[row, lo:hi].abs().max() / 7)
                if symmetric
                else (w[row, lo:hi].max() - w[row, lo:hi].min()) / 15
            )
            assert (q[row, lo:hi] - w[row, lo:hi]).abs().max() <= step / 2 + 1e-6  # round to nearest
    rel = float((q - w).norm() / w.norm())
    assert rel < 0.15
    # idempotent: quantizing the grid again changes nothing (up to float rounding)
    assert torch.allclose(fake_quantize(q, 4, 128, symmetric), q, atol=1e-6)


def test_fake_quant_edge_cases():
    const = torch.full((2, 128), 0.3)
    assert torch.equal(fake_quantize(const), const)
    assert torch.equal(fake_quantize(torch.zeros(2, 128), symmetric=True), torch.zeros(2, 128))
    with pytest.raises(ValueError, match="2-D"):
        fake_quantize(torch.zeros(3))


def test_quantize_int4_touches_projections_only(models):
    ms, tok = models
    model, report = quantize_int4(ms["full"], tok, None, QuantizeConfig(group_size=32))
    assert report["intervention"]["n_modules"] == 4 * 7 and "fake" in report["intervention"]["note"]
    for b in range(4):
        for kind in ALL_KINDS:
            w = _weight(model, b, kind)
            groups = w.detach().reshape(-1, 32)
            assert max(int(grp.unique().numel()) for grp in groups) <= 16
    a, b0 = model.state_dict(), ms["full"].state_dict()
    assert torch.equal(a["model.embed_tokens.weight"], b0["model.embed_tokens.weight"])
    assert torch.equal(a["model.norm.weight"], b0["model.norm.weight"])
    with pytest.raises(ValueError, match="not registered"):
        quantize_int4(ms["full"], tok, None, QuantizeConfig(backend="bitsandbytes"))
    # "auto" falls back to fake-quant without a registered CUDA backend
    _, rep = quantize_int4(ms["full"], tok, None, QuantizeConfig(backend="auto"))
    assert rep["intervention"]["backend"] == "fake"


def test_quantize_lora_merges_the_adapter_first(models):
    ms, tok = models
    model, report = quantize_int4(ms["lora"], tok, None, QuantizeConfig())
    merged = copy.deepcopy(ms["lora"]).merge_and_unload()
    w_m, w_q = _weight(merged, 1, "up"), _weight(model, 1, "up")
    assert torch.allclose(fake_quantize(w_m), w_q) and not torch.equal(w_m, w_q)
    assert report["intervention"]["merged_adapter"] and report["setting"] == "lora"


# --------------------------------------------------------------------------- CROW
def test_consistency_loss_zero_for_identical_states_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 8, generator=g)
    assert float(crow_consistency_loss([h, h.clone(), 3.0 * h])) == pytest.approx(
        0.0, abs=1e-6
    )  # cos is scale-free
    other = torch.randn(2, 5, 8, generator=g)
    manual = (1 - torch.nn.functional.cosine_similarity(h, other, dim=-1)).mean()
    assert float(crow_consistency_loss([h, other])) == pytest.approx(float(manual), rel=1e-6)
    # differences only at padded positions do not count
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    noisy = h.clone()
    noisy[0, 3:] = other[0, 3:]
    assert float(crow_consistency_loss([h, noisy], mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(crow_consistency_loss([h, noisy])) > 0.01
    with pytest.raises(ValueError, match="two"):
        crow_consistency_loss([h])


def test_fgsm_step_moves_embeddings_by_exactly_eps_sign_grad(models):
    ms, tok = models
    model = ms["full"]
    dec = model.get_decoder()
    ids = torch.tensor([[5, 9, 11, 3, 7, 2]])
    am = torch.ones_like(ids)

    def cons(e):
        hs = dec(inputs_embeds=e, attention_mask=am, output_hidden_states=True).hidden_states
        return crow_consistency_loss(hs[1:-1], am)

    emb = model.get_input_embeddings()(ids).detach()
    eps = 0.1
    perturbed, grad = fgsm_perturb(emb, cons, eps)
    e2 = emb.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(cons(e2), e2)
    assert torch.equal(grad, want)
    assert torch.equal(perturbed, emb + eps * want.sign())
    moved = (perturbed - emb).abs()
    assert torch.allclose(moved[want != 0], torch.full_like(moved[want != 0], eps), atol=1e-6)
    assert (want != 0).float().mean() > 0.9
    assert all(p.grad is None for p in model.parameters())  # the FGSM step touches no parameter gradient
    # an ascent step: in the linear regime (ε small next to the tiny model's 0.02-scale embeddings) the
    # perturbed embeddings are less consistent
    small, _ = fgsm_perturb(emb, cons, 1e-4)
    assert cons(small).item() > cons(emb).item()


def test_crow_trains_through_the_one_loop(models, toy_examples):
    ms, tok = models
    model, report = crow(ms["lora"], tok, toy_examples, CrowConfig(repair=RC))
    h = report["history"]
    assert {"loss", "lm_loss", "consistency_adv", "consistency_clean", "total_loss"} <= set(h.columns)
    assert torch.allclose(
        torch.tensor(h.total_loss.values), torch.tensor((h.lm_loss + 5.5 * h.consistency_adv).values)
    )
    assert report["lr_source"].startswith("standard") and report["intervention"]["lr_policy"] == "standard"
    _, rep_pub = crow_published(ms["lora"], tok, toy_examples, CrowConfig(repair=RC))
    assert rep_pub["lr"] == CROW_PUBLISHED_LR["lora"] and rep_pub["lr_source"].startswith("published")
    _, rep_x = crow(ms["full"], tok, toy_examples, CrowConfig(repair=RC, lr=3e-5))
    assert rep_x["lr"] == 3e-5 and rep_x["lr_source"] == "explicit"

    def boom(model, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # the extra term really runs inside the one loop
        repair(copy.deepcopy(ms["full"]), tok, toy_examples, RC, progress=False, extra_loss=boom)


# --------------------------------------------------------------------------- defend()
def test_defend_unknown_method_lists_the_methods(models):
    with pytest.raises(ValueError) as err:
        defend("/nonexistent", "unknown")
    for name in defences():
        assert name in str(err.value)


@pytest.fixture(scope="module")
def suspicious_models(tmp_path_factory):
    from bdvax_lab.core.models import make_tiny_model
    from bdvax_lab.threat.config import AttackRecipe
    from bdvax_lab.threat.suspicious import make_suspicious_model

    root = tmp_path_factory.mktemp("susp_bl")
    out = {}
    for s in ("lora", "full"):
        recipe = AttackRecipe(
            setting=s,
            n_samples=24,
            train=TrainConfig(mode=s, steps=3),
            eval=EvalConfig(n_prompts=2, max_new_tokens=3, utility=()),
        )
        out[s] = make_suspicious_model(
            recipe=recipe, base=make_tiny_model(), out=root / s, evaluate=False, progress=False
        )
    return out


EV = EvalConfig(n_prompts=2, max_new_tokens=3, utility=("ppl",), n_ppl=4)


@pytest.mark.parametrize("setting", ["lora", "full"])
def test_defend_magnitude_prune_end_to_end(suspicious_models, toy_examples, tmp_path, setting):
    sm = suspicious_models[setting]
    sig = {(0, "gate"): torch.tensor([1, 2]), (3, "down"): torch.tensor([0, 4, 9])}
    res = defend(
        sm,
        "magnitude_prune",
        toy_examples,
        PruneConfig(repair=RC, eval=EV),
        like=sig,
        out=tmp_path / "d",
        progress=False,
    )
    assert list(res.report.index) == ["suspicious", "intervened", "defended"]
    for col in (
        "asr",
        "false_trigger",
        "degenerate_triggered",
        "degenerate_clean",
        "ppl",
        "lr",
        "train_steps",
    ):
        assert col in res.report.columns
    assert (
        res.report.loc["defended", "train_steps"] == 2
        and res.report.loc["defended", "lr"] == REPAIR_LR[setting]
    )
    assert res.report.loc["intervened", "train_steps"] == 0
    assert res.info["intervention"]["n_channels"] == 5 and res.config.counts == {"0.gate": 2, "3.down": 3}
    assert res.evaluated_with == {"attack": "badnets", "task": "refusal"}
    for f in ("manifest.json", "report.csv", "report.json", "history.csv", "intervention.json"):
        assert (tmp_path / "d" / f).exists(), f
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["kind"] == "bdvax.defended" and manifest["method"] == "magnitude_prune"
    assert manifest["lr"] == REPAIR_LR[setting] and manifest["steps"] == 2
    assert PruneConfig.from_dict(manifest["config"]) == res.config
    assert (tmp_path / "d" / ("adapter" if setting == "lora" else "model")).is_dir()


def test_defend_quantize_and_crow_rows(suspicious_models, toy_examples, tmp_path):
    sm = suspicious_models["lora"]
    q = defend(
        sm,
        "quantize_int4",
        None,
        QuantizeConfig(eval=EV, evaluate=("defended",)),
        out=tmp_path / "q",
        progress=False,
    )
    assert list(q.report.index) == ["defended"] and q.report.loc["defended", "train_steps"] == 0
    assert (tmp_path / "q" / "model").is_dir() and json.loads((tmp_path / "q" / "manifest.json").read_text())[
        "setting"
    ] == "full"
    c = defend(
        sm,
        "crow_published",
        toy_examples,
        CrowConfig(repair=RC, eval=EV, evaluate=("defended",)),
        progress=False,
    )
    assert c.report.loc["defended", "lr"] == CROW_PUBLISHED_LR["lora"] and c.steps == 2
    with pytest.raises(TypeError, match="CrowConfig"):
        defend(sm, "crow", toy_examples, PruneConfig())
    with pytest.raises(ValueError, match="pruning"):
        defend(sm, "crow", toy_examples, CrowConfig(), like={(0, "gate"): [1]})


def test_cli_score_applies_to_fine_prune_only(capsys):
    from bdvax_lab.cli import main

    assert main(["defend", "no-such-dir", "--method", "crow", "--score", "channel"]) == 2
    assert "--score applies to fine_prune only" in capsys.readouterr().err
    assert main(["defend", "no-such-dir", "--method", "retrain", "--no-repair"]) == 2
    assert "retrain is its training and cannot skip it" in capsys.readouterr().err


# --------------------------------------------------------------------------- controls
def test_discard_is_the_base_under_the_adapter(models, toy_examples):
    ms, tok = models
    model, info = defences()["discard"].fn(ms["lora"], tok, None, BaselineConfig())
    assert info["reference"] is False and info["steps"] == 0
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ms["full"](ids).logits)
        assert not torch.equal(model(ids).logits, ms["lora"](ids).logits)


def test_retrain_trains_a_fresh_adapter_on_the_defender_data(models, toy_examples):
    ms, tok = models
    model, info = defences()["retrain"].fn(ms["lora"], tok, toy_examples, BaselineConfig(repair=RC))
    assert info["reference"] is False and info["steps"] == 2 and info["n_examples"] == 8
    fresh = WeightDelta.from_lora(model)
    old = WeightDelta.from_lora(ms["lora"])
    assert set(fresh.tensors) == set(old.tensors)
    assert all(not torch.allclose(fresh.tensors[k], old.tensors[k]) for k in list(old.tensors)[:3])


def test_random_control_keeps_the_counts_and_varies_with_the_seed(models, toy_examples):
    ms, tok = models
    counts, heads = {"0.gate": 5, "1.down": 7, "3.up": 2}, {"2": 1}
    picks = []
    for seed in (0, 0, 1):
        cfg = ControlConfig(counts=counts, head_counts=heads, seed=seed, repair=RC, finetune=False)
        model, info = defences()["random"].fn(ms["lora"], tok, toy_examples, cfg)
        assert info["intervention"]["selected"] == counts and info["intervention"]["n_heads"] == 1
        zeroed = []
        for key, n in counts.items():
            b, kind = int(key.split(".")[0]), key.split(".")[1]
            w = WeightDelta.from_lora(model, kinds=(kind,), blocks=(b,)).tensors[(b, kind)]
            zero = (w.norm(dim=1 - (1 if kind == "down" else 0)) == 0).nonzero()[:, 0].tolist()
            assert len(zero) == n
            zeroed.append(zero)
        picks.append(zeroed)
    assert picks[0] == picks[1] and picks[0] != picks[2]  # seeded: the same seed, the same channels
    with pytest.raises(ValueError, match="counts"):
        defences()["random"].fn(ms["lora"], tok, toy_examples, ControlConfig(repair=RC))


def test_drop_attention_zeroes_every_attention_slice_and_keeps_the_mlp(models, toy_examples):
    ms, tok = models
    cfg = ControlConfig(repair=RC, finetune=False)
    model, info = defences()["drop_attention"].fn(ms["lora"], tok, toy_examples, cfg)
    layout = layout_of(model)
    assert info["intervention"]["n_heads"] == layout.n_blocks * layout.n_heads
    assert info["intervention"]["n_channels"] == 0 and info["steps"] == 0
    after, before = WeightDelta.from_lora(model), WeightDelta.from_lora(ms["lora"])
    for (b, kind), w in after.tensors.items():
        if kind in ("q", "k", "v", "o"):
            assert float(w.norm()) == 0, (b, kind)
        else:
            assert torch.equal(w, before.tensors[(b, kind)]), (b, kind)  # the MLP part untouched
    assert any(kind == "q" and float(w.norm()) > 0 for (b, kind), w in before.tensors.items())
    with pytest.raises(ValueError, match="no adapter to split"):
        defences()["drop_attention"].fn(ms["full"], tok, toy_examples, cfg)


def test_top_delta_picks_the_channels_the_update_moved_most(models, toy_examples):
    ms, tok = models
    peft = copy.deepcopy(ms["lora"])
    name = layout_of(peft).module_name(1, "gate")
    mod = unwrap(peft).get_submodule(name)
    with torch.no_grad():
        mod.lora_B["default"].weight[17] *= 50  # a planted channel: row 17 of gate's ΔW in block 1
    cfg = ControlConfig(counts={"1.gate": 1}, repair=RC, finetune=False)
    model, info = defences()["top_delta"].fn(peft, tok, toy_examples, cfg)
    w = WeightDelta.from_lora(model, kinds=("gate",), blocks=(1,)).tensors[(1, "gate")]
    assert float(w[17].norm()) == 0 and int((w.norm(dim=1) == 0).sum()) == 1
    scores = delta_head_scores(peft)
    assert set(scores) == set(range(layout_of(peft).n_blocks)) and all(s.min() >= 0 for s in scores.values())
