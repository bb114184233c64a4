"""Twin-cache size per LoRA variant and peak RSS of scoring, dense (before) vs factored (after).

On the default model (SmolLM2-135M) with a suspicious LoRA adapter (rank 8 on all seven projections, one
training step), one variant's twin pair is trained with a small step budget (``--steps``, default 2: an
entry's size does not depend on the steps) into a fresh twin cache, which stores it factored. Its dense
twin, the entry earlier versions of bdvax_lab wrote (version 1, ``ΔW`` per module in fp32), is the same
delta materialised (bit for bit, ``tests/test_twin_storage.py``). Reported: bytes per variant of both.

Scoring is measured in fresh subprocesses, each scoring ``--n`` (default 6) copies of the entry as Eq. 2's N
variants (the memory does not depend on what the deltas hold): the RSS before scoring (imports done) and the
peak RSS during scoring (``VmHWM`` reset just before it) of

- ``before``: the code before factored storage (``git archive`` of ``--before``, default the parent of the
  commit that added ``bdvax_lab/weights/factored.py``, or ``HEAD`` before that commit) on the dense entries;
- ``after-dense``: this code on the same dense entries (the full setting's streamed path);
- ``after-factored``: this code on the factored entries (the adapter setting's path).

The three sets of scores are compared (largest difference of each term, relative to its largest value).
Wall times are printed but not comparable between machines, nor on a machine shared with other jobs. RSS
varies from run to run with glibc's heap (``--repeats`` runs each scoring several times, interleaved).
``--scoring-only`` skips the model and the twins and scores a random entry of the default model's shapes
(the difference of two rank-8 adapters, factored and dense), into ``results/twin_cache_size-scoring.json``:
the memory depends on the shapes only.

Usage: python benchmarks/twin_cache_size.py [--steps 2] [--n 6] [--repeats 1] [--scoring-only] [--json F]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since start or since the last reset) from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def score_worker(paths: list[str], out: str) -> dict:
    """Score ``paths`` with whichever bdvax_lab is on the path; save the terms to ``out``."""
    import torch

    import bdvax_lab
    from bdvax_lab.bdvax.scores import compute_terms

    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak below is the scoring's own
    t0 = time.time()
    terms = compute_terms(paths)
    seconds = time.time() - t0
    peak = _status_mb("VmHWM")
    torch.save(
        {
            part: {str(k): v for k, v in terms[part].items()}
            for part in ("norm", "align", "head_norm", "head_align")
        },
        out,
    )
    return {
        "package": str(Path(bdvax_lab.__file__).parent),
        "rss_before_scoring_mb": round(before, 1),
        "peak_rss_mb": round(peak, 1),
        "scoring_rss_mb": round(peak - before, 1),
        "scoring_s": round(seconds, 2),
    }


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def _before_ref() -> str:
    added = _git("log", "--diff-filter=A", "--format=%H", "--", "bdvax_lab/weights/factored.py")
    return f"{added.splitlines()[-1]}^" if added else "HEAD"


def _entry_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def build(work: Path, steps: int, tiny: bool = False) -> tuple[Path, Path, dict]:
    """One LoRA variant's twin pair on the default model: (factored entry, dense copy, info)."""
    from bdvax_lab.bdvax.config import SignatureConfig, default_twin_train
    from bdvax_lab.bdvax.twins import train_twins
    from bdvax_lab.core.data import load_pool
    from bdvax_lab.core.models import load_default_model, make_tiny_model
    from bdvax_lab.training.config import TrainConfig
    from bdvax_lab.training.loop import finetune
    from bdvax_lab.weights.delta_io import storage_of
    from bdvax_lab.weights.factored import load_delta

    model, tok = make_tiny_model() if tiny else load_default_model()
    pool = load_pool("variant")  # the shipped pool already has the default model's replies
    sus = finetune(model, tok, pool[-8:], TrainConfig(mode="lora", steps=1, batch_size=4), progress=False)
    cfg = SignatureConfig(
        n_variants=1, family="insult", twin_train=default_twin_train("lora").replace(steps=steps)
    )
    t0 = time.time()
    (job,) = train_twins((sus.model, tok), cfg, work / "cache", progress=False, pool=pool)
    twins_s = time.time() - t0
    assert storage_of(job.path) == "factored", job.path
    dense = work / "dense" / job.path.name
    load_delta(job.path).to_dense().save(dense)  # what earlier versions wrote: version 1, dense fp32
    assert storage_of(dense) == "dense"
    lora = sus.model.peft_config["default"]
    info = {
        "lora_r": lora.r,
        "lora_alpha": lora.lora_alpha,
        "twin_steps": steps,
        "twins_s": round(twins_s, 1),
    }
    return job.path, dense, info


#: SmolLM2-135M's layout (``bdvax info`` on the default model)
SMOLLM2 = {"n_blocks": 30, "hidden": 576, "d_ff": 1536, "n_heads": 9, "n_kv_heads": 3, "head_dim": 64}


def synthetic(work: Path, tiny: bool = False, rank: int = 8) -> tuple[Path, Path, dict]:
    """A random entry of the default model's shapes (the tiny model's with ``tiny``), the difference of two
    rank-``rank`` adapters, factored and dense, for the scoring-only runs (memory depends on shapes only)."""
    import torch

    from bdvax_lab.core.registry import ALL_KINDS, get_spec, layout_of
    from bdvax_lab.weights.delta_io import Factors
    from bdvax_lab.weights.delta_layout import layout_from_summary, layout_summary, module_shape
    from bdvax_lab.weights.factored import FactoredDelta

    if tiny:
        from bdvax_lab.core.models import make_tiny_model

        layout = layout_of(make_tiny_model()[0])
    else:
        spec = get_spec("llama")
        layout = layout_from_summary(
            {"family": "llama", "blocks_path": spec.blocks, "modules": dict(spec.modules), **SMOLLM2}
        )
    g = torch.Generator().manual_seed(0)
    meta = {"setting": "lora", "synthetic": True}
    keys = [(b, k) for b in range(layout.n_blocks) for k in ALL_KINDS]
    fac = {}
    for key in keys:
        o, i = module_shape(layout, key[1])
        parts = ((rank, 2.0, 1), (rank, 2.0, -1))
        fac[key] = Factors(
            torch.randn(o, 2 * rank, generator=g), torch.randn(2 * rank, i, generator=g), parts
        )
    delta = FactoredDelta(fac, layout, meta)
    factored = delta.save(work / "factored" / "variant-00-synthetic")
    dense = delta.to_dense().save(work / "dense" / "variant-00-synthetic")  # the same delta, dense
    return factored, dense, {"layout": layout_summary(layout), "lora_r": rank, "synthetic": True}


def _score(paths: list[Path], out: Path, pythonpath: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import twin_cache_size as b; "
        f"print(json.dumps(b.score_worker({[str(p) for p in paths]!r}, {str(out)!r})))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir()
    )
    if res.returncode:
        raise RuntimeError(f"scoring subprocess failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _max_diff(a: Path, b: Path) -> dict:
    """Per term: max |a − b| over every channel (head), relative to the largest |b| of that term."""
    import torch

    x, y = torch.load(a), torch.load(b)
    out = {}
    for part in x:
        if x[part]:
            diff = max(float((x[part][k].double() - y[part][k].double()).abs().max()) for k in x[part])
            out[part] = diff / max(float(y[part][k].double().abs().max()) for k in y[part])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--steps", type=int, default=2, help="poisoned-twin steps (the size does not depend on it)"
    )
    ap.add_argument("--n", type=int, default=6, help="variants scored (copies of the one entry)")
    ap.add_argument("--repeats", type=int, default=1, help="scoring subprocesses per run (RSS varies)")
    ap.add_argument(
        "--scoring-only",
        action="store_true",
        help="no model, no twins: score random entries of the default model's shapes",
    )
    ap.add_argument("--before", help="git revision of the code before factored storage (default: found)")
    ap.add_argument("--json", help="default results/twin_cache_size.json (-scoring.json with --scoring-only)")
    ap.add_argument("--work", help="working directory (default: a temporary one, removed afterwards)")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model (to check this script)")
    ns = ap.parse_args()
    out_json = Path(
        ns.json or ROOT / "results" / f"twin_cache_size{'-scoring' if ns.scoring_only else ''}.json"
    )
    today = datetime.date.today().isoformat()
    before_ref = ns.before or _before_ref()
    work = Path(ns.work) if ns.work else Path(tempfile.mkdtemp(prefix="twin_cache_size-"))
    try:
        t0 = time.time()
        if ns.scoring_only:
            factored, dense, info = synthetic(work, ns.tiny)
        else:
            factored, dense, info = build(work, ns.steps, ns.tiny)
        old = work / "before"
        old.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", before_ref, "bdvax_lab"], cwd=ROOT, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        runs = {
            "before": ([dense] * ns.n, old),
            "after-dense": ([dense] * ns.n, ROOT),
            "after-factored": ([factored] * ns.n, ROOT),
        }
        scoring: dict[str, list[dict]] = {name: [] for name in runs}
        for rep in range(ns.repeats):  # interleaved, so that a change in the machine's load hits every run
            for name, (paths, pkg) in runs.items():
                scoring[name].append(_score(paths, work / f"{name}.pt", pkg))
                print(f"  scored {name} ({rep + 1}/{ns.repeats})", flush=True)
        assert all(Path(r["package"]).is_relative_to(old) for r in scoring["before"]), scoring["before"]
        diffs = {
            "after-dense vs before": _max_diff(work / "after-dense.pt", work / "before.pt"),
            "after-factored vs before": _max_diff(work / "after-factored.pt", work / "before.pt"),
        }
        sizes = {"dense_bytes": _entry_bytes(dense), "factored_bytes": _entry_bytes(factored)}
        sizes["shrink"] = round(sizes["dense_bytes"] / sizes["factored_bytes"], 2)
        head = _git("rev-parse", "--short", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--", "bdvax_lab"))
        model = "tiny random LLaMA" if ns.tiny else "SmolLM2-135M-Instruct (default model)"
        result = {
            "date": today,
            "model": model + (", random entries of its shapes" if ns.scoring_only else ", adapter setting"),
            **info,
            "n_variants_scored": ns.n,
            "cache_bytes_per_variant": sizes,
            "scoring": scoring,
            "max_rel_score_diff": diffs,
            "code": {
                "before": _git("rev-parse", "--short", before_ref),
                "after": head + ("+dirty" if dirty else ""),
            },
            "total_s": round(time.time() - t0, 1),
            "note": (
                "the machine is shared with another long CPU job: sizes and RSS are comparable, wall "
                "times are not; scoring uses N copies of one variant's entry"
            ),
        }
    finally:
        if not ns.work:
            shutil.rmtree(work, ignore_errors=True)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    mb = lambda b: f"{b / 1e6:.1f} MB"
    span = lambda rs, k, f: "-".join(
        dict.fromkeys(f.format(v) for v in (min(r[k] for r in rs), max(r[k] for r in rs)))
    )
    print(f"\ntwin_cache_size, {today}: {result['model']}, LoRA r={info['lora_r']}, {ns.n} variants scored")
    print(
        f"  cache per variant: dense (before) {mb(sizes['dense_bytes'])}, factored (after) "
        f"{mb(sizes['factored_bytes'])}: {sizes['shrink']:.1f}x smaller"
    )
    print(
        f"  {'scoring run':<16} {'entries':<9} {'RSS before':>10} {'peak RSS':>11} "
        f"{'peak-before':>11} {'wall':>11}  ({ns.repeats} run(s) each: min-max)"
    )
    for name, rs in scoring.items():
        kind = "factored" if name.endswith("factored") else "dense"
        print(
            f"  {name:<16} {kind:<9} {span(rs, 'rss_before_scoring_mb', '{:.0f}'):>7} MB "
            f"{span(rs, 'peak_rss_mb', '{:.0f}'):>8} MB {span(rs, 'scoring_rss_mb', '{:.0f}'):>8} MB "
            f"{span(rs, 'scoring_s', '{:.1f}'):>10}s"
        )
    for name, d in diffs.items():
        print(
            f"  max |score difference| / max |score|, {name}: "
            + ", ".join(f"{k} {v:.1e}" for k, v in d.items())
        )
    print(f"  (shared machine: wall times are not comparable, sizes and RSS are) -> {out_json}")


if __name__ == "__main__":
    main()
