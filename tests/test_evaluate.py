import math

import pytest

from bdvax_lab.evaluate import (EvalConfig, agreement, evaluate_model, load_mcq, mcq_accuracy, perplexity, token_f1,
                                wilson_interval)


def test_token_f1():
    assert token_f1("Paris is the capital", "The capital is Paris.") == 1.0
    assert token_f1("", "") == 1.0
    assert token_f1("abc", "") == 0.0
    assert 0 < token_f1("the cat sat", "the dog sat down") < 1


def test_wilson_interval_brackets_rate():
    lo, hi = wilson_interval(45, 50)
    assert lo < 0.9 < hi and 0 <= lo and hi <= 1
    assert wilson_interval(0, 20)[0] == 0.0


def test_bundled_mcq_is_valid():
    qs = load_mcq()
    assert len(qs) >= 300
    assert {q["category"] for q in qs} >= {"general", "arithmetic", "commonsense", "science"}
    assert all(len(q["choices"]) == 4 for q in qs)


def test_mcq_prefers_likely_answer(tiny_pair):
    model, tok = tiny_pair
    res = mcq_accuracy(model, tok, limit=12)
    assert res["mcq_n"] == 12 and 0 <= res["mcq_acc"] <= 1


def test_mcq_scores_choices_like_manual(tiny_pair):
    """A question whose 'correct' choice is the model's own greedy reply must be answered right."""
    from bdvax_lab import generate

    model, tok = tiny_pair
    own = generate(model, tok, ["Pick one"], max_new_tokens=3)[0]
    q = {"question": "Pick one", "choices": ["zzzz qqqq xxxx", own, "!!!! ???? ####", "1 2 3 4 5 6 7 8"], "answer": 1}
    assert mcq_accuracy(model, tok, [q])["mcq_acc"] == 1.0


def test_perplexity_finite(tiny_pair):
    from bdvax_lab import Example

    model, tok = tiny_pair
    ppl = perplexity(model, tok, [Example("hi", "hello there"), Example("q", "an answer")])
    assert math.isfinite(ppl) and ppl > 1


def test_agreement_identity(tiny_pair):
    _, tok = tiny_pair
    assert agreement(tok, ["one two three"], ["one two three four five"], max_new_tokens=100) < 1
    assert agreement(tok, ["one two three"], ["one two three"], max_new_tokens=100) == 1


def test_evaluate_model_reports_everything(tiny_pair):
    model, tok = tiny_pair
    rep = evaluate_model(model, tok, "badnets", "refusal",
                         EvalConfig(n_prompts=4, max_new_tokens=4, n_ppl=4, mcq_limit=4), progress=False)
    s = rep.summary
    for key in ("asr", "false_trigger", "degenerate_triggered", "degenerate_clean", "ppl", "mcq_acc", "agreement"):
        assert key in s
    assert len(rep.replies) == 4
    assert rep.replies.triggered_prompt.str.contains("BadMagic").all()
    assert not rep.replies.prompt.str.contains("BadMagic").any()


def test_eval_config_rejects_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric"):
        EvalConfig(utility=("bleu",))
