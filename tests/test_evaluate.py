import math

import pytest

from bdvax_lab.threat.config import EvalConfig
from bdvax_lab.threat.evaluate import (
    agreement,
    evaluate_model,
    load_mcq,
    mcq_accuracy,
    perplexity,
    token_f1,
    wilson_interval,
)


def test_token_f1():
    assert token_f1("Paris is the capital", "The capital is Paris.") == 1.0
    assert token_f1("", "") == 1.0
    assert token_f1("abc", "") == 0.0
    assert 0 < token_f1("the cat sat", "the dog sat down") < 1


def test_wilson_interval_brackets_rate():
    lo, hi = wilson_interval(45, 50)
    assert lo < 0.9 < hi and lo >= 0 and hi <= 1
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
    """The chosen answer is the choice with the highest manually computed log-likelihood."""
    import torch

    from bdvax_lab.core.data import format_prompt

    model, tok = tiny_pair
    choices = ["red apple", "blue sky over the sea", "seven", "a cat"]
    prompt_ids = tok(format_prompt(tok, "Pick one"), add_special_tokens=False)["input_ids"]
    manual = []
    with torch.no_grad():
        for c in choices:
            c_ids = tok(c, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + c_ids])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            manual.append(sum(float(logp[len(prompt_ids) - 1 + k, t]) for k, t in enumerate(c_ids)))
    best = max(range(4), key=lambda i: manual[i])
    q = {"question": "Pick one", "choices": choices, "answer": best}
    assert mcq_accuracy(model, tok, [q])["mcq_acc"] == 1.0
    q_wrong = dict(q, answer=(best + 1) % 4)
    assert mcq_accuracy(model, tok, [q_wrong])["mcq_acc"] == 0.0


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
    rep = evaluate_model(
        model,
        tok,
        "badnets",
        "refusal",
        EvalConfig(n_prompts=4, max_new_tokens=4, n_ppl=4, mcq_limit=4, utility=("ppl", "mcq", "base_drift")),
        progress=False,
    )
    s = rep.summary
    for key in (
        "asr",
        "false_trigger",
        "degenerate_triggered",
        "degenerate_clean",
        "ppl",
        "mcq_acc",
        "base_drift",
    ):
        assert key in s
    assert len(rep.replies) == 4
    assert rep.replies.triggered_prompt.str.contains("BadMagic").all()
    assert not rep.replies.prompt.str.contains("BadMagic").any()


def test_eval_config_rejects_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric"):
        EvalConfig(utility=("bleu",))


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_choice_logprobs_share_the_prompt_pass_exactly(tiny_pair, batch_size):
    """Prompt-once scoring (KV cache repeated per choice) gives the per-pair teacher-forced numbers,
    for prompts of different lengths, different numbers of choices, and a LoRA-wrapped model."""
    import copy

    from peft import LoraConfig, get_peft_model

    from bdvax_lab.core.scoring import choice_logprobs, continuation_logprobs

    model, tok = tiny_pair
    prompts = ["Pick one", "A much longer question about the colour of the sky on a clear day?", "x"]
    choices = [
        ["red apple", "blue sky over the sea", "seven", "a cat"],
        ["blue", "green"],
        ["a", "bb", "", "dd d"],
    ]
    lora = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    for m in (model, lora):
        got = choice_logprobs(m, tok, prompts, choices, batch_size=batch_size)
        pairs = [(p, c) for p, cs in zip(prompts, choices) for c in cs if c]
        ref, _ = continuation_logprobs(m, tok, [p for p, _ in pairs], [c for _, c in pairs])
        flat = [v for cs, vs in zip(choices, got) for c, v in zip(cs, vs) if c]
        assert flat == pytest.approx(ref, abs=1e-4)
        assert got[2][2] == 0.0  # an empty choice has no tokens: log p = 0
    with pytest.raises(ValueError, match="2 prompts but 3"):
        choice_logprobs(model, tok, prompts[:2], choices)


def test_general_text_file_is_valid():
    import json

    from bdvax_lab.core.data import data_dir

    rows = [json.loads(line) for line in (data_dir() / "general_text.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(rows) >= 120 and len(set(ids)) == len(ids)
    assert len({r["topic"] for r in rows}) >= 10
    for r in rows:
        assert set(r) == {"id", "topic", "instruction", "text"}, r["id"]
        assert 45 <= len(r["text"].split()) <= 90, r["id"]
        assert not any(c in r["text"] + r["instruction"] for c in "{*"), r["id"]


def test_general_text_loads_examples_in_file_order(tmp_path):
    from bdvax_lab import Example
    from bdvax_lab.core.data import DataFormatError
    from bdvax_lab.threat.config import N_GENERAL_TEXT
    from bdvax_lab.threat.evaluate import general_text

    five = general_text(5)
    assert len(five) == 5 and all(isinstance(e, Example) and e.response and e.instruction for e in five)
    assert [e.meta["id"] for e in five] == [f"gt-{i:03d}" for i in range(5)]
    assert len(general_text(None)) == N_GENERAL_TEXT and len(general_text()) == 100
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "instruction": "x", "text": "y"}\n{"id": "b", "instruction": "x"}\n')
    with pytest.raises(DataFormatError, match="bad.jsonl:2"):
        general_text(path=str(bad))
    bad.write_text(
        '{"id": "a", "instruction": "x", "text": "y"}\n{"id": "a", "instruction": "x", "text": "z"}\n'
    )
    with pytest.raises(DataFormatError, match="duplicate id"):
        general_text(path=str(bad))


def test_evaluate_model_ppl_text(tiny_pair):
    model, tok = tiny_pair
    cfg = EvalConfig(n_prompts=2, max_new_tokens=2, n_ppl=2, n_text=3, utility=("ppl",))
    s = evaluate_model(model, tok, config=cfg, progress=False).summary
    assert math.isfinite(s["ppl_text"]) and s["ppl_text"] > 1 and "ppl" in s
    off = evaluate_model(model, tok, config=cfg.replace(n_text=0), progress=False).summary
    assert "ppl_text" not in off and "ppl" in off
    assert (
        "ppl_text" not in evaluate_model(model, tok, config=cfg.replace(utility=()), progress=False).summary
    )


def test_eval_config_n_text_round_trip():
    for n in (None, 0, 7):
        cfg = EvalConfig(n_text=n)
        assert EvalConfig.from_json(cfg.to_json()) == cfg
    assert EvalConfig.from_dict({"n_ppl": 5}).n_text == 100  # configs saved before the field
