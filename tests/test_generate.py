from bdvax_lab.data import Example
from bdvax_lab.generate import generate


def test_generate_order_and_batching_agree(tiny_pair):
    model, tok = tiny_pair
    prompts = ["a", "a much longer prompt with many words in it", Example("mid size prompt", input="ctx")]
    one = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert one == batched  # left padding must not change greedy output


def test_generate_empty(tiny_pair):
    assert generate(*tiny_pair, []) == []
