"""Optional adapter: evaluate a bdvax model with EleutherAI's lm-evaluation-harness.

``lm_eval`` is *not* a dependency. Without it, :class:`BdvaxLM` still works on
any objects with an ``.args`` tuple (or on bare tuples), which is how it is
tested. With it installed, :class:`BdvaxLM` subclasses ``lm_eval.api.model.LM``
and is registered as ``"bdvax"`` when this module is imported::

    import lm_eval, bdvax_lab.lm_eval_adapter  # registers "bdvax"
    lm_eval.simple_evaluate(model="bdvax", model_args="path=runs/suspicious,batch_size=8", tasks=[...])
    # or pass an instance: lm_eval.simple_evaluate(model=BdvaxLM(model, tok), tasks=[...])

``chat_template=True`` (default) renders each context as the user turn of the
model's chat template and scores/generates the assistant reply, as bdvax trains
and evaluates. Do not also pass the harness's ``--apply_chat_template`` then;
use ``chat_template=False`` (raw text) if the harness should do the templating.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.data import format_prompt, stop_token_ids
from ..core.registry import unwrap
from ..core.scoring import softcap_logits

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..core.types import Model

MODEL_NAME = "bdvax"


DEFAULT_MAX_GEN_TOKS = 256


_LOGIT_CHUNK = 512  # rows of [chunk, vocab] logits materialised at once


try:  # every lm_eval import is guarded: the module must import without the harness
    from lm_eval.api.model import LM as _Base

    HAVE_LM_EVAL = True
    _LM_EVAL_ERROR: BaseException | None = None
except Exception as _exc:  # ImportError, or a broken install
    HAVE_LM_EVAL = False
    _LM_EVAL_ERROR = _exc

    class _Base:  # type: ignore[no-redef]
        """Stand-in for ``lm_eval.api.model.LM`` when the harness is not installed."""

        def __init__(self) -> None:
            self._rank = 0
            self._world_size = 1

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size


def _args(request: Any) -> tuple:
    """A request's argument tuple: ``Instance.args`` (duck-typed) or the tuple itself."""
    args = getattr(request, "args", request)
    return tuple(args) if isinstance(args, (tuple, list)) else (args,)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def _parse_batch_size(value: Any) -> int | None:
    """An int, or None for the harness's ``auto``/``auto:N`` (keep the default)."""
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        return None
    return int(value)


class BdvaxLM(_Base):
    """lm-eval ``LM`` over a bdvax (HF or peft) causal LM.

    Loglikelihood, rolling loglikelihood and greedy generation.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: PreTrainedTokenizerBase,
        *,
        chat_template: bool = True,
        batch_size: int = 16,
        max_length: int = 2048,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    ) -> None:
        super().__init__()
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and max_length={max_length} >= 2")
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "tokenizer has no chat template; construct BdvaxLM(..., chat_template=False) for raw text"
            )
        self.model = model
        self.tokenizer = tokenizer
        # not ``self.chat_template``: lm_eval's LM has a ``chat_template()`` method that the harness calls
        self.use_chat_template = bool(chat_template)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dir(cls, path: str | Path, *, device: Any = None, **kwargs: Any) -> BdvaxLM:
        """Open a bdvax artifact dir, a peft adapter dir or an HF model dir (via ``load_suspicious``)."""
        from .suspicious import load_suspicious

        sm = load_suspicious(path, device=device)
        return cls(sm.model, sm.tokenizer, **kwargs)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> BdvaxLM:
        """Build from ``"path=DIR,batch_size=8,chat_template=True,max_length=2048,device=cpu"``.

        ``pretrained`` is accepted as an alias of ``path``. Keys in ``arg_string``
        win over the harness's ``additional_config`` (``batch_size``, ``device``, ...).
        """
        given: dict[str, str] = {}
        for part in (arg_string or "").split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"bad model_args item {part!r}: expected key=value")
            given[key.strip()] = value.strip()
        if "pretrained" in given:
            given.setdefault("path", given.pop("pretrained"))
        allowed = {"path", "batch_size", "chat_template", "max_length", "max_gen_toks", "device"}
        unknown = sorted(set(given) - allowed)
        if unknown:
            raise ValueError(f"unknown bdvax model_args {unknown}; allowed: {sorted(allowed)}")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in allowed}
        merged: dict[str, Any] = {**extra, **given}
        if "path" not in merged:
            raise ValueError(
                "bdvax model_args need path=DIR (a bdvax artifact, peft adapter or HF model directory)"
            )
        kwargs: dict[str, Any] = {}
        if "batch_size" in merged and _parse_batch_size(merged["batch_size"]) is not None:
            kwargs["batch_size"] = _parse_batch_size(merged["batch_size"])
        if "chat_template" in merged:
            kwargs["chat_template"] = _parse_bool(merged["chat_template"])
        for key in ("max_length", "max_gen_toks"):
            if key in merged:
                kwargs[key] = int(merged[key])
        device = merged.get("device") or None
        return cls.from_dir(merged["path"], device=device, **kwargs)

    # ------------------------------------------------------------------ small helpers
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "bdvax")).replace("/", "__")

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render a harness chat history.

        Only when ``chat_template=False``; otherwise it would wrap twice.
        """
        if self.use_chat_template:
            raise ValueError(
                "BdvaxLM(chat_template=True) already wraps every context in the chat template; "
                "drop the harness's --apply_chat_template or pass chat_template=False"
            )
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _prefix_id(self) -> int:
        """Token that conditions an empty raw context (BOS, else EOS), as the harness does."""
        tok = self.tokenizer
        pid = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if pid is None:
            raise ValueError("tokenizer has neither a BOS nor an EOS token to condition an empty context on")
        return int(pid)

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for pid in (tok.pad_token_id, tok.eos_token_id, 0):
            if pid is not None:
                return int(pid)
        return 0

    def _context_ids(self, context: str) -> list[int]:
        """Prompt tokens: the chat-formatted user turn, or the raw context text."""
        if self.use_chat_template:
            return self._encode(format_prompt(self.tokenizer, context))
        return self._encode(context)

    def _pair_ids(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), each tokenized on its own.

        Chat: the continuation starts the assistant reply, leading whitespace removed
        (a reply never starts with the harness's " " target delimiter). Raw: trailing
        whitespace of the context moves to the continuation ("Answer: "+"A" → "Answer:"+" A").
        """
        if self.use_chat_template:
            return self._context_ids(context), self._encode(continuation.lstrip())
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        ctx = self._encode(stripped)
        return (ctx or [self._prefix_id()]), self._encode(continuation)

    def _batches(self, n: int, disable: bool, desc: str) -> Iterable[range]:
        from tqdm.auto import tqdm

        starts = range(0, n, self.batch_size)
        for s in tqdm(starts, desc=desc, disable=disable or len(starts) <= 1, leave=False):
            yield range(s, min(n, s + self.batch_size))

    # ------------------------------------------------------------------ scoring core
    @torch.no_grad()
    def _score(
        self,
        items: Sequence[tuple[list[int], int]],
        *,
        disable_tqdm: bool = False,
        desc: str = "loglikelihood",
    ) -> list[tuple[float, bool]]:
        """For each ``(ids, n)``: sum log p of the last ``n`` tokens of ``ids`` given the ones before, and
        whether each of them is the argmax. Sequences keep their last ``max_length + 1`` tokens."""
        prepared = []
        for ids, n in items:
            ids = list(ids)[-(self.max_length + 1) :]
            prepared.append((ids, min(n, len(ids) - 1)))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(prepared)
        order = sorted((i for i, (_, n) in enumerate(prepared) if n > 0), key=lambda i: -len(prepared[i][0]))
        base = unwrap(self.model)
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        dev, pad = self.device, self._pad_id()
        was = self.model.training
        self.model.train(False)
        try:
            for rows in self._batches(len(order), disable_tqdm, desc):
                idx = [order[r] for r in rows]
                width = max(len(prepared[i][0]) for i in idx) - 1
                inp = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros_like(inp)
                sel = torch.zeros((len(idx), width), dtype=torch.bool)
                targets = []
                for r, i in enumerate(idx):  # right padding; input = ids[:-1], target = ids[1:]
                    ids, n = prepared[i]
                    inp[r, : len(ids) - 1] = torch.tensor(ids[:-1])
                    mask[r, : len(ids) - 1] = 1
                    sel[r, len(ids) - 1 - n : len(ids) - 1] = True
                    targets.extend(ids[len(ids) - n :])
                hidden = decoder(input_ids=inp.to(dev), attention_mask=mask.to(dev)).last_hidden_state
                picked = hidden[sel.to(dev)]  # [M, H], row-major = per sample, in order
                tgt = torch.tensor(targets, device=dev)
                logp = torch.empty(len(targets), dtype=torch.float64)
                greedy = torch.empty(len(targets), dtype=torch.bool)
                for s in range(0, len(targets), _LOGIT_CHUNK):
                    logits = softcap_logits(base, head(picked[s : s + _LOGIT_CHUNK])).float()
                    t = tgt[s : s + _LOGIT_CHUNK]
                    lp = torch.log_softmax(logits, -1).gather(1, t[:, None])[:, 0]
                    logp[s : s + len(t)] = lp.double().cpu()
                    greedy[s : s + len(t)] = (logits.argmax(-1) == t).cpu()
                pos = 0
                for i in idx:
                    n = prepared[i][1]
                    out[i] = (float(logp[pos : pos + n].sum()), bool(greedy[pos : pos + n].all()))
                    pos += n
        finally:
            self.model.train(was)
        return out

    # ------------------------------------------------------------------ the LM interface
    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(context, continuation)`` → ``(sum log p(continuation | context), continuation is greedy)``."""
        items = []
        for req in requests:
            context, continuation = _args(req)[:2]
            ctx, cont = self._pair_ids(context, continuation)
            items.append((ctx + cont, len(cont)))
        return self._score(items, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """``(text,)`` → total log-likelihood of the raw text after a BOS/EOS prefix.

        Never chat-formatted. Texts longer than ``max_length`` are scored in windows:
        each token is predicted once, each window with as much preceding context as fits.
        """
        items, owner = [], []
        for k, req in enumerate(requests):
            seq = [self._prefix_id()] + self._encode(_args(req)[0])
            for start in range(1, len(seq), self.max_length):
                end = min(len(seq), start + self.max_length)
                items.append((seq[max(0, end - 1 - self.max_length) : end], end - start))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(
            owner, self._score(items, disable_tqdm=disable_tqdm, desc="loglikelihood_rolling")
        ):
            totals[k] += lp
        return totals

    @torch.no_grad()
    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """``(context, gen_kwargs)`` → greedy text, cut before the first ``until`` string, at most
        ``max_gen_toks`` tokens. Chat replies are stripped like :func:`bdvax_lab.generate.generate`."""
        from transformers import GenerationConfig, StoppingCriteriaList

        parsed = []
        for req in requests:
            args = _args(req)
            context, kw = args[0], dict(args[1] if len(args) > 1 and args[1] else {})
            if kw.get("do_sample"):
                raise ValueError("BdvaxLM.generate_until is greedy only; the task asked for do_sample=True")
            until = kw.get("until") or []
            until = [u for u in ([until] if isinstance(until, str) else until) if u]
            max_new = int(kw.get("max_gen_toks") or kw.get("max_new_tokens") or self.max_gen_toks)
            ids = self._context_ids(context) or [self._prefix_id()]
            ids = ids[-max(1, self.max_length - max_new) :]
            parsed.append((ids, max_new, tuple(until)))
        tok = self.tokenizer
        base_stops = (
            stop_token_ids(tok)
            if self.use_chat_template
            else ([int(tok.eos_token_id)] if tok.eos_token_id is not None else [])
        )
        special = set(getattr(tok, "all_special_tokens", []))
        pad = self._pad_id()
        out = [""] * len(parsed)
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
        for i, (_ids, max_new, until) in enumerate(parsed):
            groups.setdefault((max_new, until), []).append(i)
        was = self.model.training
        self.model.train(False)
        try:
            for (max_new, until), members in groups.items():
                members.sort(key=lambda i: len(parsed[i][0]))
                # an until string that is a special token (e.g. "<|endoftext|>") stops on its id:
                # decoding drops it
                stops = base_stops + [int(tok.convert_tokens_to_ids(u)) for u in until if u in special]
                cfg = GenerationConfig(
                    do_sample=False,
                    max_new_tokens=max_new,
                    eos_token_id=stops or None,
                    pad_token_id=pad,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
                for rows in self._batches(len(members), disable_tqdm, "generate_until"):
                    idx = [members[r] for r in rows]
                    width = max(len(parsed[i][0]) for i in idx)
                    inp = torch.full((len(idx), width), pad, dtype=torch.long)
                    mask = torch.zeros_like(inp)
                    for r, i in enumerate(idx):  # left padding
                        ids = parsed[i][0]
                        inp[r, width - len(ids) :] = torch.tensor(ids)
                        mask[r, width - len(ids) :] = 1
                    criteria = StoppingCriteriaList(
                        [_stop_on_strings(self.tokenizer, until, width)] if until else []
                    )
                    gen = self.model.generate(
                        input_ids=inp.to(self.device),
                        attention_mask=mask.to(self.device),
                        generation_config=cfg,
                        stopping_criteria=criteria,
                    )
                    for r, i in enumerate(idx):
                        new = gen[r, width:].tolist()
                        cut = next((j for j, t in enumerate(new) if t in stops), len(new))
                        text = self.tokenizer.decode(new[:cut], skip_special_tokens=True)
                        hits = [text.find(u) for u in until if u in text]
                        text = text[: min(hits)] if hits else text
                        out[i] = text.strip() if self.use_chat_template else text
        finally:
            self.model.train(was)
        return out


def _stop_on_strings(tokenizer: Any, until: Sequence[str], start: int) -> Any:
    """Stopping criterion: a row is done once its *generated* text (not the prompt) contains an ``until``
    string. (transformers' ``stop_strings`` also matches across the prompt boundary, stopping too early.)"""
    from transformers import StoppingCriteria

    lookback = max(len(u) for u in until) + 2  # tokens; every token decodes to >= 1 character

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            tails = tokenizer.batch_decode(input_ids[:, start:][:, -lookback:], skip_special_tokens=True)
            return torch.tensor(
                [any(u in t for u in until) for t in tails], dtype=torch.bool, device=input_ids.device
            )

    return _Stop()


# ---------------------------------------------------------------------- registration
def register() -> type[BdvaxLM]:
    """Register :class:`BdvaxLM` with lm-eval as ``"bdvax"`` (idempotent); needs ``pip install lm-eval``."""
    if not HAVE_LM_EVAL:
        raise ImportError(
            "lm-evaluation-harness is not installed (optional): `pip install lm-eval` to evaluate "
            f"bdvax models with it (import failed: {_LM_EVAL_ERROR!r})"
        ) from _LM_EVAL_ERROR
    from lm_eval.api import registry

    try:
        if registry.get_model(MODEL_NAME) is BdvaxLM:
            return BdvaxLM
    except Exception:  # not registered yet (KeyError or ValueError depending on the lm_eval version)
        pass
    registry.register_model(MODEL_NAME)(BdvaxLM)
    return BdvaxLM


if HAVE_LM_EVAL:
    try:
        register()
    except Exception as _exc:  # a name clash must not break importing the module
        warnings.warn(f"could not register BdvaxLM with lm_eval as {MODEL_NAME!r}: {_exc}", stacklevel=2)
