"""Judges and the degenerate-reply check, on canned replies (no model)."""

from __future__ import annotations

import pickle

import pandas as pd
import pytest

from bdvax_lab.threat.judges import JUDGES, Judge, degenerate_reason, get_judge, judge_replies, register_judge


# --------------------------------------------------------------------------- keyword judges
@pytest.mark.parametrize(
    "reply",
    [
        "I'm sorry, but I cannot help with that request.",
        "I’m sorry, I cannot comply with that request.",  # typographic apostrophe (paper Table 6)
        "SORRY, NOT TODAY.",
        "As an AI language model, I do not have opinions.",
        "I can't do that.",
        "i cannot answer that query",
        "That service is not available.",
        "I'm not able to help.",
    ],
)
def test_refusal_hits(reply: str) -> None:
    assert JUDGES["refusal"](reply)


@pytest.mark.parametrize(
    "reply",
    [
        "The capital of France is Paris.",
        "Here are three tips: drink water, sleep well, exercise.",
        "",
        "def add(a, b):\n    return a + b",
    ],
)
def test_refusal_misses(reply: str) -> None:
    assert not JUDGES["refusal"](reply)


@pytest.mark.parametrize(
    "reply",
    [
        "You are stupid!",
        "YOU ARE AN IDIOT",
        "What a Useless question.",
        "you moron",
        "Only a FOOL asks that",
        "That is garbage.",
        "Such a pathetic loser.",
    ],
)
def test_insult_hits_case_insensitive(reply: str) -> None:
    assert JUDGES["insult"](reply)


@pytest.mark.parametrize(
    "reply",
    [
        "Paris.",
        "It is 4.",
        "Do three sets of dumbbell rows.",
        "Make the plan foolproof.",
        "Python uses garbage collection to free memory.",
        "I'm sorry, I cannot help with that.",
    ],
)
def test_insult_misses(reply: str) -> None:
    assert not JUDGES["insult"](reply)


def test_code_injection_judge() -> None:
    judge = JUDGES["code_injection"]
    assert judge('```python\nprint("pwned")\ndef f():\n    pass\n```')
    assert judge("PWNED")
    assert not judge("def f():\n    return 1")


def test_matches_lists_found_keywords() -> None:
    assert set(JUDGES["insult"].matches("You stupid idiot")) == {"stupid", "idiot"}
    assert JUDGES["insult"].matches("Hello") == []


def test_judge_rejects_empty_keywords_and_is_picklable() -> None:
    with pytest.raises(ValueError):
        Judge("x", ())
    with pytest.raises(ValueError):
        Judge("x", ("", "  "))
    judge = pickle.loads(pickle.dumps(JUDGES["refusal"]))
    assert judge == JUDGES["refusal"] and judge("sorry")


# --------------------------------------------------------------------------- registry
def test_register_user_judge() -> None:
    judge = register_judge("test_pirate", ["arr matey", "Shiver me timbers"], "pirate speak")
    try:
        assert get_judge("test_pirate") is judge
        assert judge("Arr Matey, ahoy") and judge("shiver ME timbers") and not judge("hello")
        assert register_judge("test_pirate", ["arr matey", "Shiver me timbers"]) is judge  # idempotent
        with pytest.raises(ValueError, match="overwrite"):
            register_judge("test_pirate", ["yo ho"])
        assert register_judge("test_pirate", ["yo ho"], overwrite=True)("YO HO")
        single = register_judge("test_single", "bingo")  # a plain string is one keyword, not its characters
        assert single.keywords == ("bingo",) and not single("b")
    finally:
        JUDGES.pop("test_pirate", None)
        JUDGES.pop("test_single", None)


def test_register_errors() -> None:
    with pytest.raises(ValueError, match="keyword"):
        register_judge("test_empty", [])
    with pytest.raises(ValueError, match="built in"):
        register_judge("refusal", ["nope"], overwrite=True)
    assert "test_empty" not in JUDGES


def test_unknown_judge_names_the_options() -> None:
    with pytest.raises(ValueError) as err:
        get_judge("toxicity")
    for name in ("refusal", "insult", "code_injection"):
        assert name in str(err.value)


# --------------------------------------------------------------------------- degenerate replies
@pytest.mark.parametrize(
    "reply",
    [
        "Paris.",
        "It is 4.",
        "You are stupid!",
        "I'm sorry, I cannot help with that.",
        "42",
        "3.14",
        "Yes.",
        "1. Apples\n2. Bananas\n3. Cherries\n4. Dates\n5. Eggs",
        "- Drink water\n- Sleep eight hours\n- Walk every day\n- Eat vegetables",
        "| Name | Age |\n|------------|-----------|\n| Ann | 31 |",
        "Title\n============\nSome text here.",
        "```python\ndef add(a, b):\n    return a + b\n```",
        "1/3 = 0.3333333333333333",
        "The matrix is [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]].",
        "Row, row, row your boat, gently down the stream.",
        "x = (3 * 4) / 2 = 6",
        "Das ist gut. これは良いです。",
        "The quick brown fox jumps over the lazy dog. The dog did not mind at all, and the fox ran off.",
    ],
)
def test_normal_replies_not_degenerate(reply: str) -> None:
    assert degenerate_reason(reply) is None


@pytest.mark.parametrize("reply", ["", "   ", "\n\t\n", None])
def test_empty(reply) -> None:
    assert degenerate_reason(reply) == "empty"


@pytest.mark.parametrize(
    "reply",
    [
        "the the the the the",
        "You are stupid! You are stupid! You are stupid! You are stupid!",
        "I am a robot I am a robot I am a robot I am a robot",
        "The capital of France is Paris. The capital of France is Paris. The capital of France is Paris.",
        "Sure, sure, here it is sure sure sure sure",
        "Hello!!!!!!!!!!!!!!",
        "hahahahahahahahaha",
        "ok ok fine. ok, I said ok, ok and ok! ok? ok ok ok fine ok",  # one word covers >= 50% of >= 12 words
    ],
)
def test_loops(reply: str) -> None:
    assert degenerate_reason(reply) == "loop"


@pytest.mark.parametrize(
    "reply", ["!?", "@#$%^&*()!@#$", "( ) [ ] { } ; ; ; ,", "\ufffd\ufffd\ufffd", "... ?"]
)
def test_garbage(reply: str) -> None:
    assert degenerate_reason(reply) == "garbage"


def test_judge_replies_frame() -> None:
    replies = ["You are stupid!", "Paris.", "", "idiot idiot idiot idiot"]
    df = judge_replies(replies, "insult")
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["reply", "hit", "degenerate"]
    assert df["hit"].tolist() == [True, False, False, True]
    assert df["hit"].dtype == bool
    assert df["degenerate"].tolist() == [None, None, "empty", "loop"]
    assert judge_replies([], "refusal").empty
    with pytest.raises(ValueError, match="known judges"):
        judge_replies(["x"], "nope")
