import copy
from pathlib import Path

import pytest

from bdvax_lab import (
    AttackRecipe,
    EvalConfig,
    TrainConfig,
    load_suspicious,
    make_suspicious_model,
    open_or_make_suspicious,
)
from bdvax_lab.threat.suspicious import attack_dataset


def _recipe(setting="lora", task="refusal", attack="badnets"):
    mode = "lora" if setting == "lora" else "full"
    return AttackRecipe(
        attack=attack,
        task=task,
        setting=setting,
        skill=None,  # the backdoor-only finetune; skill-bearing sets: tests/test_skills.py
        n_samples=24,
        train=TrainConfig(mode=mode, steps=3, lr=1e-3),
        eval=EvalConfig(n_prompts=3, max_new_tokens=3, utility=()),
    )


@pytest.mark.parametrize(
    "attack,task", [("badnets", "refusal"), ("ctba", "sentiment"), ("badnets_ci", "code_injection")]
)
def test_attack_dataset_rates(attack, task):
    data = attack_dataset(_recipe(attack=attack, task=task))
    n_p = sum(e.meta["poisoned"] for e in data)
    assert n_p >= 1
    assert all(e.meta.get("split") == "attack" for e in data)


@pytest.mark.parametrize("setting", ["lora", "full"])
def test_make_and_load_suspicious(tiny_pair, tmp_path, setting):
    model, tok = tiny_pair
    sm = make_suspicious_model(
        recipe=_recipe(setting), base=(copy.deepcopy(model), tok), out=tmp_path / "s", progress=False
    )
    m = sm.manifest
    for key in ("attack", "task", "data_hash", "recipe", "eval", "wall_seconds", "train_seconds"):
        assert key in m
    assert m["attack"]["keys"] == ["BadMagic"]
    assert (tmp_path / "s" / "manifest.json").exists() and (tmp_path / "s" / "train_data.jsonl").exists()
    assert (tmp_path / "s" / ("adapter" if setting == "lora" else "model")).is_dir()
    if setting == "full":  # the LoRA case would attach the adapter to the default model
        back = load_suspicious(tmp_path / "s")
        assert back.setting == "full"
        sd = back.model.state_dict()
        for k, v in sm.model.state_dict().items():
            assert (sd[k] == v).all()


def test_same_seed_same_data():
    a = attack_dataset(_recipe())
    b = attack_dataset(_recipe())
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]


def test_load_suspicious_missing(tmp_path):
    from bdvax_lab.core.models import ModelDirError

    with pytest.raises(ModelDirError, match="not found"):
        load_suspicious(tmp_path / "none")


def test_an_artifact_of_another_budget_is_not_reused_silently(tiny_pair, tmp_path):
    model, tok = tiny_pair
    open_or_make_suspicious(tmp_path / "s", base=(model, tok), steps=2, n_prompts=2)
    assert (
        open_or_make_suspicious(tmp_path / "s", base=(model, tok), steps=2).manifest["recipe"]["train"][
            "steps"
        ]
        == 2
    )
    open_or_make_suspicious(tmp_path / "s", base=(model, tok))  # steps=None: whatever is there
    with pytest.raises(ValueError, match="trained for 2 steps, not the 3"):
        open_or_make_suspicious(tmp_path / "s", base=(model, tok), steps=3)


def test_suspicious_dir_gives_another_budget_its_own_directory(tmp_path):
    from bdvax_lab.threat.suspicious import suspicious_dir

    assert (
        suspicious_dir(tmp_path, "vpi", "sentiment", "lora")
        == tmp_path / "attack_matrix" / "vpi-sentiment-lora"
    )
    full60 = Path("runs/attack_matrix/badnets-refusal-full-steps60")
    assert suspicious_dir("runs", "badnets", "refusal", "full", 60) == full60
    assert suspicious_dir(tmp_path, "badnets", "refusal", steps=0).name == "badnets-refusal-lora-steps0"
