"""The safety contract under bad input, faults and concurrency (docs/troubleshooting.md, "Safety and failure
behaviour"): nothing lost, nothing unpickled, nothing reached.

Every probe is a CLI call on the tiny model with its expected one-line message and exit code 2 (or the safe
behaviour it documents); the fault tests kill and race real processes. Marked ``reliability`` (run by
``make test``); ``BDVAX_KILLS`` (default 20) and ``BDVAX_RACES`` (default 2) set how often the kill test
kills and the two-process test races.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bdvax_lab.cli import main
from bdvax_lab.core import artifacts
from bdvax_lab.core.models import make_tiny_model, save_model

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[1]


def _attack_has_skill() -> bool:
    from bdvax_lab.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return any("--skill" in a.option_strings for a in sub.choices["attack"]._actions)


#: the backdoor-only finetune (``--skill none`` where ``bdvax attack`` has skills; its only recipe before)
NO_SKILL = ["--skill", "none"] if _attack_has_skill() else []


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny base model, a full-setting suspicious artifact made from it, and a LoRA adapter of it."""
    import peft

    from bdvax_lab.threat.config import AttackRecipe, EvalConfig
    from bdvax_lab.threat.suspicious import make_suspicious_model
    from bdvax_lab.training.config import TrainConfig

    root = tmp_path_factory.mktemp("rel")
    model, tok = make_tiny_model()
    save_model(model, tok, root / "base")
    recipe = AttackRecipe(
        setting="full",
        n_samples=24,
        train=TrainConfig(mode="full", steps=2),
        eval=EvalConfig(n_prompts=2, utility=()),
    )
    make_suspicious_model(
        recipe=recipe, base=make_tiny_model(), out=root / "sus", evaluate=False, progress=False
    )
    pm = peft.get_peft_model(
        make_tiny_model()[0], peft.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"])
    )
    pm.save_pretrained(root / "adapter")
    return root


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``bdvax argv`` in this process → (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(err: str, *needles: str) -> str:
    """The error line of ``err``: exactly one ``error:`` line, no traceback, containing every needle."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def orphans(root: Path) -> list[Path]:
    """Leftovers a write must never leave: temporary siblings, lock files, half-done twins."""
    return [
        p
        for p in root.rglob("*")
        if artifacts.parse_tmp_name(p.name) is not None or p.name.endswith((".lock", ".poison"))
    ]


@pytest.fixture
def block_network(monkeypatch):
    """Every socket connection outside this machine fails, and is recorded."""
    attempts: list = []
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family == socket.AF_UNIX or (
            isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1")
        ):
            return real_connect(self, address)
        attempts.append(address)
        raise OSError(101, "Network is unreachable (blocked by the test)")

    def connect_ex(self, address):
        attempts.append(address)
        return 101

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(-3, "name resolution blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


# --------------------------------------------------------------------------- 1. outputs never destroy
def _precious(path: Path) -> dict[str, bytes]:
    (path / "sub").mkdir(parents=True)
    (path / "precious.txt").write_text("do not delete")
    (path / "sub" / "thesis.tex").write_text("\\documentclass{article}")
    return tree(path)


@pytest.mark.parametrize(
    "argv",
    [
        ["purify", "{sus}", "--out", "{out}"],
        ["signature", "{sus}", "--out", "{out}"],
        ["attack", "--base", "{base}", "--out", "{out}", "--steps", "1", "--no-eval"],
        ["defend", "{sus}", "--method", "finetune_only", "--out", "{out}"],
        ["sanity", "{sus}", "--out", "{out}"],
        ["probe", "{sus}", "--out", "{out}"],
    ],
    ids=lambda a: a[0],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_out_never_replaces_a_foreign_directory(dirs, tmp_path, capsys, argv, overwrite):
    out = tmp_path / "thesis"
    before = _precious(out)
    args = [a.format(sus=dirs / "sus", base=dirs / "base", out=out) for a in argv]
    rc, _, err = cli(capsys, *args, *(["--overwrite"] if overwrite else []))
    assert rc == 2
    one_line_error(err, str(out), "is not a bdvax" if overwrite else "exists and is not empty")
    assert tree(out) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_never_replaces_an_input(dirs, capsys, overwrite):
    before = tree(dirs / "sus")
    flag = ["--overwrite"] if overwrite else []
    rc, _, err = cli(capsys, "purify", dirs / "sus", "--out", dirs / "sus", *flag)
    assert rc == 2
    one_line_error(err, "would replace the input")
    rc, _, err = cli(capsys, "purify", dirs / "sus", "--out", dirs, *flag)  # its parent holds it
    assert rc == 2
    one_line_error(err, "would replace the input")
    rc, _, err = cli(capsys, "purify", dirs / "sus", "--out", dirs / "sus" / "inner", *flag)
    assert rc == 2
    one_line_error(err, "lies inside the input")
    assert tree(dirs / "sus") == before


def test_out_dot_fails_before_any_work(dirs, tmp_path, capsys, monkeypatch):
    import bdvax_lab.threat.suspicious as suspicious

    monkeypatch.setattr(suspicious, "load_suspicious", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "purify", dirs / "sus", "--out", ".")
    assert rc == 2
    one_line_error(err, "is the working directory")


def test_overwrite_replaces_only_the_same_kind(tmp_path):
    sig = tmp_path / "sig"
    sig.mkdir()
    (sig / "signature.json").write_text(json.dumps({"format": "bdvax_lab.signature"}))
    assert artifacts.check_output(sig, kind="bdvax_lab.signature", overwrite=True) == sig
    with pytest.raises(artifacts.OutputError, match="its manifest says bdvax_lab.signature"):
        artifacts.check_output(sig, kind="bdvax.purified", overwrite=True)
    with pytest.raises(artifacts.OutputError, match="pass --overwrite to replace it"):
        artifacts.check_output(sig, kind="bdvax_lab.signature")
    (tmp_path / "empty").mkdir()
    assert artifacts.check_output(tmp_path / "empty", kind="bdvax.purified") == tmp_path / "empty"
    (tmp_path / "file").write_text("x")
    with pytest.raises(artifacts.OutputError, match="not a directory"):
        artifacts.check_output(tmp_path / "file", kind="bdvax.purified", overwrite=True)


def test_unwritable_output_is_refused_before_any_work(tmp_path, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    with pytest.raises(artifacts.OutputError, match="permission denied"):
        artifacts.check_output(tmp_path / "new" / "out", kind="bdvax.purified")


def test_cache_clean_touches_only_twin_entries(tmp_path, capsys):
    from bdvax_lab.bdvax.twins import twin_cache_frame

    root = tmp_path / "notacache"
    (root / "proj" / "variant-1").mkdir(parents=True)
    (root / "proj" / "variant-1" / "notes.txt").write_text("mine")
    (root / "thesis" / "variant-00-0123456789abcdef").mkdir(
        parents=True
    )  # the name fits, the manifest does not
    (root / "thesis" / "variant-00-0123456789abcdef" / "delta.json").write_text('{"format": "mine"}')
    (root / "thesis" / "variant-00-0123456789abcdef" / "delta.safetensors").write_text("x")
    (root / "empty" / "deeper").mkdir(parents=True)
    before = sorted(str(p) for p in root.rglob("*"))
    assert twin_cache_frame(root).empty
    for extra in ([], ["--model", "nothing-matches"], ["--older-than", "0"]):
        rc, out, _ = cli(capsys, "cache", "--clean", "--cache-dir", root, *extra)
        assert rc == 0 and "deleted 0 entries" in out
    assert sorted(str(p) for p in root.rglob("*")) == before
    rc, _, err = cli(capsys, "cache", "--cache-dir", tmp_path / "nowhere")
    assert rc == 2
    one_line_error(err, "no such twin cache directory")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_tmp_directories_are_listed_and_reaped(tmp_path, capsys):
    fp = tmp_path / "cache" / "0123456789abcdef"
    fp.mkdir(parents=True)
    name = "variant-00-0123456789abcdef"
    stale = fp / f".{name}.bdvax-{artifacts._host_tag()}-{_dead_pid()}-abc.tmp"
    live = fp / f".{name}.bdvax-{artifacts._host_tag()}-{os.getpid()}-def.tmp"
    for d in (stale, live):
        d.mkdir()
        (d / "delta.safetensors").write_bytes(b"x" * 1000)
    old = fp / f".{name}.bdvax-ffffff-1-old.tmp"  # another host's, older than the longest write
    old.mkdir()
    t = time.time() - artifacts.STALE_TMP_SECONDS - 60
    os.utime(old, (t, t))
    rc, out, _ = cli(capsys, "cache", "--cache-dir", tmp_path / "cache")
    assert rc == 0 and "2 stale temporary directories" in out and "writing" in out
    rc, out, _ = cli(capsys, "cache", "--cache-dir", tmp_path / "cache", "--clean")
    assert rc == 0 and "2 stale temporary directories" in out
    assert not stale.exists() and not old.exists() and live.exists()


def test_published_files_are_0644(dirs, tmp_path):
    from bdvax_lab.weights.deltas import WeightDelta

    old = os.umask(0o022)
    try:
        artifacts.save_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(2)})
        artifacts.atomic_write_text(tmp_path / "t.txt", "x")
        from bdvax_lab.threat.suspicious import load_suspicious

        sm = load_suspicious(dirs / "sus")
        delta = WeightDelta.from_models(sm.model, make_tiny_model()[0])
        delta.save(tmp_path / "delta")
        files = [tmp_path / "t.safetensors", tmp_path / "t.txt", *(tmp_path / "delta").iterdir()]
        files += list((dirs / "sus").rglob("*.safetensors"))
    finally:
        os.umask(old)
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert (tmp_path / "delta").stat().st_mode & 0o777 == 0o755


# --------------------------------------------------------------------------- 2. untrusted means untrusted
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _weights_dir(base: Path, dst: Path, keep_weights: bool) -> Path:
    dst.mkdir()
    for f in base.iterdir():
        if keep_weights or f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    return dst


def test_a_stray_safetensors_file_does_not_let_a_pickle_in(dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    marker = tmp_path / "PWNED"
    model = _weights_dir(dirs / "base", tmp_path / "model", keep_weights=False)
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    (model / "stray.safetensors").write_bytes((dirs / "base" / "model.safetensors").read_bytes())
    rc, _, err = cli(capsys, "chat", "hi", "--model", model)
    assert rc == 2
    one_line_error(err, str(model), "no model.safetensors, only pickle weights (pytorch_model.bin)")
    adapter = tmp_path / "adapter"
    shutil.copytree(dirs / "adapter", adapter)
    (adapter / "adapter_model.safetensors").rename(adapter / "stray.safetensors")
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    rc, _, err = cli(capsys, "chat", "hi", "--model", dirs / "base", "--adapter", adapter)
    assert rc == 2
    one_line_error(err, "no adapter_model.safetensors, only pickle weights (adapter_model.bin)")
    assert not marker.exists()


def test_sharded_safetensors_need_every_shard(dirs, tmp_path):
    from bdvax_lab.core.models import ModelDirError, check_weights_dir

    model = _weights_dir(dirs / "base", tmp_path / "sharded", keep_weights=False)
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    (model / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ModelDirError, match="shard.*missing: model-00002-of-00002.safetensors"):
        check_weights_dir(model)
    (model / "model-00002-of-00002.safetensors").write_bytes(b"")
    check_weights_dir(model)


def test_no_load_path_opens_a_connection(dirs, tmp_path, capsys, monkeypatch, block_network):
    from bdvax_lab.core.models import load_adapter, load_model, load_tokenizer
    from bdvax_lab.threat.suspicious import as_suspicious, load_suspicious

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(dirs)
    model, tok = load_model("base")  # relative paths: never taken for hub ids
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    load_adapter(model, "adapter")
    load_tokenizer("base")
    load_suspicious("sus")
    as_suspicious(Path("sus"))
    (tmp_path / "noweights").mkdir()
    shutil.copy(dirs / "adapter" / "adapter_config.json", tmp_path / "noweights")
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "chat", "hi", "--model", dirs / "base", "--adapter", "noweights")
    assert rc == 2
    one_line_error(err, "noweights: no adapter_model.safetensors")
    rc, _, err = cli(capsys, "chat", "hi", "--model", "no-such-model/on-the-hub")
    assert rc == 2
    one_line_error(err, "no-such-model/on-the-hub: model directory not found")
    rc, out, _ = cli(capsys, "chat", "hi", "--model", dirs / "base", "--max-new-tokens", "2")
    assert rc == 0
    assert block_network == []


def test_nnsight_never_leaves_interventions_disabled(tiny):
    from bdvax_lab.analysis.probes.common import check_instrumented, nnsight_model

    model, tok = tiny
    w = nnsight_model(model, tok)
    mlp = model.model.layers[1].mlp
    mlp.forward = lambda *a, **k: type(mlp).forward(mlp, *a, **k)  # something takes the slot after wrapping
    with pytest.raises(RuntimeError, match="model.layers.1.mlp"):
        check_instrumented(model)
    with pytest.raises(RuntimeError, match="model.layers.1.mlp"):
        nnsight_model(w, tok)  # an old wrapper is refused, never used with interventions off
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w2 = nnsight_model(model, tok)  # re-instrumented around the new forward
    check_instrumented(model)
    with w2.trace("hello"):
        out = w2.model.layers[1].mlp.output.save()
    assert out.shape[-1] == model.config.hidden_size


# --------------------------------------------------------------------------- 3. one error channel
@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda b: b[: len(b) // 2], "incomplete metadata"),
        (lambda b: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + bytes(64), "invalid JSON in header"),
        (lambda b: b"", "header too small"),
    ],
    ids=["truncated", "corrupt", "empty"],
)
def test_bad_safetensors_is_one_line(dirs, tmp_path, capsys, damage, needle):
    model = _weights_dir(dirs / "base", tmp_path / "model", keep_weights=True)
    (model / "model.safetensors").write_bytes(damage((model / "model.safetensors").read_bytes()))
    rc, _, err = cli(capsys, "chat", "hi", "--model", model)
    assert rc == 2
    one_line_error(err, str(model), "cannot load the model weights", needle)


def test_an_adapter_that_does_not_fit_is_one_line(dirs, tmp_path, capsys):
    import peft

    pm = peft.get_peft_model(
        make_tiny_model(hidden=32, d_ff=64)[0],
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"]),
    )
    pm.save_pretrained(tmp_path / "other")
    rc, _, err = cli(capsys, "chat", "hi", "--model", dirs / "base", "--adapter", tmp_path / "other")
    assert rc == 2
    one_line_error(err, str(tmp_path / "other"), "cannot attach this adapter", "size mismatch")


def test_configs_are_files_with_named_errors(dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("missing.yaml", "missing.json", '{"rho": 0.5}'):
        rc, _, err = cli(capsys, "signature", dirs / "sus", "--out", "o", "--config", name)
        assert rc == 2
        one_line_error(err, f"{name}: no such config file")
    bad = {
        "bad.yaml": "rho: [unclosed",
        "bad.json": "{rho: 1}",
        "field.json": '{"nope": 1}',
        "list.yaml": "- 1",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        rc, _, err = cli(capsys, "signature", dirs / "sus", "--out", "o", "--config", name)
        assert rc == 2
        one_line_error(err, name)
    (tmp_path / "latin1.yaml").write_bytes(b"family: caf\xe9\n")
    rc, _, err = cli(capsys, "signature", dirs / "sus", "--out", "o", "--config", "latin1.yaml")
    assert rc == 2
    one_line_error(err, "latin1.yaml: not UTF-8 text")


@pytest.fixture
def bad_pool(tmp_path, monkeypatch):
    d = tmp_path / "data"
    d.mkdir()
    monkeypatch.setenv("BDVAX_DATA", str(d))
    return d / "clean_pool.jsonl"


@pytest.mark.parametrize(
    "content, needle",
    [
        (
            b'{"instruction": "hi", "response": "ok", "split": "attack"}\n\xff\xfe\n',
            "clean_pool.jsonl:2: not UTF-8 text",
        ),
        (b"", "clean_pool.jsonl: no examples"),
        (b"\n\n", "clean_pool.jsonl: no examples"),
        (
            b'{"instruction": "hi", "response": "ok", "split": "eval"}\n',
            "clean_pool.jsonl: no examples in split(s) ['attack']",
        ),
        (b"[" * 100_000 + b"\n", "clean_pool.jsonl:1: invalid JSON"),
    ],
    ids=["non-utf8", "empty", "blank", "empty-split", "deep"],
)
def test_bad_jsonl_names_its_file_and_line(dirs, tmp_path, capsys, bad_pool, content, needle):
    bad_pool.write_bytes(content)
    out = tmp_path / "out"
    rc, _, err = cli(
        capsys,
        "attack",
        "--base",
        dirs / "base",
        "--setting",
        "full",
        *NO_SKILL,
        "--out",
        out,
        "--no-eval",
    )
    assert rc == 2
    one_line_error(err, str(bad_pool.parent), needle)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["purify", "s", "--out", "o", "--rho", "0"], "rho must be in (0, 1]"),
        (["purify", "s", "--out", "o", "--rho", "nan"], "rho must be in (0, 1]"),
        (["signature", "s", "--out", "o", "--rho", "1.5"], "rho must be in (0, 1]"),
        (["defend", "s", "--method", "magnitude_prune", "--rho", "0"], "rho must be in (0, 1]"),
        (["variants", "s", "--twin-steps", "-5"], "steps must be ≥ 1"),
        (["attack", "--out", "o", "--steps", "0"], "steps must be ≥ 1"),
        (["attack", "--out", "o", "--lr", "0"], "lr must be > 0"),
        (["defend", "s", "--method", "finetune_only", "--lr=-1e-3"], "lr must be > 0"),
        (["purify", "s", "--out", "o", "--repair-lr", "0"], "lr must be > 0"),
        (["signature", "s", "--out", "o", "--n-variants", "1"], "n-variants must be ≥ 2"),
        (["demo", "--n-variants", "1"], "n-variants must be ≥ 2"),
        (["demo", "--attack-steps", "0"], "steps must be ≥ 1"),
        (["purify", "s", "--out", "o", "--repair-epochs", "0"], "must be > 0"),
        (["attack", "--out", "o", "--poison-rate", "0"], "must be in (0, 1]"),
        (["chat", "hi", "--max-new-tokens", "0"], "must be ≥ 1"),
        (["purify", "s", "--out", "o", "--n-variants", "three"], "expected int, got 'three'"),
    ],
)
def test_numeric_flags_are_checked_by_argparse(capsys, argv, needle):
    rc, _, err = cli(capsys, *argv)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_library_configs_refuse_zero_steps_and_lr():
    from bdvax_lab.training.config import RepairConfig, TrainConfig

    for bad in ({"steps": 0}, {"steps": -5}, {"lr": 0.0}, {"steps": None, "epochs": 0.0}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    for bad in ({"steps": 0}, {"lr": 0.0}, {"epochs": 0.0}):
        with pytest.raises(ValueError):
            RepairConfig(**bad)


def test_expected_failures_map_to_one_line():
    import pickle as pk

    import yaml
    from safetensors import SafetensorError

    from bdvax_lab.cli import _expected_error

    cases = [
        SafetensorError("Error while deserializing header: header too small"),
        RuntimeError(
            "Error(s) in loading state_dict:\n\tsize mismatch for w: copying a param with shape [2]"
        ),
        pk.UnpicklingError("invalid load key, 'x'."),
        ConnectionError("[Errno 101] Network is unreachable"),
        socket.gaierror(-2, "Name or service not known"),
        yaml.YAMLError("mapping values are not allowed here\n  in line 1"),
        json.JSONDecodeError("Expecting value", "x", 0),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        PermissionError(13, "Permission denied", "/root/out"),
        FileNotFoundError(2, "No such file or directory", "missing.yaml"),
        TimeoutError("entry still locked"),
    ]
    for exc in cases:
        msg = _expected_error(exc)
        assert msg and "\n" not in msg, (exc, msg)
    assert "/root/out" in _expected_error(cases[8])
    assert _expected_error(RuntimeError("a bug")) is None and _expected_error(KeyError("x")) is None


def test_debug_shows_the_traceback(capsys, tmp_path):
    rc, _, err = cli(capsys, "--debug", "chat", "hi", "--model", tmp_path / "missing")
    assert rc == 2 and "Traceback" in err and "model directory not found" in err
    rc, _, err = cli(capsys, "chat", "hi", "--model", tmp_path / "missing", "--debug")
    assert rc == 2 and "Traceback" in err


def test_the_cli_entry_point_prints_one_line(tmp_path):
    env = dict(os.environ, BDVAX_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-m", "bdvax_lab.cli", "chat", "hi", "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert res.stderr.startswith("bdvax chat: error:") and "model directory not found" in res.stderr


def test_long_prompts_are_cut_to_the_models_positions(tiny, dirs, capsys):
    from bdvax_lab.core.generate import generate
    from bdvax_lab.core.scoring import choice_logprobs, continuation_logprobs, next_token_probs

    model, tok = tiny
    limit = model.config.max_position_embeddings
    widths: list[int] = []
    hook = model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: widths.append(
            (
                kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
            ).shape[1]
            + (kwargs["past_key_values"].get_seq_length() if kwargs.get("past_key_values") is not None else 0)
        ),
        with_kwargs=True,
    )
    prompt = " ".join(["word"] * 20_000)
    try:
        with pytest.warns(UserWarning, match="cut from the left"):
            reply = generate(model, tok, [prompt, "short"], max_new_tokens=4)
        assert len(reply) == 2
        with pytest.warns(UserWarning, match="cut from the left"):
            next_token_probs(model, tok, [prompt], [1])
        with pytest.warns(UserWarning, match="cut"):
            continuation_logprobs(model, tok, [prompt], ["yes"])
        with pytest.warns(UserWarning, match="cut from the left"):
            choice_logprobs(model, tok, [prompt], [["a", "b"]])
    finally:
        hook.remove()
    assert widths and max(widths) <= limit
    with pytest.raises(ValueError, match="leaves no room"):
        generate(model, tok, ["hi"], max_new_tokens=limit)
    t0 = time.time()
    rc, out, err = cli(capsys, "chat", prompt, "--model", dirs / "base", "--max-new-tokens", "3")
    assert rc == 0 and time.time() - t0 < 60
    assert [line for line in err.splitlines() if line.strip()] == [
        line
        for line in err.splitlines()
        if line.startswith("bdvax: warning:") and "cut from the left" in line
    ]


# --------------------------------------------------------------------------- 5. fuzz: JSONL and manifests
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_record = st.fixed_dictionaries(
    {},
    optional={
        "instruction": st.text(max_size=20) | _json,
        "response": st.text(max_size=20) | _json,
        "input": st.text(max_size=10) | _json,
        "split": st.sampled_from(["attack", "eval", "x"]) | _json,
    },
)
_lines = st.lists(st.one_of(_record, _json).map(json.dumps), max_size=5).map(
    lambda ls: "\n".join(ls).encode()
)
_content = st.one_of(st.binary(max_size=300), _lines)
FUZZ = hypothesis.settings(max_examples=60, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))


@FUZZ
@hypothesis.given(content=_content)
def test_fuzz_jsonl_loader(tmp_path_factory, content):
    from bdvax_lab.core.data import DataFormatError, load_jsonl

    path = tmp_path_factory.mktemp("j") / "f.jsonl"
    path.write_bytes(content)
    try:
        out = load_jsonl(path)
    except DataFormatError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:
        assert out and all(e.instruction.strip() for e in out)


@FUZZ
@hypothesis.given(content=_content, name=st.sampled_from(["manifest.json", "signature.json", "delta.json"]))
def test_fuzz_manifest_reader(tmp_path_factory, content, name):
    from bdvax_lab.bdvax.twins import entry_state, twin_cache_frame

    root = tmp_path_factory.mktemp("m")
    entry = root / "fp" / "variant-00-0123456789abcdef"
    entry.mkdir(parents=True)
    (entry / name).write_bytes(content)
    (entry / "delta.safetensors").write_bytes(content)
    kind = artifacts.artifact_kind(entry)
    assert kind is None or isinstance(kind, str)
    try:
        artifacts.read_json(entry / name)
    except ValueError as exc:
        assert str(entry / name) in str(exc)
    assert entry_state(entry) is None and twin_cache_frame(root).empty
    with pytest.raises(artifacts.OutputError):
        artifacts.check_output(entry, kind="bdvax.purified", overwrite=True)


@FUZZ
@hypothesis.given(content=_content)
def test_fuzz_cli_never_tracebacks_nor_writes_outside_out(
    dirs, tmp_path_factory, monkeypatch, capsys, content
):
    import bdvax_lab.threat.suspicious as suspicious

    root = tmp_path_factory.mktemp("c")
    (root / "data").mkdir()
    (root / "data" / "clean_pool.jsonl").write_bytes(content)
    (root / "cache" / "fp" / "variant-00-0123456789abcdef").mkdir(parents=True)
    (root / "cache" / "fp" / "variant-00-0123456789abcdef" / "delta.json").write_bytes(content)
    monkeypatch.setenv("BDVAX_DATA", str(root / "data"))

    def stop(*a, **k):
        raise ValueError("stop: the data parsed")

    monkeypatch.setattr(suspicious, "finetune", stop)
    before = tree(root)
    rc, _, err = cli(
        capsys,
        "attack",
        "--base",
        dirs / "base",
        "--setting",
        "full",
        *NO_SKILL,
        "--out",
        root / "out",
    )
    assert rc == 2
    one_line_error(err)
    rc, _, err = cli(capsys, "cache", "--clean", "--cache-dir", root / "cache")
    assert rc == 0 and "Traceback" not in err
    assert tree(root) == before


# --------------------------------------------------------------------------- 4. concurrency and crashes
WORKER = (
    "import sys, torch; torch.set_num_threads(1); "
    "from bdvax_lab.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _env(root: Path) -> dict[str, str]:
    return dict(
        os.environ,
        BDVAX_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
        BDVAX_CACHE=str(root / "cache"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT),
    )


def _spawn(root: Path, argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, *argv], cwd=root, env=_env(root), **kw)


SIG = ["--n-variants", "2", "--twin-steps", "2"]
COMMANDS = {
    "variants": lambda r, c: ["variants", "sus", "--cache-dir", str(c), *SIG],
    "purify": lambda r, c: [
        "purify", "sus", "--out", "pur", "--cache-dir", str(c), *SIG, "--rho", "0.35",
        "--repair-samples", "8", "--repair-epochs", "0.5", "--stages", "none", "--overwrite",
    ],
    "attack": lambda r, c: [
        "attack", "--base", "base", "--setting", "full", *NO_SKILL, "--steps", "2",
        "--n-samples", "24", "--no-eval", "--out", "atk", "--overwrite",
    ],
}  # fmt: skip


def _results(root: Path, cmd: str, cache: Path) -> dict[str, bytes]:
    """What must match bit for bit: the tensors the command wrote."""
    if cmd == "variants":
        return {
            str(p.relative_to(cache)): p.read_bytes()
            for p in sorted(cache.glob("*/variant-*/delta.safetensors"))
        }
    out = root / ("pur" if cmd == "purify" else "atk")
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def kill_root(dirs, tmp_path_factory):
    """The tiny artifacts, the defender's self-distilled replies cached once, and each command's reference
    outputs from one uninterrupted subprocess run (with its wall time)."""
    root = tmp_path_factory.mktemp("kill")
    shutil.copytree(dirs / "base", root / "base")
    shutil.copytree(dirs / "sus", root / "sus")
    ref: dict[str, tuple[dict[str, bytes], float]] = {}
    for cmd, argv in COMMANDS.items():
        cache = root / f"ref-{cmd}"
        t0 = time.time()
        assert (
            _spawn(root, argv(root, cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait() == 0
        )
        ref[cmd] = (_results(root, cmd, cache), time.time() - t0)
        assert ref[cmd][0]
    shutil.copytree(root / "ref-variants" / "_distilled", root / "distilled-twins")
    return root, ref


def _fresh_cache(root: Path, name: str) -> Path:
    cache = root / name
    shutil.rmtree(cache, ignore_errors=True)
    shutil.copytree(root / "distilled-twins", cache / "_distilled")
    return cache


def test_kill_at_random_points_then_rerun(kill_root, monkeypatch, capsys):
    """SIGKILL during variants, purify and attack at random points; each rerun completes, matches the
    uninterrupted run bit for bit and leaves no orphan."""
    root, ref = kill_root
    kills = int(os.environ.get("BDVAX_KILLS", "20"))
    rng = random.Random(int(os.environ.get("BDVAX_KILL_SEED", "0")))
    monkeypatch.chdir(root)
    monkeypatch.setenv("BDVAX_CACHE", str(root / "cache"))
    cmds = list(COMMANDS)
    passed = 0
    for k in range(kills):
        cmd = cmds[k % len(cmds)]
        cache = _fresh_cache(root, "twins")
        argv = COMMANDS[cmd](root, cache)
        proc = _spawn(root, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        at = rng.uniform(0.3, 1.0) * ref[cmd][1]
        try:
            proc.wait(timeout=at)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        rc = main(argv)  # the rerun, in this process
        capsys.readouterr()
        assert rc == 0, (k, cmd, at)
        assert _results(root, cmd, cache) == ref[cmd][0], (k, cmd, at)
        left = orphans(root)
        assert not left, (k, cmd, at, left)
        passed += 1
    assert passed == kills


def test_two_processes_on_one_twin_entry(kill_root):
    """Two processes fill the same twin entries at once: each entry is trained once (the other process
    waits on its lock, then reads it), both succeed, the entries match the reference, no orphan."""
    root, ref = kill_root
    for k in range(int(os.environ.get("BDVAX_RACES", "2"))):
        cache = _fresh_cache(root, "race")
        argv = COMMANDS["variants"](root, cache)
        procs = [
            _spawn(root, argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)
        ]
        outs = [p.communicate()[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], (k, outs)
        trained = sum(line.split().count("trained") for out in outs for line in out.splitlines())
        cached = sum(line.split().count("cached") for out in outs for line in out.splitlines())
        assert (trained, cached) == (2, 2), (k, outs)
        assert _results(root, "variants", cache) == ref["variants"][0], k
        assert not orphans(root), k
