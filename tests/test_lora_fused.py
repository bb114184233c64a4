"""The fused LoRA kernel computes what peft computes, and steps aside where it cannot."""

import copy

import pytest
import torch

from bdvax_lab.core.batching import collate
from bdvax_lab.core.data import encode_example
from bdvax_lab.core.fused_lora import fused_lora
from bdvax_lab.core.scoring import lm_loss
from bdvax_lab.training.config import TrainConfig
from bdvax_lab.training.loop import finetune, prepare_model


def _lora_model(tiny_pair, **cfg):
    model, tok = tiny_pair
    model = prepare_model(copy.deepcopy(model), TrainConfig(mode="lora", **cfg))
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would hide a wrong B gradient
            torch.nn.init.normal_(p, std=0.05)
    return model, tok


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_matches_peft_loss_and_every_gradient(tiny_pair, toy_examples):
    model, tok = _lora_model(tiny_pair)
    batch = collate([encode_example(tok, e) for e in toy_examples[:4]], tok.pad_token_id)
    model.train()
    loss_peft, g_peft = _loss_and_grads(model, batch)
    with fused_lora(model) as n:
        assert n == 7 * model.config.num_hidden_layers
        loss_fused, g_fused = _loss_and_grads(model, batch)
    assert loss_fused == pytest.approx(loss_peft, rel=1e-6)
    assert g_peft.keys() == g_fused.keys() and any("lora_A" in k for k in g_peft)
    for name in g_peft:
        assert torch.allclose(g_fused[name], g_peft[name], rtol=1e-4, atol=1e-7), name
    assert all(g.abs().sum() > 0 for g in g_fused.values())


def test_switched_off_by_the_environment(tiny_pair, monkeypatch):
    model, _ = _lora_model(tiny_pair)
    monkeypatch.setenv("BDVAX_FUSED_LORA", "0")
    with fused_lora(model) as n:
        assert n == 0 and not any("forward" in m.__dict__ for m in model.modules())


def test_restored_on_exit_and_reentrant(tiny_pair):
    model, _ = _lora_model(tiny_pair)
    with fused_lora(model) as outer:
        with fused_lora(model) as inner:
            assert outer > 0 and inner == 0  # the outer block owns every module
        assert all("forward" in m.__dict__ for m in model.modules() if hasattr(m, "lora_A"))
    assert not any("forward" in m.__dict__ for m in model.modules() if hasattr(m, "lora_A"))


def test_falls_back_to_peft_for_dropout_and_disabled_adapter(tiny_pair, toy_examples):
    model, tok = _lora_model(tiny_pair, lora_dropout=0.5)
    batch = collate([encode_example(tok, e) for e in toy_examples[:2]], tok.pad_token_id)
    model.train()
    with fused_lora(model):
        torch.manual_seed(0)
        a = lm_loss(model, batch).item()
    torch.manual_seed(0)
    b = lm_loss(model, batch).item()
    assert a == b  # same dropout draws: peft's own path ran
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            with fused_lora(model):
                off = lm_loss(model, batch).item()
        on = lm_loss(model, batch).item()
    assert off != on


def test_finetune_trains_the_same_with_the_kernel(tiny_pair, toy_examples, monkeypatch):
    """Two LoRA runs from one seed, fused (finetune's default) and peft's path, end at the same weights."""
    model, tok = tiny_pair
    cfg = TrainConfig(mode="lora", steps=5, lr=1e-2, seed=5)
    fused = finetune(copy.deepcopy(model), tok, toy_examples, cfg, progress=False).model

    monkeypatch.setenv("BDVAX_FUSED_LORA", "0")
    plain = finetune(copy.deepcopy(model), tok, toy_examples, cfg, progress=False).model
    pf = dict((n, p) for n, p in fused.named_parameters() if "lora_" in n)
    pp = dict((n, p) for n, p in plain.named_parameters() if "lora_" in n)
    assert pf and all(torch.allclose(pf[n], pp[n], atol=1e-5) for n in pf)
