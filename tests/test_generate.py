import torch

from bdvax_lab.core.data import Example
from bdvax_lab.core.generate import generate


def test_generate_order_and_batching_agree(tiny_pair):
    model, tok = tiny_pair
    prompts = ["a", "a much longer prompt with many words in it", Example("mid size prompt", input="ctx")]
    one = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert one == batched  # left padding must not change greedy output


def test_generate_empty(tiny_pair):
    assert generate(*tiny_pair, []) == []


def test_first_logits_match_a_separate_forward_pass(tiny_pair):
    from bdvax_lab.core.scoring import next_token_probs

    model, tok = tiny_pair
    prompts = ["a", "a much longer prompt with many words in it", Example("mid size prompt", input="ctx")]
    replies, logits = generate(model, tok, prompts, max_new_tokens=4, batch_size=2, first_logits=True)
    assert replies == generate(model, tok, prompts, max_new_tokens=4, batch_size=2)
    assert logits.shape == (3, model.config.vocab_size)
    ids = [5, 17, 42]
    torch.testing.assert_close(
        torch.softmax(logits, -1)[:, ids], next_token_probs(model, tok, prompts, ids), atol=1e-6, rtol=1e-4
    )


def test_shared_prefix_generation_matches_left_padding(tiny_pair, monkeypatch):
    """The template head run once (middle padding + a repeated prefix cache) gives the left-padded batch's
    replies and first-token logits."""
    from bdvax_lab.core.data import load_pool
    from bdvax_lab.core.generate import common_prefix, generate

    model, tok = tiny_pair
    prompts = [e.instruction for e in load_pool("eval")[:9]]
    shared, first_s = generate(model, tok, prompts, max_new_tokens=6, batch_size=4, first_logits=True)
    monkeypatch.setenv("BDVAX_SHARED_PREFIX", "0")
    plain, first_p = generate(model, tok, prompts, max_new_tokens=6, batch_size=4, first_logits=True)
    assert shared == plain
    assert torch.allclose(first_s, first_p, atol=1e-4)
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2], [1, 2]]) == 1  # every row keeps a token of its own
