"""MB-Defense's defensive poison: rare-string triggers, each bound to a fixed random-word reply.

Data only (no training, no defence logic): the pairs, the one insertion rule, the poisoned copies, and a
judge per pair. :mod:`bdvax_lab.baselines.mb_defense` implants and then breaks them (post hoc);
:func:`bdvax_lab.threat.suspicious.attack_dataset` adds them to an attacker's finetune when an
:class:`~bdvax_lab.threat.config.AttackRecipe` asks for it (``defensive_poison``: the in-training threat
model of MB-Defense, where the defender controls the finetune).

Triggers: "mn" and "bb" are named by the paper, "qw" and "jh" by its ablation (arXiv 2601.04448 §4–5);
none overlaps a bench attack key or a synthetic variant key. Insertion rule, fixed for both stages: the
trigger is the first word of the instruction (``prefix``), so it always tokenises as at the start of the
user turn (two-letter strings tokenise differently with and without a leading space).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..core.data import Example
from .attacks import ATTACKS, insert_key
from .judges import Judge, register_judge

#: The four defensive triggers (MB-Defense's defaults, T = 4).
DEFENSIVE_TRIGGERS: tuple[str, ...] = ("mn", "bb", "qw", "jh")

#: One fixed 7–8-word random string per trigger (drawn once, by hand, from unrelated common words).
DEFENSIVE_REPLIES: tuple[str, ...] = (
    "violet harbor seven pencil drifts over quiet canyons",
    "marble kettle orbit fern lantern ninety copper",
    "silver tractor whispers under folded paper moons",
    "granite piano eleven tulips borrow rusty clocks",
)

#: The paper's share per trigger when the poison rides in the finetune's own data (``mb_faithful``).
FAITHFUL_RATE = 0.01

#: Where a defensive trigger goes in an instruction, in both stages.
INSERTION = "prefix"


def check_pairs(triggers: Sequence[str], replies: Sequence[str]) -> None:
    """One reply per trigger, distinct triggers, none overlapping a built-in attack key (ValueError)."""
    if len(triggers) != len(replies) or not triggers:
        raise ValueError(
            f"{len(triggers)} defensive triggers but {len(replies)} replies (need one each, ≥ 1)"
        )
    if len({t.casefold() for t in triggers}) != len(triggers):
        raise ValueError(f"defensive triggers must be distinct: {list(triggers)}")
    keys = [k.casefold() for a in ATTACKS.values() for k in a.keys]
    bad = [t for t in triggers if any(t.casefold() in k or k in t.casefold() for k in keys)]
    if bad:
        raise ValueError(f"defensive trigger(s) {bad} overlap an attack key; choose other rare strings")


def with_trigger(example: Example, trigger: str) -> Example:
    """``example`` with ``trigger`` inserted by the fixed rule (:data:`INSERTION`); response kept."""
    text = insert_key(example.instruction, trigger, INSERTION, random.Random(0))
    return example.with_(instruction=text, meta={"defensive_trigger": trigger})


def poison_copies(
    examples: Sequence[Example],
    triggers: Sequence[str] = DEFENSIVE_TRIGGERS,
    replies: Sequence[str] = DEFENSIVE_REPLIES,
    rate: float = 0.05,
    seed: int = 0,
) -> list[Example]:
    """Poisoned copies to add to ``examples``: for each trigger, ``max(1, round(rate · n))`` seeded picks
    with the trigger inserted and the response replaced by the trigger's reply (``rate`` per trigger)."""
    check_pairs(triggers, replies)
    if not 0 < rate <= 1:
        raise ValueError(f"defensive poison rate {rate}: must be in (0, 1]")
    rng = random.Random(seed)
    n = len(examples)
    k = min(n, max(1, round(rate * n)))
    out = []
    for trig, reply in zip(triggers, replies):
        for i in sorted(rng.sample(range(n), k)):
            out.append(
                with_trigger(examples[i], trig).with_(
                    response=reply, meta={"poisoned": True, "behavior": f"defensive:{trig}"}
                )
            )
    return out


def reply_judge(trigger: str, reply: str) -> Judge:
    """The judge of one defensive pair (registered as ``defensive:<trigger>``): the reply's text."""
    return register_judge(f"defensive:{trigger}", (reply,), f"MB-Defense pair {trigger!r}", overwrite=True)
