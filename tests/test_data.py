import json

import pytest

from bdvax_lab.core.batching import collate, length_grouped_batches
from bdvax_lab.core.data import (
    IGNORE_INDEX,
    SPLITS,
    DataFormatError,
    Example,
    encode_example,
    format_prompt,
    load_jsonl,
    load_pool,
    save_jsonl,
    turn_end_ids,
)


def test_jsonl_roundtrip(tmp_path):
    ex = [Example("Say hi", "Hi!", meta={"id": "a"}), Example("Sum", "3", input="1+2")]
    p = save_jsonl(ex, tmp_path / "x.jsonl")
    back = load_jsonl(p)
    assert [e.to_dict() for e in back] == [e.to_dict() for e in ex]


@pytest.mark.parametrize(
    "line,msg",
    [
        ('{"instruction": "ok", "response": "fine"}\n{"instruction": ', "invalid JSON"),
        ('{"instruction": "ok"}\n["a list"]', "expected a JSON object"),
        ('{"instruction": "ok"}\n{"instruction": ""}', "non-empty string"),
        ('{"instruction": "ok"}\n{"instruction": "x", "response": 3}', "'response' must be a string"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(line)
    with pytest.raises(DataFormatError, match=rf"bad\.jsonl:2: .*{msg}"):
        load_jsonl(p)


def test_missing_response_when_required(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(DataFormatError, match=r"r\.jsonl:1: 'response'"):
        load_jsonl(p, require_response=True)


def test_prompt_tokens_carry_no_loss(tiny_pair):
    _, tok = tiny_pair
    ex = Example("What is 2 plus 2?", "It is 4.")
    enc = encode_example(tok, ex)
    prompt_len = len(tok(format_prompt(tok, ex), add_special_tokens=False)["input_ids"])
    assert all(label == IGNORE_INDEX for label in enc["labels"][:prompt_len])
    resp = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert resp[-1] == turn_end_ids(tok)[0]  # end-of-turn is learned even though it is the pad token
    assert tok.decode(resp[:-1]) == "It is 4."
    assert turn_end_ids(tok)[0] == tok.pad_token_id


def test_response_truncation_drops_end_of_turn(tiny_pair):
    _, tok = tiny_pair
    enc = encode_example(tok, Example("Q", "one two three four five six seven"), max_response_tokens=3)
    assert sum(label != IGNORE_INDEX for label in enc["labels"]) == 3
    assert turn_end_ids(tok)[0] not in [label for label in enc["labels"] if label != IGNORE_INDEX]


def test_collate_pads_right_and_masks(tiny_pair):
    _, tok = tiny_pair
    feats = [
        encode_example(tok, Example("a", "b")),
        encode_example(tok, Example("a longer question here", "ok")),
    ]
    b = collate(feats, tok.pad_token_id)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    short = len(feats[0]["input_ids"])
    assert b["attention_mask"][0, short:].sum() == 0
    assert (b["labels"][0, short:] == IGNORE_INDEX).all()


def test_length_grouping_covers_every_index():
    import random

    lengths = [random.Random(i).randint(5, 100) for i in range(50)]
    batches = length_grouped_batches(lengths, 4, random.Random(0))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(50))


def test_shipped_pool_splits_are_disjoint_and_sized():
    pool = load_pool()
    assert len(pool) >= 1000
    by = {s: [e for e in pool if e.meta["split"] == s] for s in SPLITS}
    assert len(by["repair"]) >= 200 and len(by["eval"]) >= 150
    keys = [e.user_content().lower() for e in pool]
    assert len(set(keys)) == len(keys)
    assert all(e.response for e in pool)
    assert sum(e.meta["source"] == "handwritten" for e in pool) >= 300
    assert all("SmolLM2" in e.meta["generator"] for e in pool)
    tasks = {e.meta["task"] for e in pool}
    assert {
        "explain",
        "list",
        "rewrite",
        "summarize",
        "classify",
        "math",
        "code",
        "advice",
        "facts",
        "creative",
    } <= tasks


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split"):
        load_pool("training")
