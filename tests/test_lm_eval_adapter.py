"""The optional lm-evaluation-harness adapter, on the tiny model.

The wiring is tested; no harness or datasets needed.
"""

from __future__ import annotations

import abc
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from bdvax_lab.core.data import format_prompt
from bdvax_lab.core.generate import generate
from bdvax_lab.core.scoring import continuation_logprobs
from bdvax_lab.threat.lm_eval_adapter import BdvaxLM, register

PAIRS = [
    ("what is the capital of france ?", "paris is the capital ."),
    ("hi", "i am sorry , i cannot help with that ."),
    ("list three fruits :", "apple , banana , cherry"),
]


class Req:
    """What the harness passes: an object whose ``.args`` holds the request arguments."""

    def __init__(self, *args):
        self.args = args


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def manual_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, by one plain full-logits forward pass."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_loglikelihood_chat_matches_continuation_logprobs(tiny_pair):
    model, tok = tiny_pair
    lm = BdvaxLM(model, tok, batch_size=2)  # 3 requests: two batches, length-sorted internally
    out = lm.loglikelihood([Req(c, x) for c, x in PAIRS])
    ref, _ = continuation_logprobs(model, tok, [c for c, _ in PAIRS], [x for _, x in PAIRS])
    assert len(out) == len(PAIRS)
    for (lp, greedy), want in zip(out, ref):
        assert isinstance(lp, float) and isinstance(greedy, bool)
        assert lp <= 0
        assert lp == pytest.approx(want, abs=1e-4)


def test_loglikelihood_raw_matches_manual_forward(tiny_pair):
    model, tok = tiny_pair
    lm = BdvaxLM(model, tok, chat_template=False)
    out = lm.loglikelihood(
        [Req(c, " " + x) for c, x in PAIRS] + [("", "the quick brown fox")]
    )  # bare tuples too
    for (lp, _), (c, x) in zip(out, PAIRS):
        ctx, cont = ids_of(tok, c), ids_of(tok, " " + x)
        assert lp == pytest.approx(float(manual_logprobs(model, ctx + cont)[-len(cont) :].sum()), abs=1e-4)
    cont = ids_of(tok, "the quick brown fox")  # empty context: conditioned on BOS (else EOS)
    assert out[-1][0] == pytest.approx(
        float(manual_logprobs(model, [tok.bos_token_id] + cont).sum()), abs=1e-4
    )


def test_chat_and_raw_differ_and_whitespace_handling(tiny_pair):
    model, tok = tiny_pair
    chat, raw = BdvaxLM(model, tok), BdvaxLM(model, tok, chat_template=False)
    c, x = PAIRS[0]
    assert abs(chat.loglikelihood([Req(c, x)])[0][0] - raw.loglikelihood([Req(c, x)])[0][0]) > 1e-3
    # chat: the harness's " " target delimiter is dropped (a reply never starts with it)
    assert chat.loglikelihood([Req(c, " " + x)])[0][0] == pytest.approx(
        chat.loglikelihood([Req(c, x)])[0][0], abs=1e-6
    )
    # raw: trailing context whitespace moves to the continuation, as in the harness
    a, b = raw.loglikelihood([Req(c + " ", x), Req(c, " " + x)])
    assert a[0] == pytest.approx(b[0], abs=1e-6)


def test_is_greedy_raw(tiny_pair):
    model, tok = tiny_pair
    lm = BdvaxLM(model, tok, chat_template=False)
    ctx = ids_of(tok, "the quick brown fox")
    greedy_ids = []
    with torch.no_grad():
        for _ in range(3):
            greedy_ids.append(int(model(input_ids=torch.tensor([ctx + greedy_ids])).logits[0, -1].argmax()))
    cont = tok.decode(greedy_ids)
    assert ids_of(tok, cont) == greedy_ids  # the continuation re-tokenizes to the greedy tokens
    other = next(
        t
        for t in range(len(tok))
        if t != greedy_ids[-1] and ids_of(tok, tok.decode(greedy_ids[:-1] + [t])) == greedy_ids[:-1] + [t]
    )
    (lp, g), (_, g2) = lm.loglikelihood(
        [Req("the quick brown fox", cont), Req("the quick brown fox", tok.decode(greedy_ids[:-1] + [other]))]
    )
    assert g is True and g2 is False and lp <= 0


def test_is_greedy_chat(tiny):
    model, tok = tiny
    # the random tiny model's greedy reply is an undecodable byte token; steer it to a known word instead
    target = next(w for w in ("paris", "apple", "the") if len(ids_of(tok, w)) == 1)
    tid = ids_of(tok, target)[0]

    def boost(_module, _inputs, out):
        out = out.clone()
        out[..., tid] += 100.0
        return out

    model.get_output_embeddings().register_forward_hook(boost)
    lm = BdvaxLM(model, tok)
    prompt = ids_of(tok, format_prompt(tok, "hi"))
    with torch.no_grad():
        assert int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax()) == tid
    (lp, g), (_, g2) = lm.loglikelihood([Req("hi", target), Req("hi", "banana")])
    assert g is True and g2 is False
    assert lp == pytest.approx(continuation_logprobs(model, tok, ["hi"], [target])[0][0], abs=1e-4)


def test_loglikelihood_rolling_matches_manual_sum(tiny_pair):
    model, tok = tiny_pair
    text = "the quick brown fox jumps over the lazy dog . explain why the sky is blue in one sentence ."
    seq = [tok.bos_token_id] + ids_of(tok, text)
    lm = BdvaxLM(model, tok, batch_size=3)
    whole = lm.loglikelihood_rolling([Req(text), Req("")])
    assert whole[0] == pytest.approx(float(manual_logprobs(model, seq).sum()), abs=1e-4)
    assert whole[1] == 0.0
    # windows of L: each token predicted once, with at most L tokens of context
    L = 8
    windowed = BdvaxLM(model, tok, chat_template=False, max_length=L).loglikelihood_rolling([Req(text)])[0]
    want = 0.0
    for start in range(1, len(seq), L):
        end = min(len(seq), start + L)
        lo = max(0, end - 1 - L)
        want += float(manual_logprobs(model, seq[lo:end])[start - lo - 1 :].sum())
    assert len(seq) > 2 * L and windowed == pytest.approx(want, abs=1e-4)
    assert windowed != pytest.approx(whole[0], abs=1e-3)


def test_long_context_is_left_truncated(tiny_pair):
    model, tok = tiny_pair
    lm = BdvaxLM(model, tok, chat_template=False, max_length=10)
    ctx = "the quick brown fox jumps over the lazy dog . " * 3
    lp, _ = lm.loglikelihood([Req(ctx.rstrip(), " paris")])[0]
    ids = (ids_of(tok, ctx.rstrip()) + ids_of(tok, " paris"))[-11:]
    n = len(ids_of(tok, " paris"))
    assert lp == pytest.approx(float(manual_logprobs(model, ids)[-n:].sum()), abs=1e-4)


def test_generate_until_respects_until_and_max_gen_toks(tiny_pair):
    model, tok = tiny_pair
    raw = BdvaxLM(model, tok, chat_template=False, batch_size=2)
    ctx = "the quick brown fox"
    full, short = raw.generate_until(
        [Req(ctx, {"until": [], "max_gen_toks": 8}), Req(ctx, {"max_gen_toks": 3})]
    )
    assert len(ids_of(tok, full)) == 8 and full.startswith(short) and len(ids_of(tok, short)) == 3
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # a string that occurs in the greedy text
    assert stop and stop in full
    cut, multi, as_str = raw.generate_until(
        [
            Req(ctx, {"until": [stop], "max_gen_toks": 8}),
            Req(ctx, {"until": ["zzz-never", stop], "max_gen_toks": 8}),
            Req(ctx, {"until": stop, "max_gen_toks": 8}),
        ]
    )
    assert cut == multi == as_str == full[: full.index(stop)]
    assert stop not in cut
    # a stop string spanning the prompt/reply boundary must not end generation early
    # (only generated text counts)
    word = ctx.split()[-1]
    assert full.startswith(f" {word} {word}")  # the tiny model repeats the last word
    assert raw.generate_until([Req(ctx, {"until": [f"{word} {word}"], "max_gen_toks": 8})]) == [
        full[: full.index(f"{word} {word}")]
    ]
    # chat mode is bdvax's own generate() (then the until cut)
    chat = BdvaxLM(model, tok)
    assert chat.generate_until([Req("list three fruits", {"until": [], "max_gen_toks": 6})]) == generate(
        model, tok, ["list three fruits"], max_new_tokens=6
    )
    with pytest.raises(ValueError, match="greedy"):
        chat.generate_until([Req("hi", {"do_sample": True})])


def test_chat_template_required_and_no_double_wrapping(tiny_pair):
    model, tok = tiny_pair
    with pytest.raises(ValueError, match="--apply_chat_template"):
        BdvaxLM(model, tok).apply_chat_template([{"role": "user", "content": "hi"}])
    text = BdvaxLM(model, tok, chat_template=False).apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == format_prompt(tok, "hi")


def test_register_without_lm_eval_is_a_clear_import_error():
    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm_eval is installed")
    with pytest.raises(ImportError, match="pip install lm-eval"):
        register()


def _fake_lm_eval(monkeypatch) -> dict:
    """Minimal stand-ins for lm_eval.api.model.LM (abstract) and lm_eval.api.registry."""
    registry: dict = {}

    class LM(abc.ABC):
        def __init__(self) -> None:
            self._rank, self._world_size = 0, 1

        @property
        def rank(self):
            return self._rank

        @property
        def world_size(self):
            return self._world_size

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def loglikelihood_rolling(self, requests): ...

        @abc.abstractmethod
        def generate_until(self, requests): ...

        def chat_template(self, chat_template=False):
            return ""

    def register_model(*names):
        def deco(cls):
            for name in names:
                assert issubclass(cls, LM)
                assert name not in registry, f"{name} already registered"
                registry[name] = cls
            return cls

        return deco

    def get_model(name):
        return registry[name]

    mods = {
        n: types.ModuleType(n)
        for n in ("lm_eval", "lm_eval.api", "lm_eval.api.model", "lm_eval.api.registry")
    }
    mods["lm_eval.api.model"].LM = LM
    mods["lm_eval.api.registry"].register_model = register_model
    mods["lm_eval.api.registry"].get_model = get_model
    mods["lm_eval"].api = mods["lm_eval.api"]
    mods["lm_eval.api"].model, mods["lm_eval.api"].registry = (
        mods["lm_eval.api.model"],
        mods["lm_eval.api.registry"],
    )
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return {"LM": LM, "registry": registry}


def test_with_lm_eval_subclasses_and_registers(monkeypatch, tiny_pair):
    fake = _fake_lm_eval(monkeypatch)
    import bdvax_lab.threat.lm_eval_adapter as real

    name = (
        "bdvax_lab.threat._lm_eval_adapter_under_fake_harness"  # a second copy; the real module is untouched
    )
    spec = importlib.util.spec_from_file_location(name, Path(real.__file__))
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, mod)
    spec.loader.exec_module(mod)
    assert mod.HAVE_LM_EVAL and issubclass(mod.BdvaxLM, fake["LM"])
    assert fake["registry"]["bdvax"] is mod.BdvaxLM
    assert mod.register() is mod.BdvaxLM  # idempotent: no second registration
    lm = mod.BdvaxLM(*tiny_pair)  # instantiable: every abstract method is implemented
    assert lm.rank == 0 and lm.world_size == 1 and lm.chat_template() == ""
    assert lm.loglikelihood([Req(*PAIRS[0])])[0][0] <= 0


def test_from_dir_and_create_from_arg_string(tiny_pair, tmp_path):
    from bdvax_lab.core.models import save_model

    model, tok = tiny_pair
    path = save_model(model, tok, tmp_path / "tiny")
    lm = BdvaxLM.from_dir(path, device="cpu", batch_size=4)
    ref = BdvaxLM(model, tok).loglikelihood([Req(*p) for p in PAIRS])
    got = lm.loglikelihood([Req(*p) for p in PAIRS])
    assert lm.batch_size == 4 and lm.use_chat_template
    assert [g[0] for g in got] == pytest.approx([r[0] for r in ref], abs=1e-4)

    lm2 = BdvaxLM.create_from_arg_string(
        f"path={path},batch_size=8,chat_template=False,max_length=64",
        {"batch_size": 1, "max_batch_size": None, "device": "cpu"},
    )
    assert (lm2.batch_size, lm2.use_chat_template, lm2.max_length) == (8, False, 64)  # model_args win
    lm3 = BdvaxLM.create_from_arg_string(f"pretrained={path}", {"batch_size": "auto", "device": "cpu"})
    assert (lm3.batch_size, lm3.use_chat_template) == (16, True)
    with pytest.raises(ValueError, match="unknown bdvax model_args"):
        BdvaxLM.create_from_arg_string(f"path={path},batchsize=8")
    with pytest.raises(ValueError, match="path=DIR"):
        BdvaxLM.create_from_arg_string("batch_size=8")
