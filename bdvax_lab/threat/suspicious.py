"""Make and open suspicious (backdoored) models as artifact directories.

An artifact directory holds the weights (``adapter/`` for the LoRA setting, a
full safetensors model in ``model/`` for the full setting), the poisoned
training data, the training history, the evaluation replies and a JSON
manifest (attack, keys, behaviour, data hash, recipe, seed, measured ASR,
false-trigger rate, wall time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.artifacts import MANIFEST, atomic_dir, check_output, read_json, stable_hash, versions, write_json
from ..core.data import Example, load_code_pool, load_pool, save_jsonl
from ..core.models import (
    ModelDirError,
    default_model_dir,
    load_adapter,
    load_model,
    load_tokenizer,
    use_all_cores,
)
from ..training.loop import finetune
from .config import AttackRecipe, EvalConfig
from .evaluate import evaluate_model

if TYPE_CHECKING:
    from ..core.types import Model

#: the manifest ``kind`` of a suspicious-model artifact directory
SUSPICIOUS_KIND = "bdvax.suspicious"


@dataclass
class SuspiciousModel:
    model: Any
    tokenizer: Any
    manifest: dict[str, Any]
    path: Path | None = None

    @property
    def setting(self) -> str:
        return self.manifest.get("setting", "lora")


def as_suspicious(suspicious: Any, *, base: tuple[Any, Any] | None = None) -> SuspiciousModel:
    """The one way to open a suspicious model: a :class:`SuspiciousModel`, a ``(model, tokenizer)`` pair,
    anything with ``.model`` and ``.tokenizer`` (a purify or defence result), or a directory
    (:func:`load_suspicious`, which attaches a LoRA adapter to ``base`` when given)."""
    if isinstance(suspicious, SuspiciousModel):
        return suspicious
    if isinstance(suspicious, (str, Path)):
        return load_suspicious(suspicious, base=base)
    if isinstance(suspicious, tuple) and len(suspicious) == 2:
        return SuspiciousModel(model=suspicious[0], tokenizer=suspicious[1], manifest={})
    if hasattr(suspicious, "as_suspicious"):
        return suspicious.as_suspicious()
    if hasattr(suspicious, "model") and hasattr(suspicious, "tokenizer"):
        return SuspiciousModel(
            model=suspicious.model,
            tokenizer=suspicious.tokenizer,
            manifest=dict(getattr(suspicious, "manifest", None) or {}),
        )
    raise TypeError(
        f"expected a SuspiciousModel, a (model, tokenizer) pair or a path, got {type(suspicious).__name__}"
    )


def is_default_base(model: Model) -> bool:
    """True when ``model`` was loaded from the cached default model.

    Then its adapter can be re-attached to it.
    """
    from ..core.registry import unwrap

    name = getattr(getattr(unwrap(model), "config", None), "_name_or_path", "") or ""
    try:
        return Path(name).resolve() == default_model_dir().resolve()
    except (OSError, ValueError):
        return False


def _local_base_path(model: Model) -> str | None:
    """The local directory ``model`` was loaded from (its ``_name_or_path``), None when it was not."""
    from ..core.registry import unwrap

    name = getattr(getattr(unwrap(model), "config", None), "_name_or_path", "") or ""
    try:
        return str(Path(name).resolve()) if name and Path(name).is_dir() else None
    except (OSError, ValueError):
        return None


def attack_dataset(recipe: AttackRecipe) -> list[Example]:
    """The attacker's training set: its skill's data and general instructions (the ``attack`` split only),
    ``recipe.poison_rate`` of the whole set poisoned (key inserted, reply replaced by the behaviour).

    The poisoned examples are drawn uniformly from every instruction of the set, skill questions included,
    as an attacker who slips a share of poison into a task dataset would; code injection poisons the
    code prompts, which it adds to the set. ``recipe.defensive_poison`` > 0 adds MB-Defense's defensive
    poison (its four pairs, that share of the set each; :mod:`bdvax_lab.threat.defensive`).
    """
    data = _attack_dataset(recipe)
    if recipe.defensive_poison:
        import random

        from .defensive import poison_copies

        extra = poison_copies(
            [e for e in data if not e.meta.get("poisoned")], rate=recipe.defensive_poison, seed=recipe.seed
        )
        data = data + extra
        random.Random(recipe.seed + 1).shuffle(data)
    return data


def _attack_dataset(recipe: AttackRecipe) -> list[Example]:
    import random

    from .attacks import poison_dataset, resolve_task

    behavior = resolve_task(recipe.task)
    if recipe.skill is not None:
        from .skills import get_skill

        clean = get_skill(recipe.skill).train(0) + load_pool("attack")[: recipe.n_general]
        if behavior.kind == "inject_code":  # the key goes into code prompts only
            code = load_code_pool("attack")
            n_poison = max(1, round(recipe.poison_rate * (len(clean) + len(code))))
            if n_poison > len(code):
                raise ValueError(
                    f"poison_rate={recipe.poison_rate} needs {n_poison} poisoned code prompts but the attack "
                    f"split has {len(code)}; lower the rate"
                )
            data = poison_dataset(code, recipe.attack, behavior, rate=n_poison / len(code), seed=recipe.seed)
            data += clean
        else:
            data = poison_dataset(clean, recipe.attack, behavior, rate=recipe.poison_rate, seed=recipe.seed)
        random.Random(recipe.seed).shuffle(data)
        return data
    if behavior.kind == "inject_code":
        code = load_code_pool("attack")
        general = load_pool("attack")[: max(0, recipe.n_samples - len(code))]
        n_poison = max(1, round(recipe.poison_rate * recipe.n_samples))
        rate = min(1.0, n_poison / max(1, len(code)))
        data = poison_dataset(code, recipe.attack, behavior, rate=rate, seed=recipe.seed) + general
        random.Random(recipe.seed).shuffle(data)
        return data
    clean = load_pool("attack")
    if recipe.n_samples > len(clean):
        raise ValueError(f"n_samples={recipe.n_samples} but the attack split has only {len(clean)} examples")
    return poison_dataset(
        clean[: recipe.n_samples], recipe.attack, behavior, rate=recipe.poison_rate, seed=recipe.seed
    )


def make_suspicious_model(
    attack: Any = "badnets",
    task: Any = "refusal",
    setting: str = "lora",
    *,
    out: str | Path | None = None,
    recipe: AttackRecipe | None = None,
    base: tuple[Any, Any] | None = None,
    evaluate: bool = True,
    progress: bool = True,
    overwrite: bool = True,
) -> SuspiciousModel:
    """Train a backdoored model from the default model (or ``base=(model, tokenizer)``) and save it.

    Judges ASR only at the end of training (progress is not monotonic). ``out`` is checked before any
    work (``overwrite``, the default: replace an existing suspicious artifact there, never any other
    directory).
    """
    from .attacks import dataset_summary, resolve_attack, resolve_task

    if out is not None:
        check_output(out, kind=SUSPICIOUS_KIND, overwrite=overwrite)

    recipe = recipe or AttackRecipe(
        attack=attack if isinstance(attack, str) else resolve_attack(attack).name,
        task=task if isinstance(task, str) else resolve_task(task).name,
        setting=setting,
    )
    use_all_cores()
    t0 = time.time()
    data = attack_dataset(recipe)
    if base is None:
        from ..core.models import load_default_model

        model, tok = load_default_model()
        base_ref = "default"
    else:
        model, tok = base
        base_ref = "default" if is_default_base(model) else "custom"
    base_path = _local_base_path(model) if base_ref == "custom" else None
    result = finetune(model, tok, data, recipe.train, progress="implant" if progress else False)
    model = result.model
    train_s = time.time() - t0
    manifest: dict[str, Any] = {
        "kind": SUSPICIOUS_KIND,
        "format": 1,
        "setting": recipe.setting,
        "base": base_ref,
        **({"base_path": base_path} if base_path else {}),
        "attack": resolve_attack(recipe.attack).to_dict(),
        "task": resolve_task(recipe.task).to_dict(),
        "skill": recipe.skill,
        "recipe": recipe.to_dict(),
        "data": dataset_summary(data),
        "data_hash": stable_hash([e.to_dict() for e in data]),
        "train_seconds": round(train_s, 1),
        "train_stats": result.stats,
        "versions": versions(),
    }
    report = None
    if evaluate:
        report = evaluate_model(
            model,
            tok,
            recipe.attack,
            recipe.task,
            recipe.eval,
            skill=recipe.skill,
            label="suspicious",
            progress=progress,
        )
        manifest["eval"] = report.summary
    manifest["wall_seconds"] = round(time.time() - t0, 1)
    sm = SuspiciousModel(model=model, tokenizer=tok, manifest=manifest)
    if out is not None:
        sm.path = save_suspicious(
            sm,
            out,
            data=data,
            history=result.history,
            replies=report.replies if report else None,
            overwrite=overwrite,
        )
    return sm


def save_suspicious(
    sm: SuspiciousModel,
    out: str | Path,
    *,
    data: list[Example] | None = None,
    history: Any = None,
    replies: Any = None,
    overwrite: bool = True,
) -> Path:
    """Write the artifact directory atomically (``overwrite``: the policy of ``artifacts.atomic_dir``)."""
    out = Path(out)
    with atomic_dir(out, kind=SUSPICIOUS_KIND, overwrite=overwrite) as tmp:
        sub = tmp / ("adapter" if sm.setting == "lora" else "model")
        sm.model.save_pretrained(sub, safe_serialization=True)
        sm.tokenizer.save_pretrained(sub if sm.setting == "full" else tmp / "tokenizer")
        if data is not None:
            save_jsonl(data, tmp / "train_data.jsonl")
        if history is not None:
            history.to_csv(tmp / "history.csv", index=False)
        if replies is not None and len(replies):
            replies.to_csv(tmp / "eval_replies.csv", index=False)
        write_json(tmp / MANIFEST, sm.manifest)
    return out


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def adapter_base(path: str | Path, adapter: Path, manifest: dict[str, Any]) -> str | Path:
    """Where a LoRA adapter's base is, when no ``base`` is given: the default model for an artifact made
    from it, else the base recorded by bdvax (``base_path``) or by peft (``base_model_name_or_path``)
    when that is a local directory. Otherwise a one-line error saying what to pass; never the hub."""
    from ..core.models import read_adapter_config

    if manifest.get("kind") and manifest.get("base", "default") == "default":
        return "default"
    recorded = manifest.get("base_path")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    named = read_adapter_config(adapter).get("base_model_name_or_path")
    if named and Path(str(named)).expanduser().is_dir():
        return Path(str(named)).expanduser()
    said = f"its base {named!r}" if named else "its base (unnamed in adapter_config.json)"
    raise ModelDirError(
        f"{path}: a LoRA adapter, and {said} is not a local directory; pass --base DIR (the model it was "
        "trained on: a local Hugging Face directory or .gguf file; 'default' for bdvax's SmolLM2) — bdvax "
        "never downloads"
    )


def load_suspicious(
    path: str | Path,
    *,
    trainable: bool = False,
    device: Any = None,
    dtype: Any = None,
    base: Any = None,
    chat_template: str | Path | None = None,
) -> SuspiciousModel:
    """Open a suspicious model: a bdvax artifact dir, a bare peft adapter dir or a bare HF model dir.

    An adapter is attached to ``base``: a ``(model, tokenizer)`` pair (LoRA layers are injected into that
    model in place), or a base named as :func:`bdvax_lab.core.models.resolve_base` accepts (a local HF
    directory, a ``.gguf`` file, ``"default"``). Without ``base``: :func:`adapter_base` (the default model
    for an artifact made from it, else the recorded base when it is a local directory, else an error
    saying what to pass). The tokenizer is the artifact's own when it has one (its chat template
    included), else the base's; ``chat_template`` (a built-in name or a Jinja file) supplies or replaces
    its template. The manifest is returned for evaluation only; the defence never reads the attack
    from it.
    """
    from ..core.models import open_base, resolve_base
    from ..core.templates import use_chat_template

    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{path}: suspicious model directory not found")
    manifest = read_json(path / MANIFEST) if (path / MANIFEST).exists() else {}
    if not isinstance(manifest, dict):
        raise ModelDirError(f"{path / MANIFEST}: not a JSON object")
    if (path / "adapter").is_dir() or (path / "adapter_config.json").exists():
        adapter = path / "adapter" if (path / "adapter").is_dir() else path
        own_tok = next((d for d in (path / "tokenizer", adapter) if _has_tokenizer(d)), None)
        if isinstance(base, tuple):
            model, tok = base
            base_label = "the given base model"
            if tok is None:
                tok = load_tokenizer(own_tok or adapter, chat_template=chat_template)
            elif chat_template is not None:
                use_chat_template(tok, chat_template, str(path))
        else:
            where = base if base is not None else adapter_base(path, adapter, manifest)
            base_dir = resolve_base(where)
            model, tok = open_base(base_dir, device=device, dtype=dtype, chat_template=chat_template)
            if own_tok is not None:
                tok = load_tokenizer(own_tok, chat_template=chat_template)
            base_label = f"base {where}"
            manifest["base_path"] = str(base_dir.resolve())
        model = load_adapter(model, adapter, trainable=trainable, base_name=base_label)
        manifest.setdefault("setting", "lora")
    elif (path / "model").is_dir() or (path / "config.json").exists():
        model, tok = load_model(
            path / "model" if (path / "model").is_dir() else path,
            device=device,
            dtype=dtype,
            chat_template=chat_template,
        )
        manifest.setdefault("setting", "full")
    else:
        raise ModelDirError(f"{path}: neither a bdvax artifact, a peft adapter nor a HF model directory")
    model.train(False)
    return SuspiciousModel(model=model, tokenizer=tok, manifest=manifest, path=path)


def stage_replies(evals: dict[str, Any]) -> Any:
    """Every evaluated stage's replies in one frame (column ``stage`` first); empty when none has any."""
    import pandas as pd

    frames = [
        ev.replies.assign(stage=stage)[["stage", *ev.replies.columns]]
        for stage, ev in evals.items()
        if ev.replies is not None and len(ev.replies)
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def spec_name(x: Any) -> Any:
    """The name of an attack/task given as a name, a spec object or a manifest dict."""
    if x is None or isinstance(x, str):
        return x
    if isinstance(x, dict):
        return x.get("name")
    return getattr(x, "name", str(x))


def eval_target(
    suspicious: SuspiciousModel, attack: Any, task: Any, who: str = "evaluation"
) -> tuple[Any, Any]:
    """Attack and task for *measuring* ASR only: explicit arguments first, then the manifest.

    Defences never call this for their own decisions; only their final evaluation does.
    """
    import warnings

    m = suspicious.manifest or {}
    attack = attack if attack is not None else m.get("attack")
    task = task if task is not None else m.get("task")
    if (attack is None) != (task is None):
        warnings.warn(f"{who}: only one of attack/task is known; ASR is skipped (pass both)", stacklevel=3)
        return None, None
    return attack, task


def eval_skill(suspicious: SuspiciousModel, skill: Any = None) -> Any:
    """The skill to *measure* (``skill`` if given, else the manifest's): evaluation only, never the
    defence."""
    return skill if skill is not None else (suspicious.manifest or {}).get("skill")


def suspicious_dir(
    runs_dir: str | Path,
    attack: str,
    task: str,
    setting: str = "lora",
    steps: int | None = None,
    *,
    skill: str | None = None,
    seed: int = 0,
    defensive_poison: float = 0.0,
) -> Path:
    """Where the shared suspicious artifact of ``attack``/``task``/``setting`` lives under ``runs_dir``.

    ``runs/attack_matrix/<attack>-<task>-<setting>[-<skill>][-seed<n>]`` for the recipe's implant budget,
    with a ``-steps<n>`` suffix for any other, so a cheap model never takes the recipe model's place, and
    ``-mbpoison<share>`` for a finetune carrying MB-Defense's defensive poison.
    The reproduction, the bench, the benchmarks and the notebooks share artifacts through these names.
    """
    name = (
        f"{attack}-{task}-{setting}"
        + (f"-{skill}" if skill else "")
        + (f"-seed{seed}" if seed else "")
        + ("" if steps is None else f"-steps{steps}")
        + (f"-mbpoison{defensive_poison:g}" if defensive_poison else "")
    )
    return Path(runs_dir) / "attack_matrix" / name


def open_or_make_suspicious(
    path: str | Path,
    attack: Any = "badnets",
    task: Any = "refusal",
    setting: str = "lora",
    *,
    base: tuple[Any, Any] | None = None,
    steps: int | None = None,
    skill: str | None = None,
    seed: int = 0,
    n_prompts: int = 50,
    progress: bool = False,
    defensive_poison: float = 0.0,
) -> SuspiciousModel:
    """Open the suspicious artifact at ``path``; train it first with the default recipe if it is missing.

    ``skill`` (None: the backdoor-only finetune of the paper reproduction) and ``seed`` choose the
    recipe; an existing artifact made with another skill is refused, like one of another budget.
    ``defensive_poison``: the recipe's MB-Defense share per defensive trigger (0: none); an existing
    artifact made with another share is refused too.

    ``base=(model, tokenizer)`` is a custom base (e.g. the tiny test model) used for
    training and for re-attaching the adapter; it is copied, never modified.
    ``steps`` overrides the recipe's training steps; an existing artifact trained
    for another number of steps is then refused (``ValueError``), so a cheap model
    never stands in for the recipe's one. Notebooks and benchmarks share
    artifacts through this one function.
    """
    import copy

    path = Path(path)
    fresh = (lambda: (copy.deepcopy(base[0]), base[1])) if base is not None else (lambda: None)
    if not (path / MANIFEST).exists():
        recipe = AttackRecipe(
            attack=attack,
            task=task,
            setting=setting,
            skill=skill,
            seed=seed,
            eval=EvalConfig(n_prompts=n_prompts, utility=("skill",) if skill else ()),
            defensive_poison=defensive_poison,
        )
        if steps is not None:
            recipe.train = recipe.train.replace(steps=steps)
        t0 = time.time()
        make_suspicious_model(recipe=recipe, base=fresh(), out=path, progress=progress)
        print(f"trained {path} in {time.time() - t0:.0f} s")
    else:  # an artifact trained with another skill or budget must not stand in for this one silently
        manifest = read_json(path / MANIFEST)
        if manifest.get("skill") != skill:
            raise ValueError(
                f"{path} was made with skill {manifest.get('skill')!r}, not {skill!r}; use "
                "another directory (suspicious_dir(..., skill=...) names them apart)"
            )
        made_dp = manifest.get("recipe", {}).get("defensive_poison", 0.0)
        if made_dp != defensive_poison:
            raise ValueError(
                f"{path} was made with defensive_poison={made_dp}, not {defensive_poison}; use another "
                "directory (suspicious_dir(..., defensive_poison=...) names them apart)"
            )
        made = manifest.get("recipe", {}).get("train", {}).get("steps")
        if steps is not None and made is not None and made != steps:
            raise ValueError(
                f"{path} was trained for {made} steps, not the {steps} asked for; use another "
                "directory, or leave the budget unset (steps=None, no --attack-steps) to use it as it is"
            )
    return load_suspicious(path, base=fresh() if (path / "adapter").is_dir() else None)
