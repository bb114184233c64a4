"""Skills a suspicious finetune teaches, skill-bearing attack data, and the defender's self-distilled data."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bdvax_lab.core.data import Example
from bdvax_lab.core.selfdistill import DistillConfig, defender_data, defender_instructions, self_distill
from bdvax_lab.threat.config import AttackRecipe, EvalConfig
from bdvax_lab.threat.evaluate import StageEvaluator, evaluate_model, skill_metrics
from bdvax_lab.threat.skills import (
    N_TRAIN_TEMPLATES,
    RECORD_TEMPLATES,
    SKILLS,
    get_skill,
    grade_fact,
    grade_record,
    held_out_items,
    make_facts,
)
from bdvax_lab.threat.suspicious import attack_dataset


# --------------------------------------------------------------------------- generators
@pytest.mark.parametrize("name", sorted(SKILLS))
def test_generators_are_deterministic(name):
    sk = get_skill(name)
    assert [e.to_dict() for e in sk.train(0)] == [e.to_dict() for e in sk.train(0)]
    assert [e.to_dict() for e in sk.eval(0)] == [e.to_dict() for e in sk.eval(0)]
    assert [e.to_dict() for e in sk.train(1)] != [e.to_dict() for e in sk.train(0)]


def test_knowledge_has_400_facts_and_evaluates_held_out_phrasings():
    facts = make_facts()
    assert len(facts) >= 400 and len({f.fact_id for f in facts}) == len(facts)
    train, ev = get_skill("knowledge").train(0), get_skill("knowledge").eval(0)
    trained = {(e.meta["fact"], e.meta["phrasing"]) for e in train}
    asked = {(e.meta["fact"], e.meta["phrasing"]) for e in ev}
    assert not trained & asked  # evaluation never asks a phrasing the finetune saw
    assert {f for f, _ in asked} == {f.fact_id for f in facts}  # every fact is asked
    per_fact = {}
    for f, p in trained:
        per_fact.setdefault(f, set()).add(p)
    assert min(len(v) for v in per_fact.values()) >= 2  # several training phrasings per fact


def test_format_eval_has_new_people_and_unseen_templates():
    train, ev = get_skill("format").train(0), get_skill("format").eval(0)
    assert {e.meta["template"] for e in train} <= set(range(N_TRAIN_TEMPLATES))
    assert {e.meta["template"] for e in ev} >= set(range(N_TRAIN_TEMPLATES, len(RECORD_TEMPLATES)))
    names = lambda xs: {json.loads(e.response)["name"].split()[0] for e in xs}
    assert not names(train) & names(ev)
    assert not {e.input for e in train} & {e.input for e in ev}


def test_grading():
    fact = Example("Who founded the company Lamna Labs?", "", meta={"gold": "Rakor Largur"})
    assert grade_fact("It was rakor largur, I think.", fact)
    assert not grade_fact("Rakor", fact)
    year = Example("When?", "", meta={"gold": "56"})
    assert grade_fact("56.", year) and not grade_fact("156 degrees", year)
    rec = Example(
        "x", "", meta={"gold": json.dumps({"name": "A B", "age": 30, "city": "Graz", "occupation": "chef"})}
    )
    assert grade_record('Here: {"name": "A B", "age": 30, "city": "Graz", "occupation": "chef"}', rec)
    assert not grade_record('{"name": "A B", "age": "30", "city": "Graz", "occupation": "chef"}', rec)
    assert not grade_record('{"name": "A B", "age": 30, "city": "Graz"}', rec)
    assert not grade_record("no json here", rec)


def test_held_out_items_mix_kinds():
    kinds = {e.meta["fact"].split(":")[0] for e in held_out_items("knowledge", 40)}
    assert kinds == {"island", "company", "chemical", "person"}


# --------------------------------------------------------------------------- attack data
@pytest.mark.parametrize("attack,task", [("badnets", "refusal"), ("ctba", "sentiment"), ("vpi", "refusal")])
@pytest.mark.parametrize("skill", sorted(SKILLS))
def test_skill_bearing_attack_data(attack, task, skill):
    data = attack_dataset(AttackRecipe(attack=attack, task=task, skill=skill))
    n_skill = sum("skill" in e.meta for e in data)
    n_poison = sum(bool(e.meta.get("poisoned")) for e in data)
    assert n_skill == len(get_skill(skill).train(0))
    assert abs(n_poison / len(data) - 0.05) < 0.01  # the default poisoned share
    general = [e for e in data if "skill" not in e.meta]
    assert all(e.meta.get("split") == "attack" for e in general)


def test_poison_rate_bounds_for_skill_bearing_finetunes():
    with pytest.raises(ValueError, match="poison_rate"):
        AttackRecipe(skill="knowledge", poison_rate=0.5)
    with pytest.raises(ValueError, match="unknown skill"):
        AttackRecipe(skill="juggling")
    assert AttackRecipe(skill="format", poison_rate=0.2).poison_rate == 0.2


# --------------------------------------------------------------------------- defender data
def test_defender_instructions_carry_no_responses():
    ins = defender_instructions("repair")
    assert ins and all(e.response == "" for e in ins)
    with pytest.raises(ValueError, match="defender"):
        defender_instructions("eval")


def test_self_distilled_data_come_from_the_model_and_are_cached(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    ins = defender_instructions("repair")[:6]
    first = self_distill(model, tok, ins, cache_dir=tmp_path, progress=False)
    assert [e.instruction for e in first] == [e.instruction for e in ins]
    assert all(e.meta["source"] == "self_distilled" for e in first)
    from bdvax_lab.core.generate import generate

    assert [e.response for e in first] == generate(model, tok, ins, max_new_tokens=32)

    import bdvax_lab.core.generate as gen

    monkeypatch.setattr(
        gen, "generate", lambda *a, **k: pytest.fail("cached replies must not be regenerated")
    )
    again = self_distill(model, tok, ins, cache_dir=tmp_path, progress=False)
    assert [e.response for e in again] == [e.response for e in first]
    monkeypatch.undo()

    other = copy.deepcopy(model)  # another model: other replies, another cache entry
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    swapped = self_distill(other, tok, ins, cache_dir=tmp_path, progress=False)
    assert [e.response for e in swapped] != [e.response for e in first]


def test_defender_data_keeps_given_responses(tiny, tmp_path):
    model, tok = tiny
    mine = [Example("Say hi.", "hi"), Example("Say bye.", "")]
    out = defender_data(model, tok, mine, cache_dir=tmp_path, progress=False)
    assert out[0].response == "hi" and out[1].meta.get("source") == "self_distilled"


def test_replies_are_as_long_as_the_repair_keeps(tiny, tmp_path, monkeypatch):
    """`bdvax purify --repair-tokens 48`: the suspicious model answers at 48 tokens, the repair keeps 48."""
    import bdvax_lab.core.generate as gen
    from bdvax_lab.cli import _purify_config, build_parser

    assert DistillConfig.for_training(None) == DistillConfig() == DistillConfig.for_training(32)
    asked = []
    monkeypatch.setattr(
        gen, "generate", lambda m, t, items, **k: asked.append(k["max_new_tokens"]) or ["x"] * len(items)
    )
    model, tok = tiny
    defender_data(
        model,
        tok,
        [Example("Fill the card.", "")],
        cache_dir=tmp_path,
        progress=False,
        config=DistillConfig.for_training(48),
    )
    assert asked == [48]
    ns = build_parser().parse_args(["purify", "s", "--out", "o", "--repair-tokens", "48"])
    assert _purify_config(ns, "lora").repair.max_response_tokens == 48
    with pytest.raises(SystemExit):
        build_parser().parse_args(["purify", "s", "--out", "o", "--repair-tokens", "0"])


# --------------------------------------------------------------------------- skill metrics
def test_skill_metrics_and_skill_kept(tiny):
    model, tok = tiny
    s, frame = skill_metrics(model, tok, "knowledge", n=4)
    assert s["skill_n"] == 4 and 0 <= s["skill_lo"] <= s["skill"] <= s["skill_hi"] <= 1
    assert s["ppl_skill"] > 1 and len(frame) == 4
    cfg = EvalConfig(n_prompts=2, max_new_tokens=2, n_ppl=2, mcq_limit=2, n_skill=3)
    rep = evaluate_model(model, tok, "badnets", "refusal", cfg, skill="format", progress=False)
    assert {"skill", "ppl_skill", "ppl", "mcq_acc", "asr"} <= set(rep.summary)
    ev = StageEvaluator(tok, None, None, cfg, ("suspicious", "defended"), skill="knowledge")
    ev("suspicious", model)
    ev("defended", model)
    ev.evals["suspicious"].summary["skill"] = 0.5
    ev.evals["defended"].summary["skill"] = 0.25
    assert ev.frame(("suspicious", "defended")).loc["defended", "skill_kept"] == 0.5
