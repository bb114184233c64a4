"""The evaluation oracle: a planted channel and head rank first, precision@k / AUROC on hand-made cases,
GQA head grouping by hand, and the defence never importing the oracle."""

from __future__ import annotations

import ast
import copy
import math
from pathlib import Path

import pytest
import torch

from bdvax_lab.analysis.probes.attribution import ORACLE_COLUMNS, oracle_attribution, oracle_frame
from bdvax_lab.analysis.ranking import (
    OVERLAP_COLUMNS,
    auroc,
    mass_at_k,
    neuron_scores,
    precision_at_k,
    rank_correlation,
    ranking_overlap,
    selection_share,
    top_set,
)
from bdvax_lab.core.data import Example
from bdvax_lab.core.registry import layout_of
from bdvax_lab.threat.attacks import triggered_prompts

ROOT = Path(__file__).resolve().parents[1]
CHANNEL, HEAD = 37, 0  # planted in the last block


def _plant(model, tok, target: str) -> int:
    """Edit the tiny model's weights so that, in its last block, query head HEAD carries the key
    ``BadMagic`` to every later position (uniform attention reading a key-only embedding dimension) and
    MLP channel CHANNEL turns that into the target token's logit. Hidden dims 0-3 are reserved: 0 marks the
    key tokens, 1 is read by the target's unembedding, 2 carries the head's output, 3 is a constant.
    Returns the target token id."""
    lay = layout_of(model)
    b = lay.n_blocks - 1
    key_ids = tok("BadMagic", add_special_tokens=False)["input_ids"]
    key_ids += tok(" BadMagic", add_special_tokens=False)["input_ids"]
    t_star = tok(target, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # tied: also the unembedding
        emb[:, :4] = 0
        emb[:, 3] = 1.0
        emb[key_ids, 0] = 10.0
        emb[t_star, 1] = 0.3
        for layer in model.model.layers:  # nothing else writes the reserved dims
            layer.self_attn.o_proj.weight[:4] = 0
            layer.mlp.down_proj.weight[:4] = 0
        att, mlp = model.model.layers[b].self_attn, model.model.layers[b].mlp
        att.q_proj.weight.zero_()  # uniform causal attention
        att.v_proj.weight[0].zero_()  # kv head 0 (read by query head HEAD = 0), its dim 0 reads the marker
        att.v_proj.weight[0, 0] = 1.0
        att.o_proj.weight[:, HEAD * lay.head_dim] = 0
        att.o_proj.weight[2, HEAD * lay.head_dim] = 2.0
        for m in (mlp.gate_proj, mlp.up_proj):
            m.weight[CHANNEL].zero_()
            m.weight[CHANNEL, 2] = 4.0
        mlp.down_proj.weight[:, CHANNEL] = 0
        mlp.down_proj.weight[1, CHANNEL] = 0.002
    return t_star


def test_oracle_ranks_a_planted_channel_and_head_first(tiny):
    model, tok = tiny
    target = "stupid"
    _plant(model, tok, target)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    clean = [Example(f"What is {i} plus {i} today?") for i in range(6)]
    trig = triggered_prompts(clean, "badnets", seed=0)
    res = oracle_attribution(model, tok, clean, trig, target, n_target_tokens=1, batch_size=4)
    lay = layout_of(model)
    f = res.frame
    assert list(f.columns) == ORACLE_COLUMNS and len(f) == lay.n_blocks * (lay.d_ff + lay.n_heads)
    assert res.tensor.shape == (lay.n_blocks, lay.d_ff) and res.meta["heads"].shape == (
        lay.n_blocks,
        lay.n_heads,
    )
    top_mlp = f[(f.kind == "mlp") & (f["rank"] == 0)].iloc[0]
    top_head = f[(f.kind == "head") & (f["rank"] == 0)].iloc[0]
    assert (top_mlp.block, top_mlp.unit) == (lay.n_blocks - 1, CHANNEL)
    assert (top_head.block, top_head.unit) == (lay.n_blocks - 1, HEAD)
    second = f[(f.kind == "mlp") & (f["rank"] == 1)].attribution.iloc[0]
    assert top_mlp.attribution > 10 * abs(second)
    # the model is left as it was: no gradients kept, requires_grad restored
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    # the planted model's ranking recovers the oracle's top set; a random one does not
    ov = ranking_overlap(res.tensor, {"planted": res.tensor}, n_top=1, ks=[1], random_seeds=(0,))
    assert ov.set_index("ranking").loc["planted", "precision_at_k"] == 1.0


# --------------------------------------------------------------------------- precision@k and AUROC
def test_precision_at_k_and_auroc_by_hand():
    oracle = torch.tensor([[5.0, 0.1, 3.0], [0.2, 4.0, 0.0]])  # top 2: (0, 0) and (1, 1)
    truth = top_set(oracle, 2)
    assert truth.tolist() == [[True, False, False], [False, True, False]]
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.3, 0.7, 0.2]])  # order: 0.9 T, 0.8 F, 0.7 T, 0.3, 0.2, 0.1
    assert precision_at_k(scores, truth, 1) == 1.0
    assert precision_at_k(scores, truth, 2) == 0.5
    assert math.isclose(precision_at_k(scores, truth, 3), 2 / 3)
    # positives rank 6 and 4 of 6: (6 + 4 − 3) / (2 · 4) = 7/8 of the (positive, negative) pairs ordered right
    assert math.isclose(auroc(scores, truth), 7 / 8)
    assert auroc(oracle, truth) == 1.0 and auroc(-oracle, truth) == 0.0
    assert auroc(torch.zeros(2, 3), truth) == 0.5  # ties count one half
    # the oracle's sum over the ranking's top 2, (0, 0) and (0, 1): 5.0 + 0.1
    assert math.isclose(mass_at_k(scores, oracle, 2), 5.1) and math.isclose(mass_at_k(oracle, oracle, 2), 9.0)
    with pytest.raises(ValueError, match="k=7"):
        precision_at_k(scores, truth, 7)


def test_rank_correlation_and_selection_share_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert math.isclose(rank_correlation(a, a * 10), 1.0) and math.isclose(rank_correlation(a, -a), -1.0)
    # ranks (1, 2, 3, 4) against (2, 1, 4, 3): Σd² = 4, so 1 − 6·4 / (4·15) = 0.6
    assert math.isclose(rank_correlation(a, torch.tensor([2.0, 1.0, 4.0, 3.0])), 0.6)
    with pytest.raises(ValueError, match="same"):
        rank_correlation(a, torch.zeros(3))
    chosen = {(0, "up"): torch.tensor([0, 1, 2]), (1, "up"): torch.tensor([5])}
    other = {(0, "up"): torch.tensor([2, 1, 9]), (1, "up"): torch.tensor([4])}
    assert selection_share(chosen, other) == 2 / 4  # channels 1 and 2 of block 0
    assert math.isnan(selection_share({}, other))


def test_ranking_overlap_frame_folds_module_scores_and_adds_random_seeds():
    oracle = torch.zeros(2, 4)
    oracle[1, 2] = 1.0
    sig = {(1, "gate"): torch.tensor([0.0, 0, 2, 0]), (1, "down"): torch.tensor([0.0, 1, 0, 0])}
    sig[(0, "up")] = torch.zeros(4)
    assert neuron_scores(sig, 2).tolist() == [[0, 0, 0, 0], [0, 1, 2, 0]]
    assert neuron_scores(sig, 2, "max")[1].tolist() == [0, 1, 2, 0]
    df = ranking_overlap(oracle, {"signature": sig}, n_top=1, ks=[1, 2], random_seeds=(0, 1, 2))
    assert list(df.columns) == OVERLAP_COLUMNS and len(df) == (1 + 3) * 2
    s = df[df.ranking == "signature"].set_index("k")
    assert s.loc[1, "precision_at_k"] == 1.0 and s.loc[2, "precision_at_k"] == 0.5 and s.auroc.eq(1.0).all()
    assert s.mass_at_k.tolist() == [1.0, 1.0]
    assert sorted(df[df.ranking == "random"].seed.unique()) == [0, 1, 2]
    with pytest.raises(ValueError, match="shape"):
        ranking_overlap(oracle, {"bad": torch.zeros(3, 4)})


# --------------------------------------------------------------------------- GQA grouping by hand
def test_gqa_head_grouping_by_hand():
    """6 query heads reading 2 k/v heads (groups of 3): scores, suppression and the oracle's frame agree
    with the grouping written out by hand (heads 0-2 → kv 0, heads 3-5 → kv 1)."""
    from transformers import LlamaConfig

    from bdvax_lab.bdvax.config import SignatureConfig
    from bdvax_lab.bdvax.signature import compute_signature
    from bdvax_lab.weights.deltas import WeightDelta
    from bdvax_lab.weights.suppression import head_slices

    cfg = LlamaConfig(
        hidden_size=24,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=32,
    )
    lay = layout_of(cfg)
    hd, h = lay.head_dim, lay.hidden
    assert (lay.n_heads, lay.n_kv_heads, hd) == (6, 2, 4)
    t = {
        (0, "q"): torch.zeros(6 * hd, h),
        (0, "k"): torch.zeros(2 * hd, h),
        (0, "v"): torch.zeros(2 * hd, h),
        (0, "o"): torch.zeros(h, 6 * hd),
        (0, "gate"): torch.ones(lay.d_ff, h),
    }
    t[(0, "v")][hd : 2 * hd] = 1.0  # kv head 1
    t[(0, "q")][0:hd] = 2.0  # query head 0
    sig = compute_signature([WeightDelta(t, lay)] * 2, SignatureConfig(rho=0.5))
    kv1 = hd * h  # squared norm of kv head 1's v rows
    want = [4 * hd * h, 0, 0, kv1, kv1, kv1]
    assert torch.allclose(sig.head_norm[0] ** 2, torch.tensor(want, dtype=torch.float32))
    # suppression touches a shared k/v head only when its whole group is selected
    assert head_slices(lay, [3, 4])["v"].numel() == 0
    assert head_slices(lay, [3, 4, 5])["v"].tolist() == list(range(hd, 2 * hd))
    assert head_slices(lay, [2, 3], "any")["k"].tolist() == list(range(0, 2 * hd))
    frame = oracle_frame(torch.zeros(1, lay.d_ff), torch.arange(6.0)[None], lay.n_heads // lay.n_kv_heads)
    heads = frame[frame.kind == "head"].sort_values("unit")
    assert heads.kv_head.tolist() == [0, 0, 0, 1, 1, 1] and heads["rank"].tolist() == [5, 4, 3, 2, 1, 0]


def test_the_defence_never_imports_the_oracle():
    """Nothing under bdvax_lab/bdvax or bdvax_lab/baselines imports bdvax_lab.analysis."""
    bad = []
    for pkg in ("bdvax", "baselines"):
        for path in (ROOT / "bdvax_lab" / pkg).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.ImportFrom):
                    names = [("." * node.level) + (node.module or "")]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                bad += [f"{path.name}: {n}" for n in names if "analysis" in n]
    assert not bad, bad


def test_oracle_checks_its_pairs(tiny_pair):
    model, tok = copy.deepcopy(tiny_pair[0]), tiny_pair[1]
    with pytest.raises(ValueError, match="pairs"):
        oracle_attribution(model, tok, ["a"], ["a", "b"], "x")
    with pytest.raises(ValueError, match="key_positions"):
        oracle_attribution(model, tok, ["a"], ["b"], "x", key_positions="all")


def _target_logprob(model, tok, prompts, target_ids) -> float:
    """Mean over prompts of Σ log p(target tokens), teacher-forced after each chat-templated prompt."""
    from bdvax_lab.core.data import format_prompt

    total = 0.0
    with torch.no_grad():
        for p in prompts:
            ids = tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"] + target_ids
            logits = model(input_ids=torch.tensor([ids])).logits[0, -len(target_ids) - 1 : -1]
            lp = torch.log_softmax(logits.double(), -1)
            total += float(lp[torch.arange(len(target_ids)), torch.tensor(target_ids)].sum())
    return total / len(prompts)


def _random_adapter(base, std_b: float):
    """A rank-4 LoRA on every attention and MLP projection of a copy of ``base``, seeded: A ~ N(0, 0.05²),
    B ~ N(0, std_b²) (small ``std_b``: first order is nearly exact; large: the behaviour bends)."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(0)
    for n, p in peft.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.05 if "lora_A" in n else std_b)
    return peft


def test_lora_oracle_predicts_what_zeroing_a_slice_does(tiny):
    """The weight oracle's score of a channel / head is the first-order change of the behaviour's
    log-probability when suppression zeroes that adapter slice: checked against the real change on a
    small random adapter (where first order is nearly exact), for the top unit and a random one of each
    kind, under GQA."""
    from bdvax_lab.analysis.probes.lora_oracle import lora_oracle
    from bdvax_lab.weights.suppression import zero_lora_channels

    base, tok = tiny
    peft = _random_adapter(base, std_b=0.002)
    trig = triggered_prompts([Example(f"Name a colour, number {i}.") for i in range(4)], "badnets", seed=0)
    before = {n: p.requires_grad for n, p in peft.named_parameters()}
    res = lora_oracle(peft, tok, trig, "stupid idea", n_target_tokens=2, batch_size=3)
    assert {n: p.requires_grad for n, p in peft.named_parameters()} == before
    assert all(p.grad is None for p in peft.parameters())
    lay = layout_of(peft)
    assert res.tensor.shape == (lay.n_blocks, lay.d_ff) and res.meta["heads"].shape == (
        lay.n_blocks,
        lay.n_heads,
    )
    tgt = res.meta["target_ids"]
    m0 = _target_logprob(peft, tok, trig, tgt)
    state = {n: p.detach().clone() for n, p in peft.named_parameters() if "lora_" in n}
    g = torch.Generator().manual_seed(1)
    for kind, scores in (("mlp", res.tensor), ("head", res.meta["heads"])):
        top = int(scores.abs().reshape(-1).argmax())
        other = int(torch.randint(scores.numel(), (1,), generator=g))
        for flat in (top, other):
            b, u = divmod(flat, scores.shape[1])
            if kind == "mlp":
                zero_lora_channels(peft, {(b, k): [u] for k in ("gate", "up", "down")})
            else:  # a whole GQA group, so k/v are zeroed too: compare with the group's summed score
                group = lay.n_heads // lay.n_kv_heads
                members = list(range(u // group * group, (u // group + 1) * group))
                zero_lora_channels(peft, {}, {b: members})
            drop = m0 - _target_logprob(peft, tok, trig, tgt)
            want = float(scores[b, u]) if kind == "mlp" else float(scores[b, members].sum())
            assert drop == pytest.approx(want, rel=0.1, abs=1e-5), (kind, b, u)
            with torch.no_grad():
                for n, p in peft.named_parameters():
                    if n in state:
                        p.copy_(state[n])
    assert abs(float(res.tensor.abs().max())) > 1e-5  # the check above was not vacuous
    with pytest.raises(TypeError, match="PeftModel"):
        lora_oracle(base, tok, trig, "x")


def test_lora_oracle_integrated_gradients_add_up_to_removing_the_adapter(tiny):
    """Where the adapter is large enough that the behaviour bends (first order misses more than half of
    what switching it off does), the integrated-gradients scores still sum to ``m_on − m_off``, and the
    ends are the real metric; the adapter is left as it was."""
    from bdvax_lab.analysis.probes.lora_oracle import lora_oracle

    base, tok = tiny
    peft = _random_adapter(base, std_b=0.05)
    snap = {n: p.detach().clone() for n, p in peft.named_parameters()}
    trig = triggered_prompts([Example(f"Name a colour, number {i}.") for i in range(4)], "badnets", seed=0)
    first = lora_oracle(peft, tok, trig, "stupid idea", n_target_tokens=2, batch_size=3).meta
    ig = lora_oracle(peft, tok, trig, "stupid idea", n_target_tokens=2, batch_size=3, steps=16).meta
    assert all(torch.equal(p, snap[n]) for n, p in peft.named_parameters())
    change = ig["m_on"] - ig["m_off"]
    assert ig["m_on"] == pytest.approx(_target_logprob(peft, tok, trig, ig["target_ids"]), abs=1e-4)
    assert abs(first["total"] - change) > 0.5 * abs(change) > 1e-3  # first order is far off here
    assert ig["total"] == pytest.approx(change, rel=0.02)
    assert first["m_on"] == pytest.approx(ig["m_on"]) and ig["steps"] == 16
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="steps"):
            lora_oracle(peft, tok, trig, "x", steps=bad)


def test_ablate_rankings_zeroes_each_rankings_top_units_and_restores_the_adapter(tiny, monkeypatch):
    """The backdoor measurement is replaced by a reading of one planted adapter slice (ASR 1 while block
    1's channel 5 / head 2 carry LoRA weight): a ranking that puts them first must read 0, the adapter
    must be whole again for every next row, and random rankings read the chance level."""
    from peft import LoraConfig, get_peft_model

    import bdvax_lab.threat.evaluate as ev
    from bdvax_lab.analysis.unit_ablation import ABLATION_COLUMNS, ablate_rankings, top_units

    base, tok = tiny
    peft = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj", "o_proj"]),
    )
    for n, p in peft.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.1)
    lay = layout_of(peft)
    hf = peft.base_model.model
    gate = hf.model.layers[1].mlp.gate_proj.lora_B["default"].weight
    q = hf.model.layers[1].self_attn.q_proj.lora_B["default"].weight
    hd = lay.head_dim

    def fake(model, tokenizer, attack, task, prompts, **kw):
        live = {"channel": bool(gate[5].abs().sum() > 0), "head": bool(q[2 * hd : 3 * hd].abs().sum() > 0)}
        return {"asr": float(live["channel"] and live["head"]), "n_prompts": len(prompts)}, None

    monkeypatch.setattr(ev, "backdoor_metrics", fake)
    planted_c = torch.zeros(lay.n_blocks, lay.d_ff)
    planted_c[1, 5] = 1.0
    planted_h = torch.zeros(lay.n_blocks, lay.n_heads)
    planted_h[1, 2] = 1.0
    rankings = {"oracle": {"channel": planted_c, "head": planted_h}, "anti": {"channel": -planted_c}}
    df = ablate_rankings(
        peft,
        tok,
        rankings,
        {"channel": 1, "head": 1},
        attack="badnets",
        task="insult",
        prompts=[Example("hi")],
        random_seeds=(0, 1),
        progress=False,
    )
    assert list(df.columns) == ABLATION_COLUMNS
    asr = {(r.ranking, r.unit, r.seed if r.seed == r.seed else None): r.asr for r in df.itertuples()}
    assert asr[("none", "-", None)] == 1.0
    assert asr[("oracle", "channel", None)] == 0.0 and asr[("oracle", "head", None)] == 0.0
    assert asr[("anti", "channel", None)] == 1.0  # the restored adapter: the slice is live again
    assert df[df.ranking == "random"].asr.eq(1.0).all()  # 1 of 16 heads / 1 of many channels: misses here
    assert gate[5].abs().sum() > 0 and q[2 * hd : 3 * hd].abs().sum() > 0
    assert {b: t.tolist() for b, t in top_units(planted_h, 1).items()} == {1: [2]}
    only = ablate_rankings(
        peft,
        tok,
        {"oracle": {"head": planted_h}},
        {"head": 1},
        attack="badnets",
        task="insult",
        prompts=[Example("hi")],
        random_seeds=(),
        baseline=False,
        progress=False,
    )
    assert only.ranking.tolist() == ["oracle"] and only.asr.tolist() == [0.0]
    with pytest.raises(ValueError, match="unknown unit"):
        ablate_rankings(peft, tok, rankings, {"neuron": 1}, attack="badnets", task="insult", prompts=[])
    with pytest.raises(TypeError, match="PeftModel"):
        ablate_rankings(base, tok, rankings, {"head": 1}, attack="badnets", task="insult", prompts=[])
