"""ipywidgets explorers: re-select a signature with sliders, try a selection on the model with one button.

:class:`SignatureExplorer` — sliders for ρ, λ (log scale, with 0), the scope
(per-module / global), the number of attention heads and the score mode
(combined / norm / align). Every change re-selects from the signature's cached
norm and alignment terms (:meth:`Signature.select`, no training: a fraction of
a second on SmolLM2) and redraws a block × module heatmap and the per-block
counts. The "Suppress + repair + ASR" button runs
:func:`~bdvax_lab.bdvax.budget.try_selection` for the current setting on a copy
of the suspicious model (never the user's object): suppress the selected
channels/heads, a *short* clean repair, ASR and false-trigger rate on a small
probe set; the table appears under the button.

The compute helpers behind it work without widgets, in
:mod:`bdvax_lab.bdvax.budget`:

* :func:`~bdvax_lab.bdvax.budget.try_selection` — suppressed (and optionally
  briefly repaired) copy of a suspicious model, evaluated on a probe set: one
  row per stage.
* :func:`~bdvax_lab.bdvax.budget.rho_curve` — the suppression curve of
  ``docs/method.md`` (ASR / false-trigger / utility against ρ) for the
  signature and a random control with the same per-module counts
  (:meth:`Signature.random_control`), before repair by default.

Plots: plotly ``FigureWidget`` when ``anywidget`` is installed (plotly ≥ 6
needs it), otherwise a plain ``Figure`` re-rendered into an ``Output`` widget
on every update; ``explorer.heatmap`` is the figure object in both cases.

Stable hooks for browser tests: every control has a fixed ``description`` and
a CSS class (``bdvax-rho``, ``bdvax-lam``, ``bdvax-scope``, ``bdvax-heads``,
``bdvax-score``, ``bdvax-value``, ``bdvax-repair-steps``, ``bdvax-run``); the
containers are ``bdvax-explorer`` (top level), ``bdvax-heatmap``,
``bdvax-counts``, ``bdvax-summary`` and ``bdvax-result``.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pandas as pd

from ..bdvax.budget import _one_thread, _selection_size, try_selection
from ..viz import signature_viz as sv

#: λ values of the log-scale slider (0 = alignment term off); the signature's own λ is added if missing.
LAM_OPTIONS: tuple[float, ...] = (
    0.0,
    1e-4,
    3e-4,
    1e-3,
    3e-3,
    1e-2,
    3e-2,
    0.1,
    0.3,
    1.0,
    3.0,
    10.0,
    30.0,
    100.0,
)


#: heatmap colourings offered by the explorer (a subset of :data:`signature_viz.HEATMAP_VALUES`).
EXPLORER_VALUES: tuple[str, ...] = ("selected_mass", "mass_share", "frac_selected", "score", "norm", "align")


#: ``description`` and CSS class of every control, for browser tests.
CONTROLS: dict[str, tuple[str, str]] = {
    "rho": ("ρ (rho)", "bdvax-rho"),
    "lam": ("λ (lam)", "bdvax-lam"),
    "scope": ("scope", "bdvax-scope"),
    "heads": ("heads", "bdvax-heads"),
    "score": ("score", "bdvax-score"),
    "value": ("heatmap", "bdvax-value"),
    "repair_steps": ("repair steps", "bdvax-repair-steps"),
    "run": ("Suppress + repair + ASR", "bdvax-run"),
}


CONTAINER_CLASSES = {
    "widget": "bdvax-explorer",
    "heatmap": "bdvax-heatmap",
    "counts": "bdvax-counts",
    "summary": "bdvax-summary",
    "result": "bdvax-result",
}

#: CSS class of the ρ calibration curve's container (present only when the explorer has a calibration)
CALIBRATION_CLASS = "bdvax-calibration"


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with ipykernel
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


@functools.lru_cache(maxsize=1)
def has_figure_widget() -> bool:
    """True when plotly's ``FigureWidget`` can be built (plotly ≥ 6 needs ``anywidget``)."""
    try:
        import plotly.graph_objects as go

        go.FigureWidget()
        return True
    except Exception:  # ImportError from plotly's missing_anywidget stub, or a broken install
        return False


def _sync_figure(target: Any, new: Any) -> None:
    """Make ``target`` (Figure or FigureWidget) show ``new``, in place (one message for a FigureWidget)."""
    ctx = target.batch_update() if hasattr(target, "batch_update") else contextlib.nullcontext()
    same = len(target.data) == len(new.data) and all(a.type == b.type for a, b in zip(target.data, new.data))
    with ctx:
        if same:
            for a, b in zip(target.data, new.data):
                a.update(b.to_plotly_json(), overwrite=True)
        else:
            target.data = ()
            target.add_traces(list(new.data))
        target.layout.update(new.layout.to_plotly_json(), overwrite=True)


def _display_output(obj: Any) -> dict[str, Any]:
    """One nbformat ``display_data`` output for an Output widget's ``outputs`` trait.

    Plotly figures become the ``application/vnd.plotly.v1+json`` bundle JupyterLab renders; DataFrames HTML
    tables; strings HTML. Setting ``Output.outputs`` directly (instead of ``with output: display(...)``) keeps
    the kernel from asking the frontend to capture outputs, which made nbclient/papermill miss the cell's
    execute reply until the cell timeout (jupyter/nbclient#312: its Output-widget emulation sends comm
    messages on the shell channel while it waits for the reply).
    """
    from plotly.basedatatypes import BaseFigure

    if isinstance(obj, BaseFigure):
        import plotly.io as pio

        data = dict(pio.renderers["plotly_mimetype"].to_mimebundle(obj.to_dict()))
        title = obj.layout.title.text or "plotly figure"
        data["text/plain"] = f"<plotly figure: {title}>"
    elif isinstance(obj, pd.DataFrame):
        data = {"text/html": obj.to_html(), "text/plain": obj.to_string()}
    else:
        data = {"text/html": str(obj), "text/plain": str(obj)}
    return {"output_type": "display_data", "data": data, "metadata": {}}


def _show(output: Any, *objs: Any) -> None:
    """Replace an Output widget's content with ``objs`` (see :func:`_display_output`)."""
    output.outputs = tuple(_display_output(o) for o in objs)


class _Plot:
    """A figure slot: a FigureWidget when available, else a Figure shown in an Output widget."""

    def __init__(self, fig: Any, css: str, use_widget: bool | None = None) -> None:
        import ipywidgets as w
        import plotly.graph_objects as go

        use_widget = has_figure_widget() if use_widget is None else use_widget
        self.output = None
        if use_widget:
            self.figure = go.FigureWidget(fig)
            inner = self.figure
        else:
            self.figure = fig
            self.output = w.Output(layout=w.Layout(width="100%"))
            inner = self.output
        self.box = w.VBox([inner], layout=w.Layout(width="100%"))
        self.box.add_class(css)
        self.render()

    def update(self, fig: Any) -> None:
        _sync_figure(self.figure, fig)
        self.render()

    def render(self) -> None:
        if self.output is not None:  # a FigureWidget redraws itself
            _show(self.output, self.figure)


class SignatureExplorer:
    """Interactive re-selection of a :class:`~bdvax_lab.signature.Signature` (see the module docstring).

    Parameters: ``sig`` (a Signature, selected or not); ``suspicious`` (a
    SuspiciousModel, (model, tokenizer) or path; needed for the button only);
    ``probe_prompts`` (held-out prompts for the button's ASR; default: the first
    ``n_prompts`` of the eval split); ``attack``/``task`` (evaluation only;
    default: the suspicious manifest's); ``repair_steps`` (the button's repair
    budget, default 20 steps, well under a minute on SmolLM2); ``repair_data`` (default: the
    pool's repair split); ``max_heads`` caps the heads slider. ``calibration``: a
    :class:`~bdvax_lab.bdvax.calibration.CalibrationResult` (default: the one a ``rho="auto"`` purification
    stored in the signature's meta); when there is one, its curve is drawn beside the sliders, with the
    slider's ρ marked, and the slider starts at the calibrated ρ.

    State for code and tests: ``controls`` (dict of widgets by name),
    ``signature`` (the current selection), ``heatmap`` (the heatmap figure:
    FigureWidget or Figure), ``counts`` (per-block counts DataFrame, see
    :func:`signature_viz.layer_counts`), ``counts_figure``, ``result`` (the last
    button table), ``history`` (one row per button run and stage),
    ``last_update_seconds``, ``widget`` (the box to display). ``update(**values)``
    sets controls and re-selects once; ``run()`` is the button's action.
    """

    def __init__(
        self,
        sig: Any,
        suspicious: Any = None,
        probe_prompts: Sequence[Any] | None = None,
        attack: Any = None,
        task: Any = None,
        *,
        n_prompts: int = 16,
        repair_steps: int = 20,
        repair_data: Sequence[Any] | None = None,
        eval_config: Any = None,
        max_heads: int = 64,
        heatmap_value: str = "selected_mass",
        figure_widget: bool | None = None,
        calibration: Any = None,
    ) -> None:
        import ipywidgets as w

        from ..bdvax.calibration import calibration_of

        self.base = sig
        self.suspicious = suspicious
        self.probe_prompts = list(probe_prompts) if probe_prompts is not None else None
        self.attack, self.task = attack, task
        self.n_prompts = n_prompts
        self.repair_data = repair_data
        self.eval_config = eval_config
        self.result: pd.DataFrame | None = None
        self.history = pd.DataFrame()
        self.last_update_seconds = 0.0
        self._baseline: dict[str, Any] | None = None
        self._scored: dict[tuple[str, float], Any] = {}
        self._hold = False

        cur = dict(sig.selection or {}) if getattr(sig, "selected", None) is not None else {}
        cfg = sig.config
        self.calibration = calibration if calibration is not None else calibration_of(sig)
        if "rho" in cur:
            rho = float(cur["rho"])
        elif self.calibration is not None:
            rho = float(self.calibration.rho)
        else:  # the config's ρ; rho="auto" without a calibration: the default
            auto = isinstance(cfg.rho, str)
            rho = float((cfg.replace(rho=None) if auto else cfg).resolved_rho(getattr(sig, "setting", None)))
        lam = float(cur.get("lam", cfg.lam))
        lams = sorted(set(LAM_OPTIONS) | {lam})
        n_total_heads = sum(int(t.numel()) for t in sig.head_norm.values())
        heads_max = min(int(max_heads), n_total_heads)
        heads = min(int(cur.get("heads", cfg.heads)), heads_max)
        style = {"description_width": "90px"}

        def css(widget: Any, name: str) -> Any:
            widget.add_class(CONTROLS[name][1])
            return widget

        c: dict[str, Any] = {}
        c["rho"] = css(
            w.FloatSlider(
                value=rho,
                min=0.0,
                max=1.0,
                step=0.01,
                description=CONTROLS["rho"][0],
                readout_format=".2f",
                continuous_update=False,
                style=style,
                tooltip="fraction of MLP channels selected",
            ),
            "rho",
        )
        c["lam"] = css(
            w.SelectionSlider(
                options=[(f"{v:g}", v) for v in lams],
                value=lam,
                description=CONTROLS["lam"][0],
                continuous_update=False,
                style=style,
                tooltip="weight λ of the alignment term (log scale; 0 = norm only)",
            ),
            "lam",
        )
        c["scope"] = css(
            w.ToggleButtons(
                options=[("per-module", "module"), ("global", "global")],
                value=cur.get("scope", cfg.scope),
                description=CONTROLS["scope"][0],
                style=style,
                tooltips=["top ρ within each (block, kind)", "top ρ over all MLP channels"],
            ),
            "scope",
        )
        c["heads"] = css(
            w.IntSlider(
                value=heads,
                min=0,
                max=max(heads_max, 0),
                step=1,
                description=CONTROLS["heads"][0],
                continuous_update=False,
                style=style,
                disabled=heads_max == 0,
                tooltip="top-h attention heads over the whole model",
            ),
            "heads",
        )
        c["score"] = css(
            w.Dropdown(
                options=[
                    ("combined (norm + λ·align)", "combined"),
                    ("norm only", "norm"),
                    ("alignment only", "align"),
                ],
                value=cur.get("score", cfg.score),
                description=CONTROLS["score"][0],
                style=style,
            ),
            "score",
        )
        c["value"] = css(
            w.Dropdown(
                options=[(sv.HEATMAP_VALUES[v], v) for v in EXPLORER_VALUES],
                value=heatmap_value,
                description=CONTROLS["value"][0],
                style=style,
            ),
            "value",
        )
        c["repair_steps"] = css(
            w.BoundedIntText(
                value=int(repair_steps),
                min=0,
                max=10_000,
                description=CONTROLS["repair_steps"][0],
                style=style,
                layout=w.Layout(width="200px"),
            ),
            "repair_steps",
        )
        c["run"] = css(
            w.Button(
                description=CONTROLS["run"][0],
                button_style="warning",
                icon="play",
                layout=w.Layout(width="240px"),
                tooltip="suppress the current selection in a copy of the model, repair briefly, "
                "measure ASR on the probe prompts",
                disabled=suspicious is None,
            ),
            "run",
        )
        self.controls = c

        with _one_thread():
            self.signature = self._select()
        self.summary = w.HTML(self._summary_html())
        self.summary.add_class(CONTAINER_CLASSES["summary"])
        self._heat = _Plot(
            sv.score_heatmap(self.signature, c["value"].value), CONTAINER_CLASSES["heatmap"], figure_widget
        )
        self._counts = _Plot(
            sv.layer_counts_figure(self.signature), CONTAINER_CLASSES["counts"], figure_widget
        )
        self.counts = sv.layer_counts(self.signature)
        self.output = w.Output(layout=w.Layout(width="100%"))
        self.output.add_class(CONTAINER_CLASSES["result"])
        self.status = w.HTML(
            ""
            if suspicious is not None
            else "<i>pass suspicious=... to enable the suppress + repair + ASR button</i>"
        )

        for name in ("rho", "lam", "scope", "heads", "score", "value"):
            c[name].observe(self._on_change, names="value")
        c["run"].on_click(self._on_run)

        controls: Any = w.VBox([c["rho"], c["lam"], c["scope"], c["heads"], c["score"], c["value"]])
        self._calib = None
        if self.calibration is not None:  # the leave-one-variant-out curve beside the sliders
            self._calib = _Plot(self._calibration_figure(), CALIBRATION_CLASS, figure_widget)
            controls = w.HBox([controls, self._calib.box])
        action = w.HBox([c["repair_steps"], c["run"], self.status])
        self.widget = w.VBox([controls, self.summary, self._heat.box, self._counts.box, action, self.output])
        self.widget.add_class(CONTAINER_CLASSES["widget"])

    # ------------------------------------------------------------------ state
    @property
    def heatmap(self) -> Any:
        """The heatmap figure (plotly FigureWidget, or Figure rendered into an Output widget)."""
        return self._heat.figure

    @property
    def counts_figure(self) -> Any:
        return self._counts.figure

    @property
    def calibration_figure(self) -> Any:
        """The ρ calibration curve beside the sliders (None without a calibration)."""
        return None if self._calib is None else self._calib.figure

    def _calibration_figure(self) -> Any:
        from .calibration_figures import calibration_figure

        rho = float(self.controls["rho"].value)
        return calibration_figure(self.calibration, current_rho=rho, height=320)

    @property
    def settings(self) -> dict[str, Any]:
        """The current control values that define the selection."""
        c = self.controls
        return {
            "rho": float(c["rho"].value),
            "lam": float(c["lam"].value),
            "scope": c["scope"].value,
            "heads": int(c["heads"].value),
            "score": c["score"].value,
        }

    def _select(self) -> Any:
        s = self.settings
        key = (s["score"], s["lam"])
        scored = self._scored.get(key)
        if scored is None:  # S for this (score, λ) computed once; ρ / scope / heads changes reuse it
            scored = self.base.select(rho=0.0, heads=0, score=s["score"], lam=s["lam"])
            self._scored[key] = scored
        return scored.select(rho=s["rho"], scope=s["scope"], heads=s["heads"])

    def _setting_html(self) -> str:
        sig = self.signature
        n_ch, n_hd = _selection_size(sig)
        total = sum(int(t.numel()) for t in sig.norm_term.values())
        s = self.settings
        return (
            f"<b>{n_ch}</b> of {total} MLP channels selected ({n_ch / max(1, total):.1%}), "
            f"<b>{n_hd}</b> heads"
            f" · ρ={s['rho']:.2f}, {s['scope']} scope, {s['score']}"
            f"{', λ=' + format(s['lam'], 'g') if s['score'] == 'combined' else ''}"
        )

    def _summary_html(self) -> str:
        return (
            f"{self._setting_html()} · re-selected in {1000 * self.last_update_seconds:.0f} ms "
            "(cached scores, no training)"
        )

    def update(self, **values: Any) -> Any:
        """Set any of rho, lam, scope, heads, score, value (without intermediate redraws), re-select, redraw.

        Returns the new selected Signature (also ``self.signature``).
        """
        unknown = set(values) - {"rho", "lam", "scope", "heads", "score", "value"}
        if unknown:
            raise ValueError(f"unknown control(s) {sorted(unknown)}")
        with self._holding():
            for k, v in values.items():
                if k == "lam" and float(v) not in [x for _, x in self.controls["lam"].options]:
                    raise ValueError(f"lam={v} is not on the slider; choose one of {LAM_OPTIONS}")
                self.controls[k].value = float(v) if k in ("rho", "lam") else v
        return self._refresh()

    @contextlib.contextmanager
    def _holding(self) -> Iterator[None]:
        prev, self._hold = self._hold, True
        try:
            yield
        finally:
            self._hold = prev

    def _on_change(self, _change: Any = None) -> None:
        if not self._hold:
            self._refresh()

    def _refresh(self) -> Any:
        t = time.time()
        with _one_thread():
            self.signature = self._select()
        self.last_update_seconds = time.time() - t
        self.counts = sv.layer_counts(self.signature)
        self._heat.update(sv.score_heatmap(self.signature, self.controls["value"].value))
        self._counts.update(sv.layer_counts_figure(self.signature))
        if self._calib is not None:
            self._calib.update(self._calibration_figure())
        self.summary.value = self._summary_html()
        return self.signature

    # ------------------------------------------------------------------ the button
    def run(self, repair_steps: int | None = None) -> pd.DataFrame:
        """The button's action: suppress the selection in a copy of the model, repair briefly, measure.

        Returns (and stores in ``result``) the per-stage table of :func:`try_selection`;
        appends it to ``history`` with the selection settings.
        """
        if self.suspicious is None:
            raise ValueError(
                "SignatureExplorer: no suspicious model given (SignatureExplorer(sig, suspicious=...))"
            )
        steps = int(self.controls["repair_steps"].value if repair_steps is None else repair_steps)
        df = try_selection(
            self.suspicious,
            self.signature,
            prompts=self.probe_prompts,
            n_prompts=self.n_prompts,
            attack=self.attack,
            task=self.task,
            repair_steps=steps,
            repair_data=self.repair_data,
            eval_config=self.eval_config,
            baseline=self._baseline,
        )
        self._baseline = df.loc["suspicious"].to_dict()
        self.result = df
        run_id = int(self.history["run"].max()) + 1 if len(self.history) else 0
        hist = df.reset_index().assign(run=run_id, **self.settings)
        self.history = pd.concat([self.history, hist], ignore_index=True)
        return df

    def _on_run(self, _button: Any = None) -> None:
        import traceback

        btn = self.controls["run"]
        btn.disabled = True
        self.status.value = "<i>running: copy → suppress → repair → ASR …</i>"
        t = time.time()
        try:
            df = self.run()
            self.status.value = f"done in {time.time() - t:.0f} s"
            shown: list[Any] = [f"<b>this setting</b>: {self._setting_html()}", df]
            if self.history["run"].nunique() > 1:
                shown += ["<b>all runs</b>", self.history[self.history.stage != "suspicious"]]
            _show(self.output, *shown)
        except Exception as exc:
            self.status.value = f"<span style='color:#c00'>failed: {type(exc).__name__}: {exc}</span>"
            self.output.outputs = (
                {"output_type": "stream", "name": "stderr", "text": traceback.format_exc()},
            )
            if not _in_kernel():
                raise
        finally:
            btn.disabled = False

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
