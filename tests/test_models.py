import json

import pytest
import torch

from bdvax_lab.core.models import ModelDirError, PickleWeightsError, load_model, make_tiny_model, save_model
from bdvax_lab.core.registry import UnsupportedArchitectureError


def test_save_and_load_roundtrip(tmp_path, tiny_pair):
    model, tok = tiny_pair
    save_model(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    m2, t2 = load_model(tmp_path / "m", device="cpu")
    ids = torch.tensor([tok("hello world")["input_ids"]])
    assert torch.allclose(model(ids).logits, m2(ids).logits)
    assert t2.chat_template == tok.chat_template


def test_pickle_only_dir_refused(tmp_path, tiny_pair):
    model, tok = tiny_pair
    d = tmp_path / "pickled"
    save_model(model, tok, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(PickleWeightsError, match=r"pickled.*only pickle weights \(pytorch_model\.bin\)"):
        load_model(d)


def test_unsupported_architecture_dir(tmp_path, tiny_pair):
    model, tok = tiny_pair
    d = tmp_path / "odd"
    save_model(model, tok, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt_neox'.*supported"):
        load_model(d)


def test_missing_dir(tmp_path):
    with pytest.raises(ModelDirError, match="nope"):
        load_model(tmp_path / "nope")


def test_adapter_pickle_refused(tmp_path, tiny_pair):
    from bdvax_lab.core.models import load_adapter

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(PickleWeightsError, match="adapter_model.bin"):
        load_adapter(tiny_pair[0], d)


def test_tiny_model_is_deterministic():
    a, _ = make_tiny_model(seed=3)
    b, _ = make_tiny_model(seed=3)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na


def test_cache_dir_env(monkeypatch, tmp_path):
    from bdvax_lab.core.models import cache_dir, default_model_dir

    monkeypatch.setenv("BDVAX_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert default_model_dir().is_relative_to(tmp_path / "c")


def test_working_copy_shares_only_the_frozen_base(tiny):
    import torch
    from peft import LoraConfig, get_peft_model

    from bdvax_lab.core.models import release_memory, working_copy

    model, _ = tiny
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["gate_proj"], init_lora_weights=False))
    shared = working_copy(peft_model, share_frozen_base=True)
    full = working_copy(peft_model)
    orig = dict(peft_model.named_parameters())
    for name, p in shared.named_parameters():
        assert (p is orig[name]) == ("lora_" not in name), name
    assert not any(p is orig[n] for n, p in full.named_parameters())
    with torch.no_grad():  # editing the copy's adapter leaves the original's alone
        for name, p in shared.named_parameters():
            if "lora_B" in name:
                p.zero_()
    assert all(orig[n].abs().sum() > 0 for n in orig if "lora_B" in n)
    release_memory()
