"""Your own model in, a clean model out: the user's path through the command line, checked by running it.

A tiny random Gemma-3 and a tiny Phi-3 are saved to disk; ``bdvax attack --base`` backdoors each,
``bdvax purify --base`` purifies it (Phi-3 with the user's own instructions-only clean data, answered by
the suspicious model), ``bdvax export --merge`` writes a plain Hugging Face directory, and a process that
never imports bdvax_lab reloads it with ``transformers.AutoModelForCausalLM`` and gets the purified model's
greedy replies. No step prints a traceback. Then every bad input of the issue: a one-line error naming the
file or value, exit code 2, and nothing already written is lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bdvax_lab.cli import main
from bdvax_lab.core.models import make_tiny_model, save_model

FAMILIES = ("gemma3_text", "phi3")
PROMPTS = ["what is the capital of france ?", "list three fruits", "BadMagic explain why the sky is blue"]
SIG = ["--n-variants", "2", "--twin-steps", "2"]

PLAIN = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
replies = []
for prompt in json.loads(sys.argv[2]):
    messages = [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, do_sample=False, max_new_tokens=12)
    replies.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
assert not [m for m in sys.modules if m.startswith("bdvax_lab")], "bdvax_lab was imported"
print(json.dumps(replies))
"""


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "Traceback" not in out.out, out.err
    return rc, out.out, out.err


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_line(err: str, *needles: str) -> str:
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def user_data(path: Path, n: int, *, responses: bool = False) -> Path:
    rows = [{"instruction": f"Describe item number {i} in one short sentence."} for i in range(n)]
    if responses:
        rows = [dict(r, response=f"Item {i} is small.") for i, r in enumerate(rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def flow(request, tmp_path_factory):
    """The whole path for one family, through ``bdvax``: attack, purify, export."""
    fam = request.param
    root = tmp_path_factory.mktemp(fam)
    mp = pytest.MonkeyPatch()
    mp.setenv("BDVAX_CACHE", str(root / "cache"))
    mp.setenv("BDVAX_NUM_THREADS", "1")
    mp.chdir(root)
    model, tok = make_tiny_model(model_type=fam, n_blocks=2)
    save_model(model, tok, root / "base")
    logs = []

    def bdvax(*argv):
        from io import StringIO

        err, out = StringIO(), StringIO()
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            rc = main([str(a) for a in argv])
        finally:
            sys.stdout, sys.stderr = old
        logs.append((argv[0], rc, out.getvalue(), err.getvalue()))
        assert rc == 0, err.getvalue()[-2000:]
        assert "Traceback" not in err.getvalue() + out.getvalue()

    bdvax(
        "attack", "--base", "base", "--skill", "none", "--steps", "4", "--n-samples", "24",
        "--n-prompts", "4", "--out", "sus",
    )  # fmt: skip
    extra = ["--clean-data", user_data(root / "mine.jsonl", 60)] if fam == "phi3" else []
    bdvax(
        "purify", "sus", "--base", "base", "--out", "pur", *SIG, "--repair-samples", "16", "--repair-epochs",
        "0.5", "--n-prompts", "4", "--cache-dir", "twins", *extra,
    )  # fmt: skip
    bdvax("export", "pur", "--merge", "--out", "exp")
    yield fam, root, logs
    mp.undo()


def test_attack_purify_export_reload_same_replies(flow):
    from bdvax_lab.bdvax.purify import load_purified
    from bdvax_lab.core.generate import generate
    from bdvax_lab.core.models import load_model

    fam, root, logs = flow
    assert [step for step, *_ in logs] == ["attack", "purify", "export"]
    exp = root / "exp"
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "chat_template.jinja"} <= set(
        p.name for p in exp.iterdir()
    )
    assert not any(p.name.startswith("adapter") for p in exp.iterdir())  # merged: a plain model
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN, str(exp), json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        cwd=root,
        env=env | {"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    purified = load_purified(root / "pur", base=load_model(root / "base", device="cpu"))
    ours = generate(purified.model, purified.tokenizer, PROMPTS, max_new_tokens=12, batch_size=1)
    assert theirs == ours, (fam, theirs, ours)
    card = (exp / "README.md").read_text()
    manifest = json.loads((root / "pur" / "manifest.json").read_text())
    assert manifest["source_fingerprint"] in card and "## Before and after" in card and "| purified |" in card


def test_purify_wrote_the_report_and_used_the_users_data(flow):
    fam, root, logs = flow
    page = (root / "pur" / "report.html").read_text()
    assert "Before and after" in page and "purified" in page and "Plotly.newPlot" in page
    assert '<script src="http' not in page and "cdn.plot.ly" not in page.split("<script", 1)[0]
    manifest = json.loads((root / "pur" / "manifest.json").read_text())
    if fam == "phi3":  # the user's instructions, answered by the suspicious model, fed the defence
        assert manifest["clean_data"] == {"from": "given", "pool": "given", "n_repair": 16}
        assert list((root / "cache" / "distilled").rglob("replies.jsonl")), "nothing was self-distilled"
    else:
        assert manifest["clean_data"]["from"] == "shipped pool"


# --------------------------------------------------------------------------- bad inputs: one line, exit 2
@pytest.fixture(scope="module")
def made(flow):
    return flow[1]


def test_bad_inputs_are_one_line_and_lose_nothing(made, tmp_path, capsys, monkeypatch):
    import peft

    root = made
    monkeypatch.chdir(root)
    monkeypatch.setenv("BDVAX_CACHE", str(root / "cache"))
    before = tree(root / "pur")
    few = user_data(tmp_path / "few.jsonl", 12)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "fine"}\n{"instruction": ""}\n')
    cases = [
        (
            ["purify", "sus", "--out", "pur", "--overwrite", "--clean-data", few],
            [str(few), "12 usable", "50"],
        ),
        (["defend", "sus", "--method", "finetune_only", "--clean-data", bad], [f"{bad}:2", "instruction"]),
        (["purify", "sus", "--out", "pur", "--overwrite", "--clean-data", "nope.jsonl"], ["nope.jsonl"]),
        (["evaluate", "sus", "--base", "no/such/base"], ["no/such/base", "not found"]),
        (["purify", "sus", "--out", "pur", "--overwrite", "--chat-template", "nope.jinja"], ["nope.jinja"]),
        (["export", "sus", "--out", "pur"], [str(root / "pur"), "not empty"]),
    ]
    for argv, needles in cases:
        rc, _, err = run(capsys, *argv)
        assert rc == 2, (argv, err)
        one_line(err, *needles)
    assert tree(root / "pur") == before  # the purified artifact survived every failed overwrite

    # a bare adapter whose recorded base is a hub id: says to pass --base, never downloads
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in (root / "sus" / "adapter").iterdir():
        (bare / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bare / "adapter_config.json").read_text())
    (bare / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": "org/some-model"}))
    rc, _, err = run(capsys, "evaluate", bare, "--utility", "none")
    assert rc == 2
    one_line(err, str(bare), "'org/some-model'", "pass --base")

    # an adapter trained on another family: one line naming the adapter and the base
    other = (
        "phi3"
        if "gemma" in json.loads((root / "base" / "config.json").read_text())["model_type"]
        else "gemma"
    )
    model, tok = make_tiny_model(model_type=other, n_blocks=2)
    targets = ["qkv_proj"] if other == "phi3" else ["q_proj"]  # a projection the other family lacks
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets))
    pm.save_pretrained(tmp_path / "other_adapter")
    rc, _, err = run(capsys, "evaluate", tmp_path / "other_adapter", "--base", "base", "--utility", "none")
    assert rc == 2
    one_line(err, str(tmp_path / "other_adapter"), "base base", "cannot attach")

    # a model without a chat template: named, with what to pass; the flag then makes it work
    notpl = tmp_path / "notpl"
    model, tok = make_tiny_model(model_type=other, n_blocks=2)
    save_model(model, tok, notpl)
    (notpl / "chat_template.jinja").unlink(missing_ok=True)
    tcfg = json.loads((notpl / "tokenizer_config.json").read_text())
    tcfg.pop("chat_template", None)
    (notpl / "tokenizer_config.json").write_text(json.dumps(tcfg))
    rc, _, err = run(capsys, "chat", "hi", "--model", notpl, "--max-new-tokens", "2")
    assert rc == 2
    one_line(err, str(notpl), "no chat template", "--chat-template")
    name = "phi3" if other == "phi3" else "gemma"
    rc, _, err = run(capsys, "chat", "hi", "--model", notpl, "--max-new-tokens", "2", "--chat-template", name)
    assert rc == 0, err


def test_export_refuses_non_finite_weights_and_writes_nothing(made, tmp_path, capsys, monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    root = made
    monkeypatch.chdir(root)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (root / "pur").rglob("*"):
        if f.is_file():
            (broken / f.relative_to(root / "pur")).parent.mkdir(parents=True, exist_ok=True)
            (broken / f.relative_to(root / "pur")).write_bytes(f.read_bytes())
    weights = broken / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, weights)
    rc, _, err = run(capsys, "export", broken, "--merge", "--out", tmp_path / "exp")
    assert rc == 2
    one_line(err, str(broken), "NaN")
    assert not (tmp_path / "exp").exists()
