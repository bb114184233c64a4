"""Ray as the execution engine (issue 33, item 1), on the tiny model with one local 2-CPU cluster.

Twins as Ray tasks fill the same cache as the local executor, bit for bit; a task whose worker dies
mid-write is retried and leaves no half-written entry; a purify afterwards trains nothing; entries can
come back through the object store; bench units run as tasks; a missing extra or a bad address is one
line. Skipped without the ``ray`` extra (``pip install -e .[ray]``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ray = pytest.importorskip("ray")

import bdvax_lab.bdvax.twin_tasks as twin_tasks  # noqa: E402
import bdvax_lab.bdvax.twins as twins_mod  # noqa: E402
from bdvax_lab.bdvax.config import SignatureConfig  # noqa: E402
from bdvax_lab.bdvax.signature import compute_signature  # noqa: E402
from bdvax_lab.bdvax.twins import entry_state, plan_twins, train_twins  # noqa: E402
from bdvax_lab.cli import main  # noqa: E402
from bdvax_lab.core import artifacts  # noqa: E402
from bdvax_lab.core.data import Example  # noqa: E402
from bdvax_lab.core.executor import ExecutorConfig, RayExecutor  # noqa: E402
from bdvax_lab.core.models import make_tiny_model, save_model  # noqa: E402
from bdvax_lab.threat.source import ModelSource  # noqa: E402
from bdvax_lab.training.config import TrainConfig  # noqa: E402
from bdvax_lab.weights.factored import load_delta  # noqa: E402

HERE = Path(__file__).resolve().parent
POOL = [
    Example(f"What is {i} plus {i} today?", f"It is {2 * i}.", meta={"id": f"toy-{i}"}) for i in range(60)
]
TWIN = TrainConfig(mode="lora", steps=2, lr=1e-2, batch_size=4, max_response_tokens=8)
CFG = SignatureConfig(n_variants=3, n_clean=4, twin_train=TWIN)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module: 2 CPUs, no dashboard; workers import this test module."""
    path = os.pathsep.join([str(HERE), str(HERE.parent)])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path, "BDVAX_NUM_THREADS": "1"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny base directory and a LoRA suspicious artifact made from it (both on disk: workers open them)."""
    from bdvax_lab.threat.config import AttackRecipe, EvalConfig
    from bdvax_lab.threat.suspicious import make_suspicious_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ray")
    save_model(*make_tiny_model(), root / "base")
    recipe = AttackRecipe(
        setting="lora",
        n_samples=24,
        train=TrainConfig(mode="lora", steps=2, lr=1e-2),
        eval=EvalConfig(n_prompts=2, utility=()),
    )
    make_suspicious_model(
        recipe=recipe, base=make_tiny_model(), out=root / "sus", evaluate=False, progress=False
    )
    return root


@pytest.fixture(scope="module")
def source(dirs):
    return ModelSource(path=str(dirs / "sus"), base=str(dirs / "base"))


@pytest.fixture(scope="module")
def local_ref(source, tmp_path_factory):
    """The local executor's twins and signature (the reference every Ray run must equal bit for bit)."""
    torch.set_num_threads(1)
    sm = source.open()
    cache = tmp_path_factory.mktemp("local-cache")
    jobs = train_twins(sm, CFG, cache, progress=False, pool=POOL)
    return sm, jobs, compute_signature([j.path for j in jobs], CFG)


def _assert_same_signature(a, b) -> None:
    for part in ("norm_term", "align_term", "head_norm", "head_align"):
        x, y = getattr(a, part), getattr(b, part)
        assert set(x) == set(y), part
        for k in x:
            assert torch.equal(x[k], y[k]), (part, k)
    assert a.selected.keys() == b.selected.keys()
    for k in a.selected:
        assert torch.equal(a.selected[k], b.selected[k]), k


def _orphans(root: Path) -> list[Path]:
    return [
        p
        for p in root.rglob("*")
        if artifacts.parse_tmp_name(p.name) is not None or p.name.endswith((".lock", ".poison"))
    ]


def _assert_clean_cache(jobs) -> None:
    root = jobs[0].path.parent.parent
    assert _orphans(root) == []
    assert not list(jobs[0].path.parent.glob(".shared-*"))  # the driver's marker is gone
    for j in jobs:
        assert entry_state(j.path) == "complete", j.path
        load_delta(j.path)


# --------------------------------------------------------------------------- twins
def test_ray_twins_fill_the_cache_bit_identical_to_local(cluster, source, local_ref, tmp_path):
    sm, ref_jobs, ref_sig = local_ref
    with RayExecutor() as ex:
        jobs = train_twins(sm, CFG, tmp_path, progress=False, pool=POOL, executor=ex, source=source)
    assert [j.status for j in jobs] == ["trained"] * 3
    assert [j.path.name for j in jobs] == [j.path.name for j in ref_jobs]  # same keys: same cache
    _assert_clean_cache(jobs)
    _assert_same_signature(compute_signature([j.path for j in jobs], CFG), ref_sig)
    # a second run with the local executor finds every entry and trains nothing
    calls = []
    real = twins_mod._train_twin
    twins_mod._train_twin = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        again = train_twins(sm, CFG, tmp_path, progress=False, pool=POOL)
    finally:
        twins_mod._train_twin = real
    assert calls == [] and [j.status for j in again] == ["cached"] * 3


def test_sharding_still_splits_the_variants_under_ray(cluster, source, local_ref, tmp_path):
    sm = local_ref[0]
    ex = RayExecutor()
    first = train_twins(sm, CFG, tmp_path, shard="1/2", progress=False, pool=POOL, executor=ex, source=source)
    assert [j.index for j in first] == [1]
    jobs = plan_twins(sm, CFG, tmp_path, pool=POOL)
    assert [j.done for j in jobs] == [False, True, False]


def test_object_store_transfer_writes_entries_on_the_driver(cluster, source, local_ref, tmp_path):
    sm, _, ref_sig = local_ref
    ex = RayExecutor(ExecutorConfig(kind="ray", transfer="object_store"))
    jobs = train_twins(sm, CFG, tmp_path, progress=False, pool=POOL, executor=ex, source=source)
    _assert_clean_cache(jobs)
    _assert_same_signature(compute_signature([j.path for j in jobs], CFG), ref_sig)


def dying_twin_task(source, config, jobs, fingerprint, size, transfer, marker):
    """:func:`twin_tasks.twin_task`, except that variant 0's first attempt writes half of its entry's
    tensor file and then kills its worker process (``os._exit``), as a lost node or the OOM killer
    would; a flag file beside the cache records the attempt."""
    from bdvax_lab.weights import delta_io

    entry = Path(jobs[0]["path"])
    flag = entry.parent.parent / "killed-once"
    if jobs[0]["spec"]["index"] == 0 and not flag.exists():
        flag.write_text(str(os.getpid()))
        real, calls = delta_io.save_tensors, []

        def save_then_die(path, tensors, metadata=None):
            calls.append(path)
            real(path, tensors, metadata)
            if len(calls) == 2:  # the entry itself (the first write is the poisoned twin's .poison)
                with open(path, "r+b") as fh:
                    fh.truncate(os.path.getsize(path) // 2)
                os._exit(1)

        delta_io.save_tensors = save_then_die
    return twin_tasks.twin_task(source, config, jobs, fingerprint, size, transfer, marker)


def test_a_killed_task_is_retried_and_leaves_no_half_written_entry(
    cluster, source, local_ref, tmp_path, monkeypatch
):
    sm, _, ref_sig = local_ref
    monkeypatch.setattr(twin_tasks, "twin_task", dying_twin_task)
    jobs = train_twins(sm, CFG, tmp_path, progress=False, pool=POOL, executor=RayExecutor(), source=source)
    assert (tmp_path / "killed-once").is_file()  # the first attempt did die
    assert jobs[0].status == "resumed"  # the retry reused the poisoned twin the dead worker had saved
    assert [j.status for j in jobs[1:]] == ["trained"] * 2
    _assert_clean_cache(jobs)
    _assert_same_signature(compute_signature([j.path for j in jobs], CFG), ref_sig)


def test_a_task_out_of_retries_is_one_line(cluster, source, local_ref, tmp_path, monkeypatch):
    from bdvax_lab.core.executor import JobFailedError

    def always_dies(*args):
        os._exit(1)

    monkeypatch.setattr(twin_tasks, "twin_task", always_dies)
    ex = RayExecutor(ExecutorConfig(kind="ray", max_retries=0))
    cfg = CFG.replace(n_variants=1)
    with pytest.raises(JobFailedError, match="died on each of 1 attempt"):
        train_twins(local_ref[0], cfg, tmp_path, progress=False, pool=POOL, executor=ex, source=source)


def test_a_worker_refuses_a_model_with_another_fingerprint(source):
    """A worker that opens another model than the driver's (another base or dtype on its node) would train
    it under the driver's cache keys: it refuses (what the task runs first, here in this process)."""
    with pytest.raises(ValueError, match="fingerprint"):
        twin_tasks._open_model(source.to_dict(), "0" * 16)
    twin_tasks._OPEN.clear()


# --------------------------------------------------------------------------- errors
def test_missing_ray_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if the extra were missing
    rc = main(["variants", "nowhere", "--executor", "ray"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "bdvax_lab[ray]" in err and "pip install" in err


@pytest.mark.parametrize(
    "address, needle",
    [("not an address", "expected auto, HOST:PORT"), ("127.0.0.1:1", "no Ray cluster answers")],
)
def test_bad_ray_address_is_one_line(address, needle, capsys):
    rc = main(["variants", "nowhere", "--executor", "ray", "--ray-address", address])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert address in err and needle in err


def test_executor_config_round_trips():
    cfg = ExecutorConfig(kind="ray", address="auto", num_cpus=2, num_gpus=0.5, transfer="object_store")
    assert ExecutorConfig.from_json(cfg.to_json()) == cfg
    src = ModelSource(path="some/dir", base="default", dtype="float32")
    assert ModelSource.from_dict(src.to_dict()) == src


# --------------------------------------------------------------------------- the command line
def test_cli_variants_on_ray_then_purify_trains_nothing_and_prints_the_local_table(
    cluster, dirs, tmp_path, monkeypatch, capsys
):
    """The acceptance path on the tiny model: `bdvax variants --executor ray` fills the cache; `bdvax
    purify` (local executor) then trains no twin and writes the table and signature a local run does."""
    from bdvax_lab.bdvax.signature import Signature
    from bdvax_lab.core.data import save_jsonl

    save_jsonl(POOL, tmp_path / "clean.jsonl")
    sus = str(dirs / "sus")
    common = ["--base", str(dirs / "base"), "--clean-data", str(tmp_path / "clean.jsonl")]
    common += ["--n-variants", "2", "--twin-steps", "2"]
    evaluation = {"n_prompts": 2, "max_new_tokens": 4, "utility": ["ppl"], "n_ppl": 2}
    (tmp_path / "purify.json").write_text(json.dumps({"eval": evaluation}))
    purify = ["--repair-samples", "8", "--repair-epochs", "1", "--config", str(tmp_path / "purify.json")]
    purify += ["--stages", "purified", "--rho", "0.35"]  # a fixed budget: no calibration in this test
    tables = {}
    for kind in ("ray", "local"):
        cache = tmp_path / f"cache-{kind}"
        assert main(["variants", sus, *common, "--cache-dir", str(cache), "--executor", kind]) == 0
        assert "trained" in capsys.readouterr().out
        monkeypatch.setattr(twins_mod, "_train_twin", lambda *a, **k: pytest.fail("purify trained a twin"))
        out = tmp_path / f"purified-{kind}"
        assert main(["purify", sus, *common, "--cache-dir", str(cache), "--out", str(out), *purify]) == 0
        monkeypatch.undo()
        capsys.readouterr()
        report = pd.read_csv(out / "report.csv", index_col=0)
        tables[kind] = (
            report.drop(columns=[c for c in report if "seconds" in c]),
            Signature.load(out / "signature"),
        )
        assert _orphans(cache) == []
    pd.testing.assert_frame_equal(tables["ray"][0], tables["local"][0])  # the same table (but timings)
    _assert_same_signature(tables["ray"][1], tables["local"][1])


# --------------------------------------------------------------------------- the bench
def test_bench_units_run_as_ray_tasks(cluster, dirs, tmp_path):
    from experiments.bench import Bench, BenchConfig

    target = "badnets:refusal:lora:knowledge"
    cfg = BenchConfig(
        targets=(target,),
        headline=(target,),
        implant_seeds=(0, 1),
        defences=("bdvax",),
        n_variants=2,
        twin_steps=2,
        repair_epochs=1.0,
        repair_samples=8,
        n_prompts=2,
        max_new_tokens=2,
        n_skill=2,
        mcq_limit=2,
        n_ppl=2,
        attack_epochs=0.01,
        runs_dir=str(tmp_path / "runs"),
        out_dir=str(tmp_path / "out"),
    )
    logs: list[str] = []
    bench = Bench(cfg, base_dir=str(dirs / "base"), executor="ray", progress=False, log=logs.append)
    df = bench.run()
    assert sorted(zip(df.implant_seed, df.defence)) == [(0, "bdvax"), (0, "none"), (1, "bdvax"), (1, "none")]
    assert sum("2 rows" in line for line in logs) == 2  # one task per unit, each its two rows
    assert Bench(cfg, base_dir=str(dirs / "base"), progress=False).plan().cached.all()  # resumable locally
    assert _orphans(tmp_path / "runs") == []
