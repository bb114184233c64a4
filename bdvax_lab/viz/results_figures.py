"""Saved reproduction results: read the CSVs ``benchmarks/reproduce.py`` wrote, and draw their figures.

``python benchmarks/reproduce.py --preset smoke|full`` writes one CSV per table (``table2_asr.csv``,
``table10_rho.csv``, ...) and a ``config.json`` under ``results/reproduce/<preset>/``. Nothing here trains
or evaluates: notebook 05 renders those files in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

PRESET_ORDER: tuple[str, ...] = ("full", "smoke")


@dataclass
class SavedResults:
    """One preset's tables as written by a reproduction run."""

    path: Path
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def preset(self) -> str:
        return self.path.name

    @property
    def rows_measured(self) -> dict[str, tuple[int, int]]:
        """table → (rows measured, rows in the preset); empty when ``config.json`` is missing."""
        return {t: (int(k), int(n)) for t, (k, n) in self.meta.get("rows_measured", {}).items()}

    @property
    def complete(self) -> bool:
        """Every row of every table measured (a preset run in slices is not, until its last slice)."""
        counts = self.rows_measured
        return bool(counts) and all(k == n for k, n in counts.values())

    def partial(self) -> dict[str, str]:
        """The tables with rows not measured yet: ``{"table2_asr": "40 of 102"}``."""
        return {t: f"{k} of {n}" for t, (k, n) in self.rows_measured.items() if k < n}

    def __repr__(self) -> str:
        partial = f", incomplete: {self.partial()}" if self.partial() else ""
        date = self.meta.get("date", "?")
        return f"SavedResults({str(self.path)!r}: {len(self.tables)} tables, {date}{partial})"


def read_results(results_dir: str | Path, preset: str = "auto") -> SavedResults:
    """Every ``<table>.csv`` under ``results_dir/<preset>/`` and its ``config.json``.

    ``preset="auto"``: the first of :data:`PRESET_ORDER` whose tables are complete (``full`` once its
    last slice is measured), else the first one that has any table at all.
    """
    root = Path(results_dir)
    if preset == "auto":
        found = [_read(root / p) for p in PRESET_ORDER if (root / p).is_dir()]
        found = [r for r in found if r.tables]
        if not found:
            raise FileNotFoundError(
                f"{root}: no saved results in any of {', '.join(p + '/' for p in PRESET_ORDER)}; "
                "run python benchmarks/reproduce.py --preset smoke"
            )
        return next((r for r in found if r.complete), found[0])
    out = _read(root / preset)
    if not out.tables:
        raise FileNotFoundError(f"{out.path}: no CSVs; run python benchmarks/reproduce.py --preset {preset}")
    return out


def _read(path: Path) -> SavedResults:
    import json

    meta_path = path / "config.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    tables = {p.stem: pd.read_csv(p) for p in sorted(path.glob("*.csv"))}
    return SavedResults(path=path, tables=tables, meta=meta)


def variants_figure(df: pd.DataFrame) -> Any:
    """Fig. 2 analogue: ASR and false-trigger after purification vs the number of variants N."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for col, name in (("asr", "ASR"), ("false_trigger", "false-trigger")):
        fig.add_scatter(x=df.n_variants, y=df[col], mode="lines+markers", name=name)
    fig.update_layout(
        title="ASR after BD-VAX vs number of variants N",
        xaxis_title="N (variants)",
        yaxis_title="rate",
        yaxis_range=[-0.02, 1.02],
        template="plotly_white",
    )
    return fig


def pareto_figure(df: pd.DataFrame, utility: str = "mcq_acc") -> Any:
    """Table 10 analogue: ASR vs utility over ρ, the non-dominated points joined."""
    import plotly.graph_objects as go

    d = df.dropna(subset=["asr", utility]).sort_values(utility)
    front, best = [], 2.0
    for _, r in d.sort_values(utility, ascending=False).iterrows():
        if r.asr < best:
            front.append(r)
            best = r.asr
    fig = go.Figure()
    fig.add_scatter(
        x=d[utility],
        y=d.asr,
        mode="markers+text",
        text=[f"ρ={v:g}" for v in d.rho_requested],
        textposition="top center",
        name="ρ",
    )
    if front:
        f = pd.DataFrame(front).sort_values(utility)
        fig.add_scatter(x=f[utility], y=f.asr, mode="lines", name="Pareto front", line={"dash": "dot"})
    fig.update_layout(
        title="BD-VAX over ρ: ASR vs utility",
        xaxis_title=utility,
        yaxis_title="ASR after purification",
        template="plotly_white",
    )
    return fig


def defence_plane(rows: pd.DataFrame) -> pd.DataFrame:
    """One point per defence and target, with ``kept``: the share of the untreated model's utility it keeps.

    Bench rows (``results/bench/rows.csv``) have ``skill_kept`` (the finetune's own skill): ``kept`` is
    it. The reproduction's ``table2_asr`` rows have no skill: ``kept`` is then multiple-choice accuracy
    over the untreated (``defence == "none"``) model's of the same attack, task and setting, and
    ``kept_what`` says which.
    """
    df = rows.copy()
    if "target" not in df:
        df["target"] = df.attack + ":" + df.task + ":" + df.setting
    if "skill_kept" in df and df.skill_kept.notna().any():
        df["kept"], df["kept_what"] = df.skill_kept, "skill kept"
    else:
        ref = df[df.defence == "none"].groupby("target").mcq_acc.mean()
        df["kept"], df["kept_what"] = df.mcq_acc / df.target.map(ref), "MCQ accuracy kept"
    for col in ("kind", "knows", "asr_lo", "asr_hi", "false_trigger"):
        if col not in df:
            df[col] = None
    keys = ["target", "defence"]
    agg = {"asr": "mean", "kept": "mean", "asr_lo": "min", "asr_hi": "max", "false_trigger": "mean"}
    out = df.groupby(keys, sort=False).agg(agg).reset_index()
    first = df.groupby(keys, sort=False)[["kind", "knows", "kept_what"]].first().reset_index()
    return out.merge(first, on=keys)


def defence_comparison_figure(rows: pd.DataFrame) -> Any:
    """ASR against utility kept, one point per defence and target (random's seeds averaged), with the
    ASR interval as an error bar. Defences that know more than BD-VAX (oracle arms) and those that need
    the finetune made differently (``in_training``) say so in their hover text."""
    import plotly.express as px

    d = defence_plane(rows)
    d["asr_plus"] = (d.asr_hi - d.asr).clip(lower=0) if d.asr_hi.notna().any() else None
    d["asr_minus"] = (d.asr - d.asr_lo).clip(lower=0) if d.asr_lo.notna().any() else None
    fig = px.scatter(
        d,
        x="kept",
        y="asr",
        color="defence",
        symbol="target",
        error_y="asr_plus" if d.asr_plus is not None else None,
        error_y_minus="asr_minus" if d.asr_minus is not None else None,
        hover_data=["kind", "knows", "false_trigger"],
        template="plotly_white",
        title="ASR against utility kept, one point per defence and target",
    )
    what = d.kept_what.iloc[0] if len(d) else "utility kept"
    fig.update_layout(
        xaxis_title=f"{what} (higher is better)", yaxis_title="ASR (lower is better)", height=520
    )
    return fig


# =========================================================================== ASR and skill against the budget
#: the defences a budget figure compares (BD-VAX's signature and the two controls at its counts)
BUDGET_DEFENCES: tuple[str, ...] = ("bdvax", "random", "top_delta")


def budget_frame(rows: pd.DataFrame, *, run: str | None = None) -> pd.DataFrame:
    """Bench rows (``experiments/bench.py``'s ``rows.csv``, one run or several concatenated) → one row per
    (target, defence, implant_seed, control_seed, budget) with ``asr`` and ``skill_kept``.

    Expected columns: ``target``, ``defence``, ``implant_seed``, ``control_seed``, ``asr``, ``skill_kept``
    and either ``budget`` or ``rho``. The bench writes ``rho`` on the ``bdvax`` rows only; ``random`` and
    ``top_delta`` use the same per-module counts, so their budget is the ``bdvax`` row's ρ of the same
    (target, implant seed[, ``run``]). ``run`` names a column telling concatenated bench runs apart (e.g.
    one run per ρ); without it each (target, implant seed) must have one ``bdvax`` row.
    """
    need = {"target", "defence", "implant_seed", "asr", "skill_kept"}
    missing = sorted(need - set(rows.columns))
    if missing or not ({"budget", "rho"} & set(rows.columns)):
        raise ValueError(
            f"budget_frame: bench rows need {sorted(need)} and budget or rho; missing {missing or ['rho']}"
        )
    d = rows[rows.defence.isin(BUDGET_DEFENCES)].copy()
    if "control_seed" not in d:
        d["control_seed"] = None
    if "budget" not in d:
        keys = ["target", "implant_seed"] + ([run] if run else [])
        ref = d[d.defence == "bdvax"].dropna(subset=["rho"])
        if ref.duplicated(keys).any():
            raise ValueError(
                f"budget_frame: several bdvax rows per {keys}; pass run=<the column telling the runs apart>"
            )
        d = d.drop(columns=["rho"]).merge(ref[keys + ["rho"]].rename(columns={"rho": "budget"}), on=keys)
    d["defence"] = d.defence.replace({"bdvax": "signature"})
    cols = ["target", "defence", "implant_seed", "control_seed", "budget", "asr", "skill_kept"]
    return d[cols].sort_values(["target", "defence", "budget"], kind="stable").reset_index(drop=True)


def budget_figure(frame: pd.DataFrame, targets: list[str] | None = None) -> Any:
    """ASR (top row) and skill kept (bottom row) against the budget, one column per target: the signature
    and ``top_delta`` as lines (mean over implant seeds), ``random`` as its mean with a min–max band over
    seeds. ``frame``: :func:`budget_frame`'s columns; ``targets``: which (default: every target)."""
    from plotly.subplots import make_subplots

    targets = targets or sorted(frame.target.unique())
    fig = make_subplots(
        rows=2,
        cols=len(targets),
        shared_xaxes=True,
        shared_yaxes=True,
        subplot_titles=targets,
        vertical_spacing=0.08,
    )
    colours = {"signature": "#1f77b4", "random": "#7f7f7f", "top_delta": "#d62728"}
    for c, target in enumerate(targets, start=1):
        d = frame[frame.target == target]
        for r, metric in enumerate(("asr", "skill_kept"), start=1):
            for name in ("signature", "random", "top_delta"):
                g = d[d.defence == name].groupby("budget")[metric].agg(["mean", "min", "max"]).reset_index()
                if g.empty:
                    continue
                legend = c == 1 and r == 1
                if name == "random":
                    fig.add_scatter(
                        x=list(g.budget) + list(g.budget[::-1]),
                        y=list(g["max"]) + list(g["min"][::-1]),
                        fill="toself",
                        line={"width": 0},
                        fillcolor="rgba(127,127,127,0.2)",
                        name="random (seeds: min–max)",
                        legendgroup="band",
                        showlegend=legend,
                        hoverinfo="skip",
                        row=r,
                        col=c,
                    )
                fig.add_scatter(
                    x=g.budget,
                    y=g["mean"],
                    mode="lines+markers",
                    line={"color": colours[name]},
                    name=name,
                    legendgroup=name,
                    showlegend=legend,
                    row=r,
                    col=c,
                )
        fig.update_xaxes(title_text="budget ρ", row=2, col=c)
    fig.update_yaxes(title_text="ASR (lower is better)", range=[-0.02, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="skill kept (higher is better)", row=2, col=1)
    fig.update_layout(template="plotly_white", height=520, title="ASR and skill kept against the budget")
    return fig
