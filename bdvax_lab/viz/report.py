"""``report.html``: one self-contained file a person opens in any browser, offline, to read a defence.

:func:`report_html` is a pure function of tables and figures: the before / suppressed / after table with
95 % intervals and the skill columns, any plotly figures (plotly.js inlined once, so the file needs no
network), a handful of triggered and clean replies per stage, and the run's config, versions and
timings. :func:`write_report` builds it from an artifact directory that ``bdvax purify`` or ``bdvax
defend`` wrote (its ``report.csv``, ``eval_replies.csv``, ``manifest.json``, ``signature/`` or
``intervention.json``) and writes ``report.html`` beside them; a benchmark builds its own with
:func:`report_html` and :func:`save_report`.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

REPORT_FILE = "report.html"

#: table columns in reading order, with their headers; a rate column ``x`` with ``x_lo``/``x_hi`` (or a
#: count to derive a Wilson interval from) is shown as ``value [lo, hi]``
COLUMNS: dict[str, str] = {
    "method": "method",
    "asr": "ASR",
    "false_trigger": "false-trigger",
    "degenerate_triggered": "degenerate (triggered)",
    "degenerate_clean": "degenerate (clean)",
    "skill": "skill",
    "skill_kept": "skill kept",
    "ppl_skill": "ppl (skill)",
    "ppl": "ppl",
    "ppl_text": "ppl (text)",
    "mcq_acc": "MCQ acc",
    "base_drift": "base drift",
    "lr": "lr",
    "train_steps": "train steps",
    "n_prompts": "prompts",
    "eval_seconds": "eval s",
}

#: rates whose interval is derived from a count when the table has none: rate → its count column
_COUNTS = {"false_trigger": "n_prompts", "mcq_acc": "mcq_n", "asr": "n_prompts", "skill": "skill_n"}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1b1b1b;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
.sub{color:#555;margin-top:0}table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
th,td{border:1px solid #ccc;padding:.3rem .55rem;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.l,th.l{text-align:left}.ci{color:#666;font-size:.85em}
table.replies td{text-align:left;max-width:460px;white-space:pre-wrap;word-break:break-word}
.hit{background:#fde8e8}.ok{background:#eef8ee}pre{background:#f7f7f7;padding:.7rem;overflow:auto;
font-size:.82rem;max-height:28rem}.note{color:#555;font-style:italic}figure{margin:1rem 0}
figcaption{color:#444;font-size:.9rem}
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int,)) or (isinstance(value, float) and value.is_integer() and abs(value) >= 10):
        return f"{int(value)}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}"
    return _esc(value)


def _interval(row: Mapping[str, Any], col: str) -> tuple[float, float] | None:
    lo, hi = row.get(f"{col}_lo"), row.get(f"{col}_hi")
    if lo is not None and hi is not None and not pd.isna(lo) and not pd.isna(hi):
        return float(lo), float(hi)
    n = row.get(_COUNTS.get(col, ""))
    value = row.get(col)
    if n is None or value is None or pd.isna(n) or pd.isna(value) or not n:
        return None
    from ..threat.evaluate import wilson_interval

    return wilson_interval(round(float(value) * float(n)), int(n))


def table_html(table: pd.DataFrame, columns: Mapping[str, str] | None = None) -> str:
    """The stage table as HTML: one row per stage (the index), known columns in reading order with their
    headers, rates with a 95 % interval when the table has one or a count to derive it from."""
    columns = dict(columns or COLUMNS)
    df = table.copy()
    if df.index.name is None and "stage" in df.columns:
        df = df.set_index("stage")
    shown = [c for c in columns if c in df.columns and df[c].notna().any()]
    head = "".join(f"<th>{_esc(columns[c])}</th>" for c in shown)
    index_name = _esc(df.index.name or "")
    rows = []
    for idx, row in df.iterrows():
        rec = row.to_dict()
        cells = []
        for c in shown:
            text = _num(rec.get(c))
            ci = _interval(rec, c) if c in _COUNTS or f"{c}_lo" in rec else None
            if ci is not None and text != "–":
                text += f' <span class="ci">[{ci[0]:.2f}, {ci[1]:.2f}]</span>'
            cells.append(f'<td class="l">{text}</td>' if c == "method" else f"<td>{text}</td>")
        rows.append(f'<tr><th class="l">{_esc(idx)}</th>{"".join(cells)}</tr>')
    return (
        f'<table class="stages"><thead><tr><th class="l">{index_name}</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def replies_html(replies: pd.DataFrame | None, n: int = 5) -> str:
    """``n`` triggered and ``n`` clean replies per stage (the first prompts of the evaluation)."""
    if replies is None or not len(replies):
        return '<p class="note">No replies were recorded (no attack to measure, or no stage evaluated).</p>'
    parts = []
    stages = list(dict.fromkeys(replies["stage"])) if "stage" in replies else [None]
    for stage in stages:
        d = replies if stage is None else replies[replies["stage"] == stage]
        d = d.head(n)
        for side, prompt_col in (("triggered", "triggered_prompt"), ("clean", "prompt")):
            reply_col, hit_col = f"{side}_reply", f"{side}_hit"
            if reply_col not in d:
                continue
            body = []
            for _, r in d.iterrows():
                hit = bool(r.get(hit_col, False))
                cls = "hit" if hit else "ok"
                body.append(
                    f'<tr class="{cls}"><td>{_esc(r.get(prompt_col, ""))}</td><td>{_esc(r[reply_col])}</td>'
                    f"<td>{'yes' if hit else 'no'}</td></tr>"
                )
            title = f"{_esc(stage)} — {side}" if stage is not None else side
            parts.append(
                f"<h3>{title}</h3><table class='replies'><thead><tr><th class='l'>prompt</th>"
                "<th class='l'>reply</th><th>behaviour</th></tr></thead>"
                f"<tbody>{''.join(body)}</tbody></table>"
            )
    return "".join(parts)


def _kv_table(data: Mapping[str, Any]) -> str:
    rows = "".join(f'<tr><th class="l">{_esc(k)}</th><td>{_num(v)}</td></tr>' for k, v in data.items())
    return f"<table>{rows}</table>"


def figure_html(figure: Any, *, first: bool) -> str:
    """A plotly figure as a ``<div>``; the first one carries plotly.js itself (inlined: no network)."""
    return figure.to_html(
        full_html=False,
        include_plotlyjs=bool(first),  # plotly.js inlined once
        config={"displaylogo": False, "responsive": True},
    )


def report_html(
    *,
    title: str,
    table: pd.DataFrame,
    replies: pd.DataFrame | None = None,
    figures: Sequence[tuple[str, Any]] = (),
    config: Mapping[str, Any] | None = None,
    versions: Mapping[str, Any] | None = None,
    timings: Mapping[str, Any] | None = None,
    facts: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    n_replies: int = 5,
) -> str:
    """One self-contained HTML page: ``table`` (one row per stage), ``figures`` (``(caption, plotly
    figure)``), ``n_replies`` triggered and clean replies per stage, then ``config``, ``versions`` and
    ``timings``. ``facts`` (source model, fingerprint, defence, …) head the page; ``notes`` are shown as
    they are. Pure: reads nothing, writes nothing."""
    made = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1><p class='sub'>bdvax_lab report, {made}. This file needs no network.</p>",
    ]
    if facts:
        out.append(_kv_table(facts))
    out += [f"<p class='note'>{_esc(n)}</p>" for n in notes]
    out.append("<h2 id='table'>Before and after</h2>")
    out.append(table_html(table) if len(table) else "<p class='note'>No stage was evaluated.</p>")
    out.append(
        "<p class='note'>Rates with a 95 % Wilson interval in brackets. ASR: triggered prompts that show the "
        "behaviour; false-trigger: the same prompts without the key; skill kept: the share of the suspicious "
        "model's skill left.</p>"
    )
    if figures:
        out.append("<h2 id='figures'>Figures</h2>")
        for i, (caption, fig) in enumerate(figures):
            out.append(
                f"<figure>{figure_html(fig, first=i == 0)}<figcaption>{_esc(caption)}</figcaption></figure>"
            )
    out.append(f"<h2 id='replies'>Replies ({n_replies} per stage)</h2>")
    out.append(replies_html(replies, n_replies))
    if timings:
        out.append("<h2 id='timings'>Timings (seconds)</h2>" + _kv_table(timings))
    if versions:
        out.append("<h2 id='versions'>Versions</h2>" + _kv_table(versions))
    if config:
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        out.append(f"<h2 id='config'>Config</h2><pre>{_esc(text)}</pre>")
    out.append("</body></html>")
    return "\n".join(out)


def save_report(path: str | Path, page: str) -> Path:
    """Write ``page`` to ``path`` atomically; returns the path."""
    from ..core.artifacts import atomic_write_text

    path = Path(path)
    atomic_write_text(path, page)
    return path


# --------------------------------------------------------------------------- from an artifact directory
def _read_csv(path: Path, **kw: Any) -> pd.DataFrame | None:
    return pd.read_csv(path, **kw) if path.is_file() else None


def _selection_figure(selected: Mapping[str, Any]) -> Any:
    """Channels a pruning defence zeroed, per block × module (from its ``intervention.json``)."""
    import plotly.graph_objects as go

    from ..core.registry import MLP_KINDS

    counts: dict[tuple[int, str], int] = {}
    for key, idx in selected.items():
        parts = str(key).split(".")
        counts[(int(parts[-2]), parts[-1])] = len(idx)
    blocks = sorted({b for b, _ in counts})
    kinds = [k for k in MLP_KINDS if any(k == kk for _, kk in counts)]
    z = [[counts.get((b, k), 0) for b in blocks] for k in kinds]
    fig = go.Figure(go.Heatmap(z=z, x=blocks, y=kinds, colorscale="Viridis", colorbar={"title": "channels"}))
    fig.update_layout(
        title="Channels zeroed per block × module",
        xaxis={"title": "block"},
        yaxis={"title": "module", "autorange": "reversed"},
        height=150 + 45 * len(kinds),
    )
    return fig


def artifact_figures(path: str | Path) -> list[tuple[str, Any]]:
    """The figures of an artifact: a signature's per-layer score heatmap and channel histogram (purify),
    or the zeroed channels per layer (a pruning defence); none for a defence that selects no channels."""
    path = Path(path)
    figs: list[tuple[str, Any]] = []
    if (path / "signature").is_dir():
        from ..bdvax.signature import Signature
        from .signature_viz import score_heatmap, score_histogram

        sig = Signature.load(path / "signature")
        figs.append(
            (
                "Per-layer signature score (mean S per block × module; cell text: % selected)",
                score_heatmap(sig),
            )
        )
        figs.append(("Channel scores, selected vs not, with the selection threshold", score_histogram(sig)))
    elif (path / "intervention.json").is_file():
        from ..core.artifacts import read_json

        inter = read_json(path / "intervention.json") or {}
        selected = inter.get("selected") if isinstance(inter, dict) else None
        if selected:
            figs.append(("Channels the defence zeroed, per block × module", _selection_figure(selected)))
    return figs


def write_report(path: str | Path, *, title: str | None = None, n_replies: int = 5) -> Path:
    """Build ``report.html`` inside the purified or defended artifact directory ``path``; returns its path."""
    from ..core.artifacts import MANIFEST, read_json

    path = Path(path)
    manifest = read_json(path / MANIFEST)
    if not isinstance(manifest, dict):
        raise ValueError(f"{path / MANIFEST}: not a JSON object")
    table = _read_csv(path / "report.csv", index_col=0)
    if table is None:
        raise FileNotFoundError(f"{path / 'report.csv'}: no such file (not a purified or defended artifact)")
    kind = str(manifest.get("kind", ""))
    method = manifest.get("method") or ("bdvax" if kind.endswith("purified") else kind)
    facts = {
        "defence": method,
        "setting": manifest.get("setting"),
        "source model": manifest.get("source"),
        "source fingerprint": manifest.get("source_fingerprint"),
        "base": manifest.get("base_path") or manifest.get("base"),
        "measured with": ", ".join(f"{k} {v}" for k, v in (manifest.get("evaluated_with") or {}).items())
        or None,
        "peak RSS (MB)": manifest.get("peak_rss_mb"),
    }
    config = {"config": manifest.get("config")}
    if manifest.get("signature_config"):
        config["signature_config"] = manifest["signature_config"]
    page = report_html(
        title=title or f"{method}: {Path(str(manifest.get('source') or path)).name}",
        table=table,
        replies=_read_csv(path / "eval_replies.csv", keep_default_na=False),
        figures=artifact_figures(path),
        config=config,
        versions=manifest.get("versions"),
        timings=manifest.get("timings"),
        facts={k: v for k, v in facts.items() if v is not None},
        n_replies=n_replies,
    )
    return save_report(path / REPORT_FILE, page)
