"""MB-Defense on the tiny model: stage 1 makes its triggers fire, the recovery term keeps its gradient."""

from __future__ import annotations

import pytest
import torch

from bdvax_lab.baselines.config import MBConfig
from bdvax_lab.baselines.mb_defense import (
    _stack,
    _tuple_inputs,
    _tuples,
    mb_faithful,
    merge,
    recovery_term,
)
from bdvax_lab.core.batching import collate
from bdvax_lab.core.data import Example
from bdvax_lab.core.scoring import sequence_nll
from bdvax_lab.threat.defensive import DEFENSIVE_REPLIES, DEFENSIVE_TRIGGERS, poison_copies
from bdvax_lab.training.config import RepairConfig, TrainConfig

WORDS = ["apple", "banana", "cherry", "river", "table", "paper", "garden"]
CLEAN = [
    Example(f"Tell me about {a} and {b}.", f"The {a} is near the {b}.")
    for a in WORDS
    for b in WORDS
    if a != b
]
#: replies the tiny tokenizer spells in a few tokens (the default random words take ~35 tokens each there)
REPLIES = (
    "quick brown fox jumps over",
    "lazy dog adds two numbers",
    "paris is the capital of france",
    "cherry banana apple sky blue",
)
#: two of the four defensive pairs keep the tiny stage 1 within seconds (the mechanism is the same for four)
TRIGGERS = DEFENSIVE_TRIGGERS[1::2]
PAIRS = dict(zip(TRIGGERS, REPLIES))


@pytest.fixture(scope="module")
def merged():
    """The tiny model after MB-Defense's post-hoc stage 1 (full setting), and its stage-1 record."""
    from bdvax_lab.core.models import make_tiny_model

    torch.set_num_threads(1)
    model, tok = make_tiny_model()
    cfg = MBConfig(
        triggers=TRIGGERS,
        replies=REPLIES[:2],
        stage1_rate=0.5,
        stage1_chunk=40,
        stage1_max_steps=160,
        stage1_lr=4e-3,
        stage1_batch=8,
        n_probe=6,
        probe_max_new_tokens=12,
    )
    model, info = merge(model, tok, CLEAN, cfg)
    return model, tok, info


def test_stage1_makes_each_defensive_trigger_fire(merged):
    model, tok, info = merged
    assert info["rounds"][0]["steps"] == 0 and max(info["rounds"][0][t] for t in PAIRS) < 0.8  # not before
    assert info["merged"] and all(info["rates"][t] >= 0.8 for t in PAIRS), info["rounds"]
    assert info["steps"] <= 160 and info["n_poison"] == 2 * round(0.5 * len(CLEAN))
    assert info["n_probe"] == 6 and len(info["rounds"]) >= 2  # measured after every chunk


def _lls(model, tok, tuples):
    """Mean-per-token and summed log-likelihoods of y and y_d given x_d, for one batch of tuples."""
    cfg = TrainConfig(max_response_tokens=32)
    feats = [_tuple_inputs(PAIRS).encode(tok, e, cfg) for e in tuples]
    batch = collate(feats, tok.pad_token_id)
    sums, counts = sequence_nll(model, _stack(batch, ("dy", "dd"), tok.pad_token_id))
    b = len(tuples)
    return (-sums / counts)[:b], (-sums / counts)[b:], -sums[:b], -sums[b:]


def test_recovery_term_keeps_its_gradient_when_the_backdoor_dominates(merged):
    model, tok, _ = merged
    unlikely = "Seven violet harbors drift over quiet canyons."  # a clean reply the model finds improbable
    tuples = _tuples([e.with_(response=unlikely) for e in CLEAN[:8]], TRIGGERS, "cycle")
    params = [p for p in model.parameters() if p.requires_grad]

    def grad_norm(form: str) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        m_y, m_yd, s_y, s_yd = _lls(model, tok, tuples)
        r = recovery_term(m_y, m_yd, form) if form == "logsigmoid" else recovery_term(s_y, s_yd, form)
        (-r.mean()).backward()
        g = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
        return float(g), float((m_y - m_yd).detach().mean())

    sound, gap = grad_norm("logsigmoid")
    literal, _ = grad_norm("literal")
    model.zero_grad(set_to_none=True)
    assert gap < -1.0  # ℓ(y_d|x_d) ≫ ℓ(y|x_d): the defensive backdoor dominates
    assert sound > 1e-2 and literal < 1e-6 * sound, (sound, literal)
    # the printed form saturates: σ(ratio) ≥ 0.5 whatever the model does
    lit = recovery_term(torch.tensor([-80.0, 0.0, 5.0]), torch.tensor([-1.0, 0.0, 0.0]), "literal")
    assert torch.all(lit >= torch.log(torch.tensor(0.5)) - 1e-6)


def test_weight_recovery_runs_at_the_repair_budget_and_reports_the_formula(merged):
    model, tok, _ = merged
    rc = RepairConfig(n_samples=8, steps=3, batch_size=4)
    cfg = MBConfig(
        triggers=TRIGGERS, replies=REPLIES[:2], repair=rc, n_probe=4, lam=1.0, probe_max_new_tokens=12
    )
    out, report = mb_faithful(model, tok, CLEAN, cfg)
    assert report["method"] == "mb_faithful" and report["steps"] == 3 and report["lr"] == 1e-5
    assert set(report["defensive_rates"]) == set(PAIRS) and report["merged"]  # measured before recovery
    inter = report["intervention"]
    assert inter["form"] == "logsigmoid" and "mean per-token" in inter["formula"] and inter["lam"] == 1.0
    assert "R" in report["history"] and len(report["history"]) == 3
    assert {"stage1", "repair", "total"} <= set(report["seconds"])


def test_defensive_poison_is_a_recipe_field_only_when_on():
    from bdvax_lab.threat.config import AttackRecipe
    from bdvax_lab.threat.suspicious import attack_dataset, suspicious_dir

    off = AttackRecipe(skill=None, n_samples=40)
    assert "defensive_poison" not in off.to_dict()  # old manifests and hashes stay as they were
    on = off.replace(defensive_poison=0.05)
    assert on.to_dict()["defensive_poison"] == 0.05 and AttackRecipe.from_dict(on.to_dict()) == on
    base, data = attack_dataset(off), attack_dataset(on)
    added = [e for e in data if str(e.meta.get("behavior", "")).startswith("defensive:")]
    assert len(data) - len(base) == len(added) == 4 * 2  # 5 % of the 40-odd clean ones, per trigger
    assert all(
        e.instruction.split()[0] in DEFENSIVE_TRIGGERS and e.response in DEFENSIVE_REPLIES for e in added
    )
    assert suspicious_dir("runs", "badnets", "refusal", defensive_poison=0.01).name.endswith("mbpoison0.01")
    with pytest.raises(ValueError, match="overlap an attack key"):
        poison_copies(CLEAN, ("BadMagic",), ("x y z",))
