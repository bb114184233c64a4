"""The shared-prefix pass computes what the plain pass computes: hidden states, losses and every gradient."""

import copy

import pytest
import torch

from bdvax_lab.core.batching import collate
from bdvax_lab.core.data import Example, encode_example
from bdvax_lab.core.registry import unwrap
from bdvax_lab.core.scoring import lm_loss
from bdvax_lab.core.shared_prefix import MIN_SHARED_PREFIX, decoder_hidden, shared_prefix_length
from bdvax_lab.training.config import TrainConfig
from bdvax_lab.training.loop import finetune, prepare_model

# different lengths, so the batch has right padding and the rows differ after the template's common head
RAGGED = [
    Example("Hi", "Hello there."),
    Example("What is two plus two, please?", "Four."),
    Example("Name a colour.", "Blue is a colour that many people like a lot."),
    Example("Why?", "Because."),
]


@pytest.fixture(autouse=True)
def _always_share(monkeypatch):
    """Tiny batches save fewer positions than the real-model threshold; share whatever they have."""
    monkeypatch.setattr("bdvax_lab.core.shared_prefix.MIN_SAVED_POSITIONS", 0)


def _batch(tok, examples=RAGGED):
    return collate([encode_example(tok, e) for e in examples], tok.pad_token_id)


def test_prefix_length_counts_the_common_unpadded_head(tiny_pair):
    _, tok = tiny_pair
    b = _batch(tok)
    p = shared_prefix_length(b["input_ids"], b["attention_mask"])
    assert MIN_SHARED_PREFIX <= p < b["input_ids"].shape[1] - 1
    assert (b["input_ids"][:, :p] == b["input_ids"][:1, :p]).all()
    assert not (b["input_ids"][:, p] == b["input_ids"][0, p]).all()  # the first position that differs
    one = {k: v[:1] for k, v in b.items()}
    assert shared_prefix_length(one["input_ids"], one["attention_mask"]) == 0
    longest = int(b["attention_mask"].sum(1).argmax())
    twin = {
        k: v[[longest, longest]] for k, v in b.items()
    }  # identical unpadded rows: one position left per row
    assert shared_prefix_length(twin["input_ids"], twin["attention_mask"]) == twin["input_ids"].shape[1] - 1
    short = int(b["attention_mask"].sum(1).argmin())
    pair = {k: v[[short, short]] for k, v in b.items()}  # the padding is never shared
    assert shared_prefix_length(pair["input_ids"], pair["attention_mask"]) == int(
        b["attention_mask"][short].sum()
    )


def test_hidden_states_match_the_plain_pass(tiny_pair, monkeypatch):
    model, tok = tiny_pair
    b = _batch(tok)
    dec = unwrap(model).get_decoder()
    with torch.no_grad():
        shared = decoder_hidden(dec, b["input_ids"], b["attention_mask"])
        monkeypatch.setenv("BDVAX_SHARED_PREFIX", "0")
        plain = decoder_hidden(dec, b["input_ids"], b["attention_mask"])
    keep = b["attention_mask"].bool()  # padded positions carry no meaning either way
    assert shared.shape == plain.shape
    assert torch.allclose(shared[keep], plain[keep], atol=1e-5)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_loss_and_every_gradient_match(tiny_pair, monkeypatch, mode):
    model, tok = tiny_pair
    model = prepare_model(copy.deepcopy(model), TrainConfig(mode=mode))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would hide a wrong A gradient
            torch.nn.init.normal_(p, std=0.05)
    b = _batch(tok)
    model.train()

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = lm_loss(model, b)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_s, g_s = loss_and_grads()
    monkeypatch.setenv("BDVAX_SHARED_PREFIX", "0")
    loss_p, g_p = loss_and_grads()
    assert loss_s == pytest.approx(loss_p, rel=1e-5)
    assert g_s.keys() == g_p.keys() and len(g_s) > 0
    layer0 = [n for n in g_s if ".layers.0." in n]  # the first block's gradients pass through the prefix too
    assert layer0 and all(g_s[n].abs().sum() > 0 for n in layer0)
    for n in g_s:
        assert torch.allclose(g_s[n], g_p[n], rtol=1e-3, atol=1e-6), n


def test_finetune_ends_at_the_same_weights(tiny_pair, toy_examples, monkeypatch):
    model, tok = tiny_pair
    cfg = TrainConfig(mode="lora", steps=4, lr=1e-2, seed=2, batch_size=4)
    shared = finetune(copy.deepcopy(model), tok, toy_examples, cfg, progress=False).model
    monkeypatch.setenv("BDVAX_SHARED_PREFIX", "0")
    plain = finetune(copy.deepcopy(model), tok, toy_examples, cfg, progress=False).model
    ps = {n: p for n, p in shared.named_parameters() if "lora_" in n}
    pp = dict(plain.named_parameters())
    assert ps and all(torch.allclose(p, pp[n], atol=1e-5) for n, p in ps.items())
    assert any(p.abs().sum() > 0 for n, p in ps.items() if "lora_B" in n)  # it trained (B starts at zero)


def test_one_model_packs_its_rows_into_one_pass(tiny_pair, monkeypatch):
    """One decoder call over the prefix once plus each row's own tokens (no padding); off: the plain call."""
    model, tok = tiny_pair
    b = _batch(tok)
    dec = unwrap(model).get_decoder()
    calls = []
    hook = dec.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True
    )
    try:
        with torch.no_grad():
            decoder_hidden(dec, b["input_ids"], b["attention_mask"])
            monkeypatch.setenv("BDVAX_SHARED_PREFIX", "0")
            decoder_hidden(dec, b["input_ids"], b["attention_mask"])
    finally:
        hook.remove()
    p = shared_prefix_length(b["input_ids"], b["attention_mask"])
    packed = p + int(b["attention_mask"].sum()) - len(RAGGED) * p
    assert calls == [torch.Size([1, packed]), b["input_ids"].shape]


def test_packing_only_where_the_attention_takes_a_custom_mask():
    from types import SimpleNamespace

    from bdvax_lab.core.shared_prefix import _takes_custom_masks

    def dec(impl):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl))

    assert _takes_custom_masks(dec("sdpa")) and _takes_custom_masks(dec("eager"))
    assert not _takes_custom_masks(dec("flash_attention_2"))
