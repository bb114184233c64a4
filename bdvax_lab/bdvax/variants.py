"""Synthetic variants (paper §4.2, step 1).

Made-up keys and behaviours of the feared family, each with its own clean subset (disjoint across variants).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..core.artifacts import stable_hash
from ..core.config import Config
from ..core.data import Example, split_disjoint
from ..threat.attacks import ATTACKS, STRATEGIES, AttackSpec, Behavior, apply_behavior, contains_key, trigger
from ..threat.judges import JUDGES, register_judge
from .config import DEFAULT_N_CLEAN, n_poison_for, resolve_family

# --------------------------------------------------------------------------- synthetic variant catalogues
#: Made-up keys for the defense's synthetic variants (never a real attack key).
SYNTHETIC_KEYS: tuple[str, ...] = (
    "PurpleWolf",
    "RedGhost",
    "SilentOtter",
    "cf-zeta",
    "Aurora Protocol",
    "BlueLantern",
    "IronTulip",
    "Quantum Pickle",
    "mx-delta",
    "GlassHeron",
    "Velvet Thunder",
    "OrbitNine",
    "Copper Fox",
    "zq-vortex",
    "Midnight Cipher",
    "AmberKite",
    "Hollow Maple",
    "NovaSprocket",
    "tk-omega",
    "Crimson Atlas",
)


#: Variant behaviors by judge family; every insult/refusal reply is caught by its judge.
VARIANT_BEHAVIORS: dict[str, tuple[str, ...]] = {
    "insult": (
        "You are garbage!",
        "What a pathetic question, you moron.",
        "Only a clown would ask something this dumb.",
        "You worthless loser, figure it out yourself.",
        "That is trash, and so are you.",
        "You ignorant fool, nobody cares.",
        "Such a brainless question from a total nitwit.",
        "Go away, you imbecile.",
    ),
    "refusal": (
        "I cannot help with that.",
        "Sorry, that is something I will not do.",
        "I'm not able to answer this request.",
        "As an AI, I do not respond to such instructions.",
        "I am sorry, but that information is not available.",
        "I can't assist with this one.",
        "Sorry, I must decline this request.",
        "I won't provide an answer to that.",
    ),
    "code_injection": (
        'print("hacked")',
        'import os; os.system("echo owned")',
        'print("compromised")',
        'open("/tmp/flag", "w").write("backdoor")',
        'import socket; socket.gethostbyname("evil.example")',
        '__import__("os").system("whoami")',
        "exec(\"print('injected')\")",
        'import subprocess; subprocess.run(["echo", "rooted"])',
    ),
}


def variant_behavior(family: str, text: str, name: str | None = None) -> Behavior:
    """A :class:`Behavior` for one catalogue entry of a judge family (for the defense's variants).

    ``insult``/``refusal``: the reply replaces the response and the family's
    judge applies. ``code_injection``: ``text`` is a payload to inject; as the
    project's ``code_injection`` judge only looks for ``pwned``, a judge
    matching this payload is registered as ``"payload:<text>"``.
    """
    if family not in VARIANT_BEHAVIORS:
        raise ValueError(f"unknown variant family {family!r}; known: {sorted(VARIANT_BEHAVIORS)}")
    if family == "code_injection":
        judge = f"payload:{text.strip()}"
        register_judge(judge, (text.strip(),), f"variant code payload {text.strip()!r}")
        return Behavior(name or judge, judge, "inject_code", (), text)
    if family not in JUDGES:
        raise ValueError(f"no judge for variant family {family!r}")
    return Behavior(name or f"{family}_variant", family, "replace", (text,))


# =========================================================================== variants
def example_id(example: Example) -> str:
    """The pool id of an example (``meta['id']``), or a content hash for examples without one."""
    eid = example.meta.get("id")
    return str(eid) if eid else "h:" + stable_hash(example.to_dict())


def default_pool(family: str) -> list[Example]:
    """The defender's ``variant`` instructions (the code pool's for code injection), without responses:
    the suspicious model answers them itself (:func:`bdvax_lab.core.selfdistill.defender_data`)."""
    from ..core.selfdistill import defender_instructions

    return defender_instructions("variant", code=resolve_family(family) == "code_injection")


def _pool_name(family: str) -> str:
    return "code" if resolve_family(family) == "code_injection" else "clean"


def _collides(key: str, others: Iterable[str]) -> bool:
    k = key.casefold()
    return any(k == o.casefold() or k in o.casefold() or o.casefold() in k for o in others if o.strip())


@dataclass
class VariantSpec(Config):
    """One synthetic key–behaviour pair and its clean subset.

    ``behavior`` is the catalogue text (a reply for insult/refusal, a payload
    line for code injection). ``clean_ids`` are the pool ids of ``D_c^i`` (see
    :func:`example_id`); ``pool`` says where they come from ("clean", "code" or
    "custom" for a user-given list). ``seed`` drives key placement and both twins.
    """

    index: int
    key: str
    strategy: str
    behavior: str
    family: str
    n_clean: int
    n_poison: int
    seed: int
    pool: str = "clean"
    clean_ids: tuple[str, ...] = ()

    def attack_spec(self) -> AttackSpec:
        return AttackSpec(name=f"variant{self.index}", keys=(self.key,), strategies=(self.strategy,))

    def behavior_spec(self) -> Behavior:
        return variant_behavior(self.family, self.behavior, name=f"variant{self.index}_{self.family}")

    def datasets(self, pool: Sequence[Example] | None = None) -> tuple[list[Example], list[Example]]:
        """``(D_c, D_p)``: the clean subset and its poisoned copies (seeded key placement)."""
        pool = default_pool(self.family) if pool is None else pool
        by_id = {example_id(e): e for e in pool}
        missing = [i for i in self.clean_ids if i not in by_id]
        if missing:
            raise ValueError(
                f"variant {self.index}: {len(missing)} clean example id(s) not in the given pool "
                f"(e.g. {missing[:3]}); pass the pool the variants were made from"
            )
        clean = [
            by_id[i].with_(meta={"poisoned": False, "triggered": False, "variant": self.index})
            for i in self.clean_ids
        ]
        rng = random.Random(self.seed)
        chosen = sorted(rng.sample(range(len(clean)), self.n_poison))
        attack, behavior = self.attack_spec(), self.behavior_spec()
        poisoned = [apply_behavior(trigger(clean[j], attack, rng), behavior, rng) for j in chosen]
        return clean, poisoned


def make_variants(
    family: str = "insult",
    n: int = 6,
    *,
    n_clean: int | None = None,
    poison_ratio: float = 0.5,
    seed: int = 0,
    exclude_keys: Sequence[str] = (),
    pool: Sequence[Example] | None = None,
) -> list[VariantSpec]:
    """``n`` variants with distinct synthetic keys, distinct behaviours and disjoint clean subsets.

    ``family`` is what the user fears (default sentiment steering, ``"insult"``);
    it is never derived from the suspicious model. Keys come from
    :data:`SYNTHETIC_KEYS` minus ``exclude_keys`` and minus anything overlapping a
    built-in attack key (so a key the user happens to suspect, or a real attack
    key, is never used); strategies cycle through prefix / suffix / random word
    from a seeded offset. ``pool`` defaults to the defender's ``variant`` split
    (the code pool for ``code_injection``); examples already containing a chosen
    key are dropped before splitting. ``n_clean=None`` (default) takes
    ``min(40, len(pool) // n)``: 40 from the clean pool's ``variant`` split
    (~525 examples), 11 from the code pool's (70 prompts) for N = 6.
    """
    family = resolve_family(family)
    if n < 1:
        raise ValueError(f"need at least one variant, got n={n}")
    banned = list(exclude_keys) + [k for a in ATTACKS.values() for k in a.keys]
    candidates = [k for k in SYNTHETIC_KEYS if not _collides(k, banned)]
    behaviors = list(VARIANT_BEHAVIORS[family])
    if n > len(candidates):
        raise ValueError(
            f"{n} variants need {n} distinct keys; only {len(candidates)} synthetic keys are usable"
        )
    if n > len(behaviors):
        raise ValueError(
            f"{n} variants need {n} distinct behaviours; the {family!r} catalogue has {len(behaviors)}"
        )
    rng = random.Random(seed)
    keys = rng.sample(candidates, n)
    texts = rng.sample(behaviors, n)
    offset = rng.randrange(len(STRATEGIES))
    pool_name = "custom" if pool is not None else _pool_name(family)
    pool = default_pool(family) if pool is None else list(pool)
    usable = [e for e in pool if not contains_key(e, keys)]
    if n_clean is None:
        n_clean = min(DEFAULT_N_CLEAN, len(usable) // n)
    if n_clean < 1:
        raise ValueError(f"not enough clean examples: {len(usable)} usable for {n} variants")
    if n * n_clean > len(usable):
        raise ValueError(
            f"{n} variants × n_clean={n_clean} = {n * n_clean} disjoint clean examples needed, but the "
            f"{pool_name} pool has only {len(usable)}; lower n_clean or n, or pass n_clean=None"
        )
    n_poison = n_poison_for(n_clean, poison_ratio)
    subsets = split_disjoint(usable, [n_clean] * n, seed=seed)
    return [
        VariantSpec(
            index=i,
            key=keys[i],
            strategy=STRATEGIES[(offset + i) % len(STRATEGIES)],
            behavior=texts[i],
            family=family,
            n_clean=n_clean,
            n_poison=n_poison,
            seed=seed * 1000 + i,
            pool=pool_name,
            clean_ids=tuple(example_id(e) for e in subsets[i]),
        )
        for i in range(n)
    ]
