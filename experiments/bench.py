"""The realistic bench: skill-bearing suspicious models × defences and controls × seeds, resumable.

A suspicious model here is a finetune someone wanted: it teaches a skill (``knowledge`` or ``format``,
:mod:`bdvax_lab.threat.skills`) and carries a backdoor in 5 % of its data. Every defence gets the same
things: the model, the defender's own instructions answered by that model (never a base model's replies),
and the repair budget of the paper (200 samples, 5 epochs, its lr). Each row is one defended model,
evaluated on all 200 held-out prompts with and without the key (Wilson intervals), the skill's held-out
items, ground-truth perplexity and multiple-choice accuracy.

Rows are cached as JSON under ``<runs>/bench/<config hash>/rows/``; an interrupted run resumes and
``--targets`` runs slices. ``tables()`` writes ``<out>/rows.csv`` (tidy, every row), ``<out>/table.md``
(one line per target × defence, random as mean ± sd over its seeds) and ``<out>/verdicts.csv`` (where
BD-VAX does and does not beat random, top_delta and discard, by non-overlapping 95 % intervals).
"""

from __future__ import annotations

import ast
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bdvax_lab.baselines.registry import BUILTIN_DEFENCES
from bdvax_lab.core.artifacts import atomic_write_text, read_json, stable_hash, write_json
from bdvax_lab.core.config import Config
from bdvax_lab.threat.evaluate import BACKDOOR_COLUMNS
from bdvax_lab.viz.report import REPORT_FILE, report_html, save_report

SKILLS = ("knowledge", "format")
#: 2 skills × 3 attacks × 2 tasks in the adapter setting, and two full finetunes.
LORA_TARGETS = tuple(
    f"{a}:{t}:lora:{s}" for s in SKILLS for a in ("badnets", "vpi", "ctba") for t in ("refusal", "sentiment")
)
FULL_TARGETS = ("badnets:refusal:full:knowledge", "badnets:sentiment:full:format")
HEADLINE = ("badnets:refusal:lora:knowledge", "badnets:sentiment:lora:format")
#: BD-VAX with ρ chosen by leave-one-variant-out calibration (no trigger)
AUTO_ROW = "bdvax_auto"
#: BD-VAX at the bench's fixed ρ, and with the calibrated one
METHODS = ("bdvax", AUTO_ROW)
#: BD-VAX (both budgets), then every registered control and baseline, in the registry's order
DEFENCES = (*METHODS, *BUILTIN_DEFENCES)
#: The row of the suspicious model whose finetune carried MB-Defense's defensive poison, untreated.
UNTREATED_MB = "none_mb"
# columns a table adds to the cached rows: who the row is (from its path), and what frame() derives
IDENT_COLUMNS = (
    *("target", "attack", "task", "setting", "skill_name"),
    *("implant_seed", "defence", "kind", "control_seed"),
)
DERIVED_COLUMNS = ("skill_kept", "skill_kept_lo", "skill_kept_hi", "ppl_ratio", "ppl_text_ratio")


def _head_counts(sig: Any) -> dict[str, int]:
    """``{"block": n}`` of a selected signature's heads (blocks with none left out)."""
    return {str(b): int(v.numel()) for b, v in (sig.selected_heads or {}).items() if v.numel()}


def row_name(defence: str, control_seed: int | None) -> str:
    """A row's file stem in its unit's cache directory: the defence, with its control seed if it has one."""
    return defence if control_seed is None else f"{defence}-seed{control_seed}"


def parse_row_name(name: str) -> tuple[str, int | None]:
    """Inverse of :func:`row_name`."""
    defence, _, cs = name.partition("-seed")
    return defence, int(cs) if cs else None


#: Figures every row keeps (the evaluation summary's).
METRICS = (
    *BACKDOOR_COLUMNS,
    "n_prompts",
    "skill",
    "skill_lo",
    "skill_hi",
    "skill_n",
    "ppl",
    "ppl_text",
    "ppl_skill",
    "mcq_acc",
)


def parse_target(target: str) -> tuple[str, str, str, str]:
    """``"badnets:refusal:lora:knowledge"`` → (attack, task, setting, skill), with a clear error otherwise."""
    parts = str(target).split(":")
    if len(parts) != 4 or parts[2] not in ("lora", "full") or parts[3] not in SKILLS:
        raise ValueError(
            f"bench target {target!r}: expected attack:task:setting:skill, setting lora|full, skill {SKILLS}"
        )
    return parts[0], parts[1], parts[2], parts[3]


@dataclass
class BenchConfig(Config):
    """Targets, defences, seeds and budgets of one bench. The defaults are the bench of ``RESULTS.md``."""

    targets: tuple[str, ...] = LORA_TARGETS + FULL_TARGETS
    headline: tuple[str, ...] = HEADLINE  #: these get every implant seed, the others the first
    implant_seeds: tuple[int, ...] = (0, 1, 2)
    defences: tuple[str, ...] = DEFENCES
    random_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_variants: int = 6
    rho_lora: float | None = 0.8  #: the demo's ρ (the pipeline as it stands; None = the paper's 0.35)
    rho_full: float | None = None  #: None = the paper's 0.03
    heads: int = 0
    #: head budgets the ``bdvax_auto`` row's calibration also searches (None: ``heads`` only)
    heads_grid: tuple[int, ...] | None = None
    repair_epochs: float = 5.0
    repair_samples: int = 200
    #: share of the repair samples that are inputs of the finetune's own task (unlabelled, answered by
    #: the suspicious model like the rest); 0 = generic instructions only. Every row gets the same data.
    repair_in_domain: float = 0.0
    #: False: no defence repairs (BD-VAX and the selection controls are suppression only); the defences
    #: that are nothing without training are left out (:meth:`applies`)
    repair: bool = True
    n_prompts: int = 200
    max_new_tokens: int = 32
    n_skill: int | None = 200
    mcq_limit: int | None = 200
    n_ppl: int | None = 100
    twin_steps: int | None = None  #: None = the twin recipe's
    attack_epochs: float | None = None  #: None = the skill recipe's
    runs_dir: str = "runs"
    out_dir: str = "results/bench"

    def __post_init__(self) -> None:
        from bdvax_lab.baselines.registry import defences

        for t in (*self.targets, *self.headline):
            parse_target(t)
        known = set(defences()) | set(METHODS)
        bad = [d for d in self.defences if d not in known]
        if bad:
            raise ValueError(f"BenchConfig.defences has unknown {bad}; known: {sorted(known)}")
        self.targets, self.headline, self.defences = (
            tuple(self.targets),
            tuple(self.headline),
            tuple(self.defences),
        )
        self.implant_seeds, self.random_seeds = tuple(self.implant_seeds), tuple(self.random_seeds)
        if not 0.0 <= float(self.repair_in_domain) <= 1.0:
            raise ValueError(f"BenchConfig.repair_in_domain must be in [0, 1], got {self.repair_in_domain}")
        for name in ("rho_lora", "rho_full"):
            r = getattr(self, name)
            if r is not None and not 0.0 < float(r) <= 1.0:
                raise ValueError(f"BenchConfig.{name} must be in (0, 1] or None, got {r}")
        if int(self.heads) < 0:
            raise ValueError(f"BenchConfig.heads must be ≥ 0, got {self.heads}")
        if self.heads_grid is not None:
            from bdvax_lab.bdvax.config import CalibrationConfig

            self.heads_grid = CalibrationConfig(heads=self.heads_grid).heads  # validated, sorted

    def units(self) -> list[tuple[str, int]]:
        """(target, implant seed) pairs in run order: every target at the first seed, then the extra seeds."""
        first = [(t, self.implant_seeds[0]) for t in self.targets]
        extra = [(t, s) for s in self.implant_seeds[1:] for t in self.targets if t in self.headline]
        return first + extra

    def eval_config(self) -> Any:
        from bdvax_lab.threat.config import EvalConfig

        return EvalConfig(
            n_prompts=self.n_prompts,
            max_new_tokens=self.max_new_tokens,
            n_skill=self.n_skill,
            mcq_limit=self.mcq_limit,
            n_ppl=self.n_ppl,
        )

    def repair_config(self) -> Any:
        from bdvax_lab.training.config import RepairConfig

        return RepairConfig(n_samples=self.repair_samples, epochs=self.repair_epochs)

    def repair_instructions(self, skill: str) -> list[Any] | None:
        """The defender's repair instructions for a finetune of ``skill`` (None: the shipped default).

        With ``repair_in_domain`` > 0, that share of the ``repair_samples`` are the skill's task inputs
        (:func:`~bdvax_lab.threat.skills.task_inputs`), the rest the shipped generic ones, in a seeded mix;
        none has a response (the suspicious model answers them: ``Bench._repair_data``)."""
        if not self.repair_in_domain:
            return None
        import random

        from bdvax_lab.core.selfdistill import defender_instructions
        from bdvax_lab.threat.skills import task_inputs

        k = round(self.repair_samples * float(self.repair_in_domain))
        items = defender_instructions("repair")[: self.repair_samples - k] + task_inputs(skill, k)
        random.Random(f"repair-in-domain-{skill}").shuffle(items)
        return items

    def applies(self, defence: str, setting: str) -> bool:
        """Whether ``defence`` runs in ``setting``: BD-VAX everywhere, a control where it can (every setting
        but ``drop_attention``'s), a baseline where the paper evaluates it; fine-pruning not with adapters,
        where it is the random control with one seed."""
        from bdvax_lab.baselines.registry import defences

        if defence in METHODS:
            return True
        spec = defences()[defence]
        if not self.repair and spec.uses_clean_data and not spec.repair_optional:
            return False  # without repair: only what trains nothing or can skip its repair (``finetune``)
        if defence == "fine_prune":
            return setting == "full"
        return setting in spec.paper_settings


def _calibration_fields(cal: Any) -> dict[str, Any]:
    """What a ``bdvax_auto`` row keeps of its calibration: the verdict and the curve (mean held-out ASR
    of the defender's own variants, before repair, per candidate ρ)."""
    curve = cal.summary()[["heads", "rho", "mean_asr", "max_asr", "n_variants"]]
    return {
        "calibration_met": bool(cal.met),
        "calibration_heads": int(cal.heads),
        "calibration_reason": cal.reason,
        "calibration_curve": [
            {k: (int(v) if k in ("heads", "n_variants") else round(float(v), 4)) for k, v in r.items()}
            for r in curve.to_dict(orient="records")
        ],
    }


@dataclass
class Bench:
    """Runs the rows of one :class:`BenchConfig`; :meth:`tables` writes the CSV and the Markdown table."""

    config: BenchConfig = field(default_factory=BenchConfig)
    base: tuple[Any, Any] | None = None  #: a custom base (model, tokenizer), e.g. the tiny test model
    #: a custom base as a directory (opened on first use; what Ray workers get instead of ``base``)
    base_dir: str | None = None
    #: where units run: None / "local" (here, in order) or "ray" / an ExecutorConfig / an Executor (one Ray
    #: task per (target, implant seed) unit; rows, suspicious models and twins go to the same shared dirs)
    executor: Any = None
    progress: bool = True
    log: Callable[[str], None] = print
    _plan: list[dict[str, Any]] | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ storage
    @property
    def rows_dir(self) -> Path:
        """``<runs>/bench/<hash>/rows``: the hash covers every field that changes a number."""
        cfg = self.config.to_dict()
        for where in (
            "runs_dir",
            "out_dir",
            "targets",
            "headline",
            "defences",
            "random_seeds",
            "implant_seeds",
        ):
            cfg.pop(where, None)
        # added later: a bench at their defaults keeps the rows measured before they existed
        for late, default in (("repair_in_domain", 0.0), ("heads_grid", None), ("repair", True)):
            if cfg.get(late) == default:
                cfg.pop(late, None)
        return Path(self.config.runs_dir) / "bench" / stable_hash(cfg, 8) / "rows"

    def unit_dir(self, target: str, seed: int) -> Path:
        """The row cache of one (target, implant seed): a JSON file per row (:func:`row_name`)."""
        return self.rows_dir / f"{target.replace(':', '-')}-seed{seed}"

    def _path(self, target: str, seed: int, name: str) -> Path:
        return self.unit_dir(target, seed) / f"{name}.json"

    def _row(self, target: str, seed: int, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self._path(target, seed, name)
        if self._plan is not None:
            row = read_json(path) if path.exists() else {}
            self._plan.append(
                {
                    "target": target,
                    "seed": seed,
                    "row": name,
                    "cached": bool(row),
                    "seconds": row.get("seconds", {}).get("total") if row else None,
                }
            )
            return row
        if path.exists():
            return read_json(path)
        t0 = time.time()
        row = fn()
        row["seconds"] = {**row.get("seconds", {}), "total": round(time.time() - t0, 1)}
        row["date"] = time.strftime("%Y-%m-%d")
        write_json(path, row)
        self.log(
            f"  {target} seed {seed} {name}: ASR {row.get('asr', math.nan):.2f} "
            f"FTR {row.get('false_trigger', math.nan):.2f} skill {row.get('skill', math.nan):.2f} "
            f"({_stages(row['seconds'])})"
        )
        return row

    # ------------------------------------------------------------------ models
    def suspicious(self, target: str, seed: int, defensive_poison: float = 0.0) -> tuple[Any, dict[str, Any]]:
        """The suspicious model (implanted with the skill recipe if missing) and its implant record.

        ``defensive_poison`` > 0: the same finetune with MB-Defense's defensive poison in its data (the
        ``in_training`` defences' model, its own artifact directory)."""
        import copy

        from bdvax_lab.threat.suspicious import open_or_make_suspicious, suspicious_dir

        attack, task, setting, skill = parse_target(target)
        path = suspicious_dir(
            self.config.runs_dir,
            attack,
            task,
            setting,
            skill=skill,
            seed=seed,
            defensive_poison=defensive_poison,
        )
        t0 = time.time()
        if self.base is None and self.base_dir is not None:
            from bdvax_lab.core.models import open_base, resolve_base

            self.base = open_base(resolve_base(self.base_dir))
        made = not (path / "manifest.json").exists()
        base = (copy.deepcopy(self.base[0]), self.base[1]) if self.base is not None else None
        if made and self.config.attack_epochs is not None:
            from bdvax_lab.threat.config import AttackRecipe, EvalConfig
            from bdvax_lab.threat.suspicious import make_suspicious_model

            recipe = AttackRecipe(
                attack=attack,
                task=task,
                setting=setting,
                skill=skill,
                seed=seed,
                eval=EvalConfig(n_prompts=8, utility=()),
                defensive_poison=defensive_poison,
            )
            recipe.train = recipe.train.replace(epochs=self.config.attack_epochs)
            make_suspicious_model(recipe=recipe, base=base, out=path, progress=self.progress)
            base = (copy.deepcopy(self.base[0]), self.base[1]) if self.base is not None else None
        sm = open_or_make_suspicious(
            path,
            attack,
            task,
            setting,
            base=base,
            skill=skill,
            seed=seed,
            progress=self.progress,
            defensive_poison=defensive_poison,
        )
        implant = {
            "implant_seconds": sm.manifest.get("train_seconds"),
            "made_now": made,
            "open_seconds": round(time.time() - t0, 1),
            "defensive_poison": defensive_poison,
        }
        return sm, implant

    # ------------------------------------------------------------------ rows
    def _repair_data(self, sm: Any, skill: str) -> list[Any] | None:
        """:meth:`BenchConfig.repair_instructions`, the task inputs answered by the suspicious model.

        They get the skill evaluation's reply length (a contact card is up to 35 tokens, past the 32 of
        the generic replies, which purify answers as usual); a truncated card would teach a broken one."""
        items = self.config.repair_instructions(skill)
        if items is None:
            return None
        from bdvax_lab.core.selfdistill import DistillConfig, self_distill
        from bdvax_lab.threat.skills import get_skill

        task = [i for i, e in enumerate(items) if e.meta.get("split") == "task_input"]
        cfg = DistillConfig(
            max_new_tokens=max(DistillConfig().max_new_tokens, get_skill(skill).max_new_tokens)
        )
        answered = self_distill(
            sm.model, sm.tokenizer, [items[i] for i in task], config=cfg, progress=self.progress
        )
        for i, e in zip(task, answered):
            items[i] = e
        return items

    def target_model(self, target: str, seed: int) -> tuple[Any, Any]:
        """``(suspicious model, the bench's signature config)`` of one target and implant seed (what the
        scripts that study one bench model start from)."""
        _, task, setting, _ = parse_target(target)
        sm, _ = self.suspicious(target, seed)
        return sm, self._signature_config(task, setting)

    def _signature_config(self, task: str, setting: str, rho: float | str | None = None) -> Any:
        """The bench's signature recipe; ``rho`` overrides the setting's budget (``"auto"``: calibrated)."""
        from bdvax_lab.bdvax.config import SignatureConfig, default_twin_train
        from bdvax_lab.threat.attacks import resolve_task

        if rho is None:
            rho = self.config.rho_lora if setting == "lora" else self.config.rho_full
        twin = default_twin_train(setting)
        if self.config.twin_steps is not None:
            twin = twin.replace(steps=self.config.twin_steps)
        return SignatureConfig(
            family=resolve_task(task).judge,
            n_variants=self.config.n_variants,
            rho=rho,
            heads=self.config.heads,
            twin_train=twin,
        )

    def _summary(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {k: summary.get(k) for k in METRICS if k in summary}

    def run_unit(self, target: str, seed: int) -> list[dict[str, Any]]:
        """All rows of one suspicious model: untreated, BD-VAX, each defence and control (random per seed)."""
        from bdvax_lab.baselines.registry import defences
        from bdvax_lab.threat.evaluate import evaluate_model

        attack, task, setting, skill = parse_target(target)
        cfg = self.config
        state: dict[str, Any] = {}

        def model(in_training: bool = False) -> Any:
            """The suspicious model; ``in_training``: the one whose finetune carried MB's defensive poison."""
            from bdvax_lab.threat.defensive import FAITHFUL_RATE

            key = "sm_mb" if in_training else "sm"
            if key not in state:
                state[key], implant = self.suspicious(target, seed, FAITHFUL_RATE if in_training else 0.0)
                state["implant_" + key] = implant
            return state[key]

        def untreated(in_training: bool = False) -> dict[str, Any]:
            sm = model(in_training)
            t = time.time()
            rep = evaluate_model(
                sm.model,
                sm.tokenizer,
                attack,
                task,
                cfg.eval_config(),
                skill=skill,
                label="suspicious",
                progress=self.progress,
            )
            return {
                **self._summary(rep.summary),
                **state["implant_" + ("sm_mb" if in_training else "sm")],
                "seconds": {"evaluation": round(time.time() - t, 1)},
            }

        rows = [self._ident(target, seed, "none", None) | self._row(target, seed, "none", untreated)]
        bd = self._row(target, seed, "bdvax", lambda: self._bdvax(model(), attack, task, setting, skill))
        rows.append(self._ident(target, seed, "bdvax", None) | bd)
        if AUTO_ROW in cfg.defences:
            auto = self._row(
                target, seed, AUTO_ROW, lambda: self._bdvax(model(), attack, task, setting, skill, "auto")
            )
            rows.append(self._ident(target, seed, AUTO_ROW, None) | auto)
        for name in cfg.defences:
            if name in METHODS or not cfg.applies(name, setting):
                continue
            for cseed in cfg.random_seeds if name == "random" else (None,):
                row = self._row(
                    target,
                    seed,
                    row_name(name, cseed),
                    lambda n=name, s=cseed: self._defend(
                        model(defences()[n].kind == "in_training"), n, attack, task, skill, bd, s
                    ),
                )
                rows.append(self._ident(target, seed, name, cseed) | row)
        if any(
            defences()[n].kind == "in_training" and cfg.applies(n, setting)
            for n in cfg.defences
            if n not in METHODS
        ):
            # the finetune that carried MB's defensive poison, untreated: what the poison itself did
            row = self._row(target, seed, UNTREATED_MB, lambda: untreated(in_training=True))
            rows.append(self._ident(target, seed, UNTREATED_MB, None) | row)
        state.clear()
        return rows

    def _ident(self, target: str, seed: int, defence: str, cseed: int | None) -> dict[str, Any]:
        from bdvax_lab.baselines.registry import defences

        attack, task, setting, skill = parse_target(target)
        own = {"none": "untreated", UNTREATED_MB: "untreated", **dict.fromkeys(METHODS, "method")}
        kind = own.get(defence) or defences()[defence].kind
        return dict(zip(IDENT_COLUMNS, (target, attack, task, setting, skill, seed, defence, kind, cseed)))

    def _bdvax(
        self, sm: Any, attack: str, task: str, setting: str, skill: str, rho: float | str | None = None
    ) -> dict[str, Any]:
        """BD-VAX's row: the bench's budget, or ``rho`` (``"auto"`` records the calibration's choice)."""
        from bdvax_lab.bdvax.calibration import calibration_of
        from bdvax_lab.bdvax.config import CalibrationConfig, PurifyConfig
        from bdvax_lab.bdvax.purify import purify
        from bdvax_lab.weights.selection import counts_like

        pcfg = PurifyConfig(
            signature=self._signature_config(task, setting, rho),
            # no grid: the bench's own head budget only (the rows measured before the default grid existed)
            calibration=CalibrationConfig(heads=self.config.heads_grid or (self.config.heads,)),
            repair=self.config.repair_config(),
            finetune=self.config.repair,
            eval=self.config.eval_config(),
            evaluate=("purified",),
        )
        res = purify(
            sm,
            self._repair_data(sm, skill),
            config=pcfg,
            attack=attack,
            task=task,
            skill=skill,
            progress=self.progress,
        )
        sig = res.signature
        heads = _head_counts(sig)
        cal = calibration_of(sig)
        return {
            **self._summary(res.report.loc["purified"].to_dict()),
            **(_calibration_fields(cal) if cal is not None else {}),
            "counts": counts_like(sig),
            "head_counts": heads,
            "n_channels": sig.n_selected,
            "n_heads": sum(heads.values()),
            "rho": (sig.selection or {}).get("rho"),
            "lr": res.repair.lr if res.repair is not None else None,
            "repair_steps": res.repair.steps if res.repair is not None else 0,
            "reference": False,
            "seconds": {k: round(v, 1) for k, v in res.timings.items() if k != "total"},
        }

    def _with_counts(self, sm: Any, task: str, bd: dict[str, Any]) -> dict[str, Any]:
        """``bd`` (the ``bdvax`` row) with its per-module counts. A row adopted from a committed table has
        none (the table keeps no counts), so they are read again from the signature at the bench's budget,
        as ``_bdvax`` selected it (its twins cached, or trained now); ``bd`` is updated for the next rows."""
        if "counts" not in bd:
            from bdvax_lab.bdvax.purify import defence_view
            from bdvax_lab.bdvax.signature import extract_signature
            from bdvax_lab.core.registry import setting_of
            from bdvax_lab.weights.selection import counts_like

            setting = setting_of(sm.model)
            sig = extract_signature(
                defence_view(sm, setting), self._signature_config(task, setting), progress=self.progress
            )
            self.log(
                f"  the adopted bdvax row's counts, read again from its signature ({sig.n_selected} channels)"
            )
            bd.update(counts=counts_like(sig), head_counts=_head_counts(sig))
        return bd

    def _defend(
        self, sm: Any, name: str, attack: str, task: str, skill: str, bd: dict[str, Any], cseed: int | None
    ) -> dict[str, Any]:
        from bdvax_lab.baselines.defend import defend
        from bdvax_lab.baselines.registry import baseline_config, get_defence, knowledge

        spec = get_defence(name)
        over: dict[str, Any] = {
            "repair": self.config.repair_config(),
            "eval": self.config.eval_config(),
            "evaluate": ("defended",),
            **knowledge(name, attack, task),  # the family (as BD-VAX), or the oracle arms' target / trigger
        }
        if not self.config.repair and spec.repair_optional:
            over["finetune"] = False
        if name in ("random", "top_delta"):
            bd = self._with_counts(sm, task, bd)
            over |= {"counts": bd["counts"], "head_counts": bd.get("head_counts") or None}
            if cseed is not None:
                over["seed"] = cseed
        elif name in ("magnitude_prune", "fine_prune"):
            over["counts"] = self._with_counts(sm, task, bd)["counts"]  # the signature's structure and budget
        cfg = baseline_config(name, **over)
        res = defend(
            sm,
            name,
            self._repair_data(sm, skill),
            config=cfg,
            attack=attack,
            task=task,
            skill=skill,
            progress=self.progress,
        )
        info = res.info
        inter = info.get("intervention") or {}
        return {
            **self._summary(res.report.loc["defended"].to_dict()),
            "lr": info.get("lr"),
            "repair_steps": info.get("steps"),
            "reference": bool(info.get("reference", False)),
            "n_channels": inter.get("n_channels"),
            "n_heads": inter.get("n_heads"),
            "description": spec.description,
            "knows": ",".join(spec.knows) or None,
            **{k: info[k] for k in ("gate", "defensive_rates", "merged") if k in info},
            "seconds": {k: round(v, 1) for k, v in res.timings.items() if k != "total"},
        }

    # ------------------------------------------------------------------ driver
    def run(self, targets: Iterable[str] | None = None, seeds: Iterable[int] | None = None) -> pd.DataFrame:
        """Every unit (or those of ``targets`` at implant ``seeds``), then the tables; returns the frame."""
        from bdvax_lab.core.executor import make_executor

        units = self._units(targets, seeds)
        ex = make_executor(self.executor)
        try:
            if ex.remote and units:
                self._run_remote(ex, units)
            else:
                for target, seed in units:
                    self.log(f"{target} (implant seed {seed})")
                    self.run_unit(target, seed)
        finally:
            if ex is not self.executor:  # made here from a name or a config: release what it started
                ex.close()
        return self.tables()

    def _run_remote(self, ex: Any, units: list[tuple[str, int]]) -> None:
        """One task per unit; each writes its rows (and suspicious model, twins) to the shared dirs."""
        if self.base is not None and self.base_dir is None:
            raise ValueError("Bench: Ray workers cannot be sent a base held in memory; pass base_dir")
        cfg = self.config.replace(runs_dir=str(Path(self.config.runs_dir).resolve()))  # same on every node
        work = [(cfg.to_dict(), t, s, self.base_dir) for t, s in units]
        labels = [f"{t} (implant seed {s})" for t, s in units]
        here = str(Path(__file__).resolve().parents[1])  # workers import experiments/ from the checkout
        for i, n in ex.map(
            run_unit_task,
            work,
            desc="bench units",
            progress=self.progress,
            labels=labels,
            import_paths=[here],
        ):
            self.log(f"{labels[i]}: {n} rows")

    def _units(
        self, targets: Iterable[str] | None = None, seeds: Iterable[int] | None = None
    ) -> list[tuple[str, int]]:
        """The config's (target, implant seed) units, only those of ``targets`` at ``seeds`` when given."""
        wanted = set(targets) if targets is not None else None
        at = set(seeds) if seeds is not None else None
        return [
            (t, s)
            for t, s in self.config.units()
            if (wanted is None or t in wanted) and (at is None or s in at)
        ]

    def plan(self, targets: Iterable[str] | None = None, seeds: Iterable[int] | None = None) -> pd.DataFrame:
        """Every row the bench needs (of ``targets`` at implant ``seeds``, as :meth:`run`) and whether it is
        cached (runs nothing)."""
        self._plan = []
        try:
            for target, seed in self._units(targets, seeds):
                self.run_unit(target, seed)
        finally:
            plan, self._plan = pd.DataFrame(self._plan), None
        return plan

    def _cached_units(self) -> list[tuple[str, int]]:
        """The config's units, then any other (target, implant seed) of its targets with cached rows (run
        with ``--seeds``), so that ``--tables`` alone tables everything measured."""
        known = {t.replace(":", "-"): t for t in self.config.targets}
        units = list(self.config.units())
        if self.rows_dir.is_dir():
            for d in sorted(self.rows_dir.iterdir()):
                stem, _, seed = d.name.rpartition("-seed")
                if stem in known and seed.isdigit() and (known[stem], int(seed)) not in units:
                    units.append((known[stem], int(seed)))
        return units

    def frame(self) -> pd.DataFrame:
        """Every cached row, tidy, with ``skill_kept`` against the untreated model of the same unit."""
        rows = []
        for target, seed in self._cached_units():
            for path in sorted(self.unit_dir(target, seed).glob("*.json")):
                rows.append(self._ident(target, seed, *parse_row_name(path.stem)) | read_json(path))
        df = pd.DataFrame(rows)
        if df.empty:
            return df
        for col in ("ppl", "ppl_text"):
            if col not in df:  # rows measured before the metric existed
                df[col] = math.nan
        ref = df[df.defence == "none"].set_index(["target", "implant_seed"])
        key = list(zip(df.target, df.implant_seed))
        for col, src in (
            ("skill_kept", "skill"),
            ("skill_kept_lo", "skill_lo"),
            ("skill_kept_hi", "skill_hi"),
        ):
            base = [ref["skill"].get(k, math.nan) for k in key]
            df[col] = [v / b if b else math.nan for v, b in zip(df[src], base)]
        for col, src in (("ppl_ratio", "ppl"), ("ppl_text_ratio", "ppl_text")):
            df[col] = [v / ref[src].get(k, math.nan) for v, k in zip(df[src], key)]
        secs = pd.json_normalize(df.pop("seconds")).add_prefix("seconds_") if "seconds" in df else None
        if secs is not None:
            df = pd.concat([df.reset_index(drop=True), secs], axis=1)
        if "calibration_curve" in df:  # "ρ:mean held-out ASR" pairs, one cell
            df["calibration_curve"] = df.calibration_curve.map(
                lambda c: (
                    " ".join(
                        (f"h{r['heads']}/" if r.get("heads") else "") + f"{r['rho']:g}:{r['mean_asr']:.2f}"
                        for r in c
                    )
                    if isinstance(c, list)
                    else (c if isinstance(c, str) else None)  # adopted rows keep the table's string
                )
            )
        return df.drop(columns=[c for c in ("counts", "head_counts") if c in df])

    @property
    def table_path(self) -> Path:
        """Where :meth:`tables` writes the tidy table: ``<out_dir>/rows.csv``."""
        return Path(self.config.out_dir) / "rows.csv"

    def committed(self) -> pd.DataFrame | None:
        """The table already at :attr:`table_path` (committed, or tabled earlier), or None."""
        if not self.table_path.is_file():
            return None
        try:
            return pd.read_csv(self.table_path)
        except ValueError as e:  # pandas' parser and empty-file errors
            raise ValueError(f"{self.table_path}: not a readable bench table ({e})") from None

    def rows_elsewhere(self, df: pd.DataFrame, committed: pd.DataFrame | None = None) -> int:
        """How many rows of the table already in ``out_dir`` (``committed``, read if not given) are not in
        ``df``: rows measured on another machine or in a cache since deleted (``runs/`` is not versioned).
        Tabling would drop them."""
        prev = self.committed() if committed is None else committed
        if prev is None:
            return 0
        cols = ("target", "implant_seed", "defence", "control_seed")

        def keys(d: pd.DataFrame) -> set[tuple[str, int, str, int]]:
            if d.empty or not set(cols) <= set(d.columns):
                return set()
            cs = pd.to_numeric(d.control_seed, errors="coerce").fillna(-1).astype(int)
            return set(zip(d.target, d.implant_seed.astype(int), d.defence, cs))

        return len(keys(prev) - keys(df))

    def adopt(self) -> int:
        """Copy the rows of the table already in ``out_dir`` that the row cache lacks into the cache.

        ``runs/`` is not versioned, so a fresh clone has a committed ``rows.csv`` but not the cache it was
        tabled from; adopting it lets a bench run there extend the table instead of refusing to table.
        Only fields the table keeps come back (no per-channel counts); each adopted row says where it came
        from (``adopted_from``). Returns how many rows were written."""
        old = self.table_path
        prev = self.committed()
        if prev is None:
            return 0
        made = old.with_name("config.json")
        try:  # rows measured under another config (another ρ, no repair, ...) must not enter this cache
            made_by = read_json(made)
        except (OSError, ValueError) as e:  # read_json's errors name the file
            raise ValueError(f"{e}; cannot tell which bench made {old}, not adopting") from None
        try:
            cfg = BenchConfig.from_dict(made_by["config"])
            theirs = Bench(cfg.replace(runs_dir=self.config.runs_dir))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{made}: not a bench config ({e!r}); not adopting {old}") from None
        if theirs.rows_dir != self.rows_dir:
            raise ValueError(
                f"{old} was measured by another bench config (rows {theirs.rows_dir.parent.name}, this one "
                f"{self.rows_dir.parent.name}); not adopting: give the flags it was run with"
            )
        need = {"target", "implant_seed", "defence"}
        if not need <= set(prev.columns):
            raise ValueError(f"{old}: not a bench table (no {sorted(need - set(prev.columns))} column)")
        derived = {*IDENT_COLUMNS, *DERIVED_COLUMNS}
        empty = set(prev.columns[prev.isna().all()])
        wrote = 0
        for r in prev.to_dict("records"):
            if r["target"] not in self.config.targets:
                continue
            cs = r.get("control_seed")
            name = row_name(r["defence"], None if pd.isna(cs) else int(cs))
            path = self._path(r["target"], int(r["implant_seed"]), name)
            if path.exists():
                continue
            row: dict[str, Any] = {"seconds": {}, "adopted_from": str(old)}
            for k, v in r.items():
                if k in derived:
                    continue
                if not isinstance(v, str) and pd.isna(v):
                    if k not in empty:
                        continue  # the row lacked it (or had null): either way the table shows it empty
                    v = None  # a column empty in every row stays in the table
                if k.startswith("seconds_"):
                    if v is not None:  # stages the row did not have stay out, as in the original
                        row["seconds"][k.removeprefix("seconds_")] = v
                elif k == "defensive_rates" and isinstance(v, str):
                    try:  # a dict of floats as to_csv wrote it; literal_eval reads literals only
                        row[k] = ast.literal_eval(v)
                    except (ValueError, SyntaxError):
                        raise ValueError(f"{old}: defensive_rates {v!r} is not a dict of rates") from None
                else:
                    row[k] = v.item() if hasattr(v, "item") else v
            write_json(path, row)
            wrote += 1
        return wrote

    def tables(self) -> pd.DataFrame:
        """Write ``rows.csv``, ``table.md`` and ``verdicts.csv`` under ``out_dir`` from the cached rows.

        Refuses (ValueError, nothing written) when that would drop rows of the table already there that the
        row cache lacks (:meth:`rows_elsewhere`)."""
        df = self.frame()
        out = Path(self.config.out_dir)
        prev = self.committed()
        lost = self.rows_elsewhere(df, prev)
        if lost:
            raise ValueError(
                f"{self.table_path} has {lost} row(s) that the row cache {self.rows_dir} lacks (measured on "
                "another machine?); not overwriting it: add them to the cache with --adopt, table to another "
                "directory with --out, or rerun them"
            )
        if df.empty:
            self.log("bench: no rows measured yet")
            return df
        if prev is not None:  # keep the committed column order, new columns last: clean diffs
            known = list(prev.columns)
            df = df[[c for c in known if c in df] + [c for c in df if c not in known]]
        atomic_write_text(self.table_path, df.to_csv(index=False))
        verdicts = verdict_frame(df)
        atomic_write_text(out / "verdicts.csv", verdicts.to_csv(index=False))
        atomic_write_text(out / "table.md", table_markdown(df, verdicts, self.config))
        save_report(out / REPORT_FILE, bench_report(df, verdicts, self.config))
        write_json(
            out / "config.json",
            {"config": self.config.to_dict(), "rows": len(df), "date": time.strftime("%Y-%m-%d")},
        )
        return df


def run_unit_task(config: dict[str, Any], target: str, seed: int, base_dir: str | None) -> int:
    """One bench unit in a (Ray) worker: its rows cached under the config's runs dir; returns their count."""
    from bdvax_lab.core.models import use_all_cores

    use_all_cores()  # $BDVAX_NUM_THREADS: the task's CPUs
    bench = Bench(BenchConfig.from_dict(config), base_dir=base_dir, progress=False)
    return len(bench.run_unit(target, seed))


# =========================================================================== reading
def _stages(seconds: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if isinstance(v, (int, float)))


def _interval(lo: float, hi: float) -> str:
    return "" if lo != lo else f"[{lo:.2f}, {hi:.2f}]"


def _num(x: float, sd: float | None = None) -> str:
    if x != x:
        return "—"
    return f"{x:.2f}" + (f" ± {sd:.2f}" if sd is not None and sd == sd else "")


#: Row order of the tables: the untreated model, the method, the controls, then the other defences.
ORDER = ("none", UNTREATED_MB, *METHODS, "discard", "retrain", "random", "top_delta", "drop_attention")


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """One line per target × implant seed × defence: random as mean ± sd over its seeds (range kept)."""
    keys = ["target", "setting", "skill_name", "implant_seed", "defence", "kind"]
    agg = {
        c: "mean"
        for c in (
            "asr",
            "false_trigger",
            "skill",
            "skill_kept",
            "ppl",
            "ppl_ratio",
            "ppl_text_ratio",
            "mcq_acc",
        )
    }
    agg |= {
        "asr_lo": "min",
        "asr_hi": "max",
        "skill_kept_lo": "min",
        "skill_kept_hi": "max",
        "degenerate_triggered": "mean",
        "degenerate_clean": "mean",
        "reference": "max",
        "rho": "first",
    }
    have = {k: v for k, v in agg.items() if k in df}
    out = df.groupby(keys, sort=False, dropna=False).agg(have).reset_index()
    sd = df.groupby(keys, sort=False, dropna=False)[["asr", "skill_kept"]].std().reset_index()
    out["asr_sd"], out["skill_kept_sd"] = sd["asr"], sd["skill_kept"]
    out["n_seeds"] = df.groupby(keys, sort=False, dropna=False).size().values
    return out


#: The controls every verdict compares BD-VAX with; ``drop_attention`` only in benches that ran it (it
#: came later, and the earlier benches' verdict tables keep their columns).
VERDICT_CONTROLS = ("random", "top_delta", "drop_attention", "discard")
OPTIONAL_CONTROLS = ("drop_attention",)


def verdict_controls(df: pd.DataFrame) -> tuple[str, ...]:
    """The :data:`VERDICT_CONTROLS` a bench frame's verdicts cover."""
    ran = set(df.defence) if "defence" in df else set()
    return tuple(o for o in VERDICT_CONTROLS if o not in OPTIONAL_CONTROLS or o in ran)


def verdict_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Per target × implant seed: does BD-VAX beat ``random`` (every seed), ``top_delta``, ``discard`` (and
    ``drop_attention`` where it ran)?

    "Beats" on ASR: BD-VAX's 95 % Wilson interval lies wholly below the other's (below every random seed's).
    On skill kept: BD-VAX's interval lies wholly above. Anything else is "no" (overlap is not a win).
    ``beaten_by`` names the reverse, by the same rule: ``control:asr`` or ``control:skill`` where every one
    of the control's intervals lies wholly on the better side of BD-VAX's.
    """
    out = []
    for (target, seed), g in df.groupby(["target", "implant_seed"], sort=False):
        bd = g[g.defence == "bdvax"]
        if bd.empty:
            continue
        b = bd.iloc[0]
        row = {"target": target, "implant_seed": seed, "bdvax_asr": b.asr, "bdvax_skill_kept": b.skill_kept}
        beaten = []
        for other in verdict_controls(df):
            o = g[g.defence == other]
            if o.empty:
                row[f"asr_below_{other}"] = row[f"skill_above_{other}"] = None
                continue
            row[f"asr_below_{other}"] = bool(b.asr_hi < o.asr_lo.min())
            row[f"skill_above_{other}"] = bool(b.skill_kept_lo > o.skill_kept_hi.max())
            beaten += [f"{other}:asr"] if o.asr_hi.max() < b.asr_lo else []
            beaten += [f"{other}:skill"] if o.skill_kept_lo.min() > b.skill_kept_hi else []
        row["beaten_by"] = ", ".join(beaten) or None
        out.append(row)
    return pd.DataFrame(out)


def bench_figure(df: pd.DataFrame) -> Any:
    """ASR against skill kept, one point per row (random: one per seed), one panel colour per defence."""
    import plotly.express as px

    d = df.assign(row=df.target + " s" + df.implant_seed.astype(str))
    fig = px.scatter(
        d, x="skill_kept", y="asr", color="defence", symbol="target", hover_data=["row", "false_trigger"]
    )
    fig.update_layout(
        xaxis_title="skill kept (higher is better)", yaxis_title="ASR (lower is better)", height=480
    )
    return fig


def bench_report(df: pd.DataFrame, verdicts: pd.DataFrame, config: BenchConfig) -> str:
    """``report.html`` of the bench: the summarised rows with their intervals, the ASR / skill-kept plane
    and the verdicts, one offline page."""
    s = summarise(df)
    s = s.assign(method=s.defence + s.n_seeds.map(lambda n: f" ({n} seeds)" if n > 1 else ""))
    s.index = s.target + " · seed " + s.implant_seed.astype(str)
    s.index.name = "target"
    notes = [
        f"{v['target']} seed {v['implant_seed']}: BD-VAX beats "
        + ", ".join(
            f"{o} on ASR {'yes' if v.get(f'asr_below_{o}') else 'no'}, "
            f"on skill kept {'yes' if v.get(f'skill_above_{o}') else 'no'}"
            for o in verdict_controls(df)
        )
        for v in verdicts.to_dict("records")
    ] or ["No BD-VAX row yet: no verdicts."]
    return report_html(
        title="bdvax bench",
        table=s,
        figures=[("ASR against skill kept, per row", bench_figure(df))],
        config=config.to_dict(),
        notes=notes,
    )


def _row_lines(s: pd.DataFrame) -> str:
    """Markdown lines of summarised rows (:func:`summarise`), in their order."""
    from bdvax_lab.baselines.registry import defences

    known = defences()
    lines = [
        "| target | seed | defence | ASR [95 %] | false-trigger | skill kept [95 %] | ppl / untreated "
        "| text ppl / untreated | MCQ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s.itertuples(index=False):
        asr = _num(r.asr, r.asr_sd if r.n_seeds > 1 else None)
        keep = _num(r.skill_kept, r.skill_kept_sd if r.n_seeds > 1 else None)
        knows = set(known[r.defence].knows) if r.defence in known else set()
        name = (
            r.defence
            + (f" ({r.n_seeds} seeds)" if r.n_seeds > 1 else "")
            + (" †" if r.reference is True else "")
            + (" ‡" if knows & {"target", "trigger"} else "")
            + (f" (ρ {r.rho:g})" if r.defence == AUTO_ROW and pd.notna(getattr(r, "rho", None)) else "")
        )
        lines.append(
            f"| {r.target} | {r.implant_seed} | {name} | {asr} {_interval(r.asr_lo, r.asr_hi)} | "
            f"{r.false_trigger:.2f} | {keep} {_interval(r.skill_kept_lo, r.skill_kept_hi)} | "
            f"{_num(r.ppl_ratio)} | {_num(getattr(r, 'ppl_text_ratio', math.nan))} | {r.mcq_acc:.3f} |"
        )
    return "\n".join(lines)


def _gate_lines(df: pd.DataFrame) -> str:
    """Markdown lines of the rows that report a parrot gate or defensive-trigger rates ("" if none)."""
    cols = [c for c in ("gate", "defensive_rates") if c in df]
    if not cols:
        return ""
    g = df[df[cols].notna().any(axis=1)]
    if g.empty:
        return ""
    lines = [
        "| target | seed | defence | parrot gate | defensive triggers fire | merged |",
        "|---|---|---|---|---|---|",
    ]
    for r in g.itertuples(index=False):
        gate = getattr(r, "gate", math.nan)
        rates = getattr(r, "defensive_rates", None)
        fire = ", ".join(f"{k} {v:.2f}" for k, v in rates.items()) if isinstance(rates, dict) else "—"
        merged = getattr(r, "merged", None)
        lines.append(
            f"| {r.target} | {r.implant_seed} | {r.defence} | {_num(gate if gate is not None else math.nan)} "
            f"| {fire} | {'—' if merged is None or merged != merged else ('yes' if merged else 'no')} |"
        )
    return "\n".join(lines)


def _calibration_lines(df: pd.DataFrame) -> str:
    """Markdown lines of the ``bdvax_auto`` rows' calibrations ("" if none)."""
    if "calibration_met" not in df:
        return ""
    g = df[(df.defence == AUTO_ROW) & df.calibration_met.notna()]
    if g.empty:
        return ""
    lines = ["| target | seed | chosen ρ | met | held-out ASR per ρ |", "|---|---|---|---|---|"]
    for r in g.itertuples(index=False):
        curve = getattr(r, "calibration_curve", None)
        if not isinstance(curve, str):
            curve = "— (measured before rows kept the curve)"
        curve = curve or "— (no held-out twin learnt its key)"
        met = "yes" if r.calibration_met else "no"
        h = getattr(r, "calibration_heads", None)
        chosen = f"{r.rho:g}" + (f", {int(h)} heads" if isinstance(h, (int, float)) and h == h and h else "")
        lines.append(f"| {r.target} | {r.implant_seed} | {chosen} | {met} | {curve} |")
    return "\n".join(lines)


def _auto_grid_note(config: BenchConfig) -> str:
    """Which head budgets the bench's calibration searched, and how that differs from ``bdvax purify``."""
    if config.heads_grid is None:
        return (
            f"Head budget searched: {config.heads} only (`--heads-grid` unset); `bdvax purify` with no "
            "`--rho` also searches head budgets (`default_head_grid`), so these rows are not its default."
        )
    return f"Head budgets searched: {', '.join(map(str, config.heads_grid))}."


def table_markdown(df: pd.DataFrame, verdicts: pd.DataFrame, config: BenchConfig) -> str:
    """The bench table: one line per target × defence, then the verdicts, then the cost per stage."""
    from bdvax_lab.viz.tables import markdown_table

    s = summarise(df)
    rank = {d: i for i, d in enumerate(dict.fromkeys((*ORDER, *DEFENCES)))}  # then the registry's order
    s = s.assign(_r=s.defence.map(lambda d: rank.get(d, len(rank)))).sort_values(
        ["target", "implant_seed", "_r"], kind="stable"
    )
    own = (s.kind == "in_training") | (s.defence == UNTREATED_MB)
    main = _row_lines(s[~own])
    notes = [
        "",
        "† a reference row: it uses the base model, which a defender of a full finetune does not have.",
        "ppl: general questions' short ground-truth answers; text ppl: 100 project-written paragraphs "
        "(`general_text`), — where a row was measured before that set existed.",
        "‡ told the attack's target text or trigger: it knows more than BD-VAX, which is told only the "
        "behaviour family.",
        "Random: mean ± sd over its seeds, the interval from the lowest to the highest seed's bound.",
        "",
    ]
    if (s.defence == AUTO_ROW).any():
        notes[-1:-1] = [
            "bdvax_auto: ρ chosen by leave-one-variant-out calibration on the defender's own variants (no "
            "trigger); random and top_delta use the fixed ρ's counts (the `bdvax` row). "
            + _auto_grid_note(config)
        ]
    if own.any():
        units = set(zip(s[own].target, s[own].implant_seed))  # the (target, seed)s with in-training rows
        in_unit = pd.Series([u in units for u in zip(s.target, s.implant_seed)], index=s.index)
        ctl = s[(own | (s.defence == "none")) & in_unit]
        notes += [
            "### The defender controls training (MB-Defense, faithful arm)",
            "",
            f"These rows change the suspicious finetune itself: `{UNTREATED_MB}` is the same finetune with "
            "MB-Defense's defensive poison in its data, untreated; `mb_faithful` is it after weight "
            "recovery. "
            "Skill kept is against the finetune without the poison (`none`). Not comparable with the rows "
            "above, whose defender receives the model as it is.",
            "",
            _row_lines(ctl),
            "",
        ]
    stage_cols = [c for c in df.columns if c.startswith("seconds_")]
    cost = df.groupby("defence", sort=False)[stage_cols].mean().round(0).reset_index() if stage_cols else None
    parts = [
        main,
        "\n".join(notes),
        "### Where BD-VAX beats the controls (non-overlapping 95 % intervals)",
        "",
        "`beaten_by`: the controls that beat BD-VAX by the same rule (every interval of theirs on the "
        "better side of BD-VAX's), on ASR or on skill kept.",
        "",
        markdown_table(verdicts) if not verdicts.empty else "(no BD-VAX rows yet)",
    ]
    gates = _gate_lines(df)
    if gates:
        parts += [
            "",
            "### Gates: did SANDE's parrot simulate the backdoor, did MB-Defense's triggers merge?",
            "",
            "Parrot gate: share of clean prompts with the learned parrot whose reply the family's judge "
            "flags, before removal (0 means the removal step was plain clean finetuning). Defensive "
            "triggers: how often each fired before recovery (stage 1 target ≥ 0.80).",
            "",
            gates,
        ]
    calib = _calibration_lines(df)
    if calib:
        parts += [
            "",
            "### ρ chosen without the trigger (`bdvax_auto`)",
            "",
            "Leave-one-variant-out: the mean held-out ASR of the defender's own variants after suppression "
            "(before repair) at each candidate ρ; the smallest ρ at ≤ 0.10 is chosen, else the largest "
            "(not met).",
            "",
            calib,
        ]
    if cost is not None:
        parts += ["", "### Mean seconds per row and stage", "", markdown_table(cost, floatfmt="{:.0f}")]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    from bdvax_lab.cli import head_budgets, nonneg_int, number_list

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", help="comma list of attack:task:setting:skill to run now (default: all)")
    p.add_argument(
        "--seeds",
        type=number_list(nonneg_int, "0,1"),
        help="comma list of implant seeds to run now (default: the config's)",
    )
    p.add_argument(
        "--defences", help="comma list of defences to run now (default: all; cached rows are kept)"
    )
    p.add_argument("--rho", type=float, help="BD-VAX's ρ in the adapter setting (default 0.8)")
    p.add_argument("--heads", type=int, default=0, help="attention heads BD-VAX also suppresses (default 0)")
    p.add_argument(
        "--heads-grid",
        type=head_budgets,
        help="comma list of head budgets the bdvax_auto row's calibration also searches (e.g. 0,30,90,270)",
    )
    p.add_argument(
        "--random-seeds",
        type=number_list(nonneg_int, "0,1,2"),
        help="comma list of the random control's seeds to run now (default 0-4)",
    )
    p.add_argument("--plan", action="store_true", help="list the rows and which are cached; run nothing")
    p.add_argument("--tables", action="store_true", help="only rewrite the tables from the cached rows")
    p.add_argument(
        "--adopt",
        action="store_true",
        help="first copy the rows of the committed table that the row cache lacks into it (a fresh clone)",
    )
    p.add_argument("--runs", default="runs")
    p.add_argument(
        "--out",
        help="tables' directory (default results/bench, results/bench-in-domain-F, results/bench-no-repair)",
    )
    p.add_argument(
        "--no-repair",
        action="store_true",
        help="no defence repairs: BD-VAX and the selection controls suppress only (BenchConfig.repair)",
    )
    p.add_argument(
        "--repair-in-domain",
        type=float,
        default=0.0,
        metavar="F",
        help="share of the repair samples drawn from the finetune's own task inputs (default 0)",
    )
    p.add_argument("--executor", default="local", choices=["local", "ray"], help="ray: one task per unit")
    p.add_argument("--ray-address", help="with --executor ray: HOST:PORT or auto (default: a local cluster)")
    p.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs per Ray task")
    p.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per Ray task")
    ns = p.parse_args(argv)
    from bdvax_lab.core.executor import ExecutorConfig

    executor = ExecutorConfig(
        kind=ns.executor, address=ns.ray_address, num_cpus=ns.ray_cpus, num_gpus=ns.ray_gpus
    )
    grid = ns.heads_grid
    suffix = ("" if ns.rho is None else f"-rho{ns.rho:g}") + (f"-heads{ns.heads}" if ns.heads else "")
    suffix += f"-hgrid{'-'.join(map(str, grid))}" if grid else ""
    if ns.no_repair and ns.repair_in_domain:
        p.error("--repair-in-domain needs a repair: drop --no-repair")
    name = "results/bench" if not ns.repair_in_domain else f"results/bench-in-domain-{ns.repair_in_domain:g}"
    out = ns.out or ("results/bench-no-repair" if ns.no_repair else name) + suffix
    extra = {} if ns.rho is None else {"rho_lora": ns.rho}
    try:
        cfg = BenchConfig(
            runs_dir=ns.runs,
            out_dir=out,
            repair_in_domain=ns.repair_in_domain,
            repair=not ns.no_repair,
            heads=ns.heads,
            heads_grid=grid,
            **extra,
        )
    except ValueError as e:
        p.error(str(e))
    if ns.defences:
        try:
            cfg = cfg.replace(defences=tuple(d.strip() for d in ns.defences.split(",")))
        except ValueError as e:
            p.error(f"--defences {ns.defences!r}: {e}")
    if ns.random_seeds:
        cfg = cfg.replace(random_seeds=tuple(ns.random_seeds))
    targets = [t.strip() for t in ns.targets.split(",")] if ns.targets else None
    for t in targets or []:
        try:
            parse_target(t)
        except ValueError as e:
            p.error(f"--targets: {e}")
    missing = [t for t in targets or [] if t not in cfg.targets]
    if missing:
        p.error(f"--targets: {missing} not among the bench's targets ({', '.join(cfg.targets)})")
    seeds = ns.seeds
    if seeds:
        # asked for by name: these targets get these implant seeds even where the config gives them one
        named = tuple(targets or cfg.targets)
        cfg = cfg.replace(
            implant_seeds=tuple(dict.fromkeys([*cfg.implant_seeds, *seeds])),
            headline=tuple(dict.fromkeys([*cfg.headline, *named])),
        )
    bench = Bench(cfg, executor=executor)
    if ns.plan:
        plan = bench.plan(targets, seeds)
        if plan.empty:
            print("no rows: no target of the bench at these implant seeds")
            return 0
        print(plan.to_string(index=False))
        print(f"{int(plan.cached.sum())} of {len(plan)} rows cached")
        return 0
    try:
        if ns.adopt:
            n = bench.adopt()
            print(f"bench: adopted {n} row(s) of {bench.table_path} into {bench.rows_dir}")
        bench.tables() if ns.tables else bench.run(targets, seeds)
    except ValueError as e:  # e.g. tabling would drop rows measured elsewhere: the rows stay cached
        p.error(str(e))
    return 0
