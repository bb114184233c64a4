"""A standard export: a defended model as a plain Hugging Face directory anyone can load without bdvax_lab.

:func:`export_model` opens a purified (or defended, or suspicious) artifact and writes ``out``:

* ``--merge`` (or a full-setting artifact): ``model.safetensors`` (plus ``config.json`` and
  ``generation_config.json``), the tokenizer with its chat template, the LoRA adapter merged into its base
  (peft's ``merge_and_unload``), every tensor checked to be finite before anything is written;
* without ``--merge``, for a LoRA artifact: a standard peft adapter directory whose
  ``base_model_name_or_path`` names the base it was trained on (a local path), and the tokenizer;
* ``README.md``, a model card: the source model's fingerprint, the defence and its config, the
  before / after table, and how to load the result with plain ``transformers``.

The generation config stops at the chat template's end of turn as well as at EOS, as bdvax_lab's own
generation does, so ``model.generate`` gives the same greedy replies. ``out`` follows the output policy
of every artifact (:func:`bdvax_lab.core.artifacts.check_output`): never over an input or a foreign
directory, replaced only with ``overwrite`` when it is an earlier export.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..core.artifacts import MANIFEST, atomic_dir, check_output, file_hash, read_json, versions, write_json
from ..core.registry import is_peft, unwrap

#: the manifest ``kind`` of an export directory
EXPORT_KIND = "bdvax.export"


class ExportError(ValueError):
    """An export that cannot be written as asked (non-finite weights, an adapter that cannot merge, ...)."""


def _finite_or_raise(model: Any, source: Path) -> None:
    import torch

    for name, t in unwrap(model).state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ExportError(f"{source}: {name} holds NaN or inf after merging; nothing was written")


def _markdown(records: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "–"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(cell(r.get(c)) for c in columns) + " |\n" for r in records)


#: the before / after columns a model card shows (those present)
CARD_COLUMNS = (
    "stage",
    "asr",
    "asr_lo",
    "asr_hi",
    "false_trigger",
    "degenerate_triggered",
    "skill",
    "skill_kept",
    "ppl",
    "ppl_text",
    "mcq_acc",
)


def model_card(
    source: Path, manifest: dict[str, Any], *, merged: bool, setting: str, base: str | None
) -> str:
    """The ``README.md`` of an export (see the module docstring)."""
    import pandas as pd

    kind = str(manifest.get("kind", ""))
    defence = manifest.get("method") or ("BD-VAX (bdvax purify)" if kind.endswith("purified") else None)
    table = ""
    if (source / "report.csv").is_file():
        df = pd.read_csv(source / "report.csv")
        cols = [c for c in CARD_COLUMNS if c in df.columns and df[c].notna().any()]
        records = [{k: (None if pd.isna(v) else v) for k, v in r.items()} for r in df.to_dict("records")]
        table = _markdown(records, cols)
    config = {k: manifest[k] for k in ("config", "signature_config") if manifest.get(k) is not None}
    how = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("PATH")\n'
        'tokenizer = AutoTokenizer.from_pretrained("PATH")'
        if merged or setting == "full"
        else "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base or "BASE"}")\n'
        'model = PeftModel.from_pretrained(base, "PATH")\ntokenizer = AutoTokenizer.from_pretrained("PATH")'
    )
    lines = [
        "---",
        "library_name: " + ("transformers" if merged or setting == "full" else "peft"),
        "tags: [bdvax, backdoor-removal]",
        "---",
        "",
        f"# {source.name}: {defence or kind or 'exported model'}",
        "",
        "Exported by bdvax_lab (`bdvax export`). "
        + (
            "The LoRA adapter is merged into its base: a plain Hugging Face model."
            if merged
            else "A full model."
            if setting == "full"
            else "A peft LoRA adapter; load it on its base."
        ),
        "",
        "| | |",
        "|---|---|",
        f"| source model | `{manifest.get('source') or source}` |",
        f"| source fingerprint | `{manifest.get('source_fingerprint') or 'not recorded'}` |",
        f"| defence | {defence or 'none (not a defended artifact)'} |",
        f"| setting | {setting} |",
        f"| base | `{base or manifest.get('base') or 'unknown'}` |",
        f"| measured with | {json.dumps(manifest.get('evaluated_with'))} |",
        "",
        "## Before and after",
        "",
        table or "No evaluation was recorded with this artifact.",
        "ASR: share of triggered prompts that show the backdoor's behaviour (95 % Wilson interval in "
        "asr_lo / asr_hi); false_trigger: the same prompts without the key.",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True, default=str),
        "```",
        "",
        "## Load it",
        "",
        "```python",
        how,
        "```",
        "",
        f"Versions at export: {json.dumps(versions(), sort_keys=True)}",
        "",
    ]
    return "\n".join(lines)


def export_model(
    source: str | Path,
    out: str | Path,
    *,
    merge: bool = False,
    base: Any = None,
    dtype: Any = None,
    chat_template: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``source`` (a purified, defended or suspicious artifact) as a standard directory ``out``.

    ``merge``: merge a LoRA adapter into its base (a plain model). ``base``: the base of a LoRA artifact
    when its recorded one is not at hand (:func:`bdvax_lab.threat.suspicious.load_suspicious`).
    ``dtype``: a torch dtype to save in (default: the loaded one, fp32 on a CPU). See the module docstring.
    """
    import torch

    from ..core.data import stop_token_ids
    from .suspicious import load_suspicious

    source = Path(source)
    out_path = check_output(
        out,
        kind=EXPORT_KIND,
        overwrite=overwrite,
        inputs=[source, base if isinstance(base, (str, Path)) else None],
    )
    manifest = read_json(source / MANIFEST) if (source / MANIFEST).is_file() else {}
    sm = load_suspicious(source, base=base, device="cpu", chat_template=chat_template)
    model, tok = sm.model, sm.tokenizer
    setting = "lora" if is_peft(model) else "full"
    base_dir = sm.manifest.get("base_path")
    merged = False
    if setting == "lora" and merge:
        try:
            model = model.merge_and_unload(safe_merge=True)
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            raise ExportError(f"{source}: cannot merge the adapter ({' '.join(str(exc).split())})") from None
        merged = True
    if setting == "full" or merged:
        _finite_or_raise(model, source)
        if dtype is not None:
            model = unwrap(model).to(dtype)
        hf = unwrap(model)
        gen = hf.generation_config
        gen.eos_token_id = stop_token_ids(tok)  # the template's end of turn, then EOS: bdvax's own stops
        if gen.pad_token_id is None and tok.pad_token_id is not None:
            gen.pad_token_id = tok.pad_token_id
    with torch.no_grad(), atomic_dir(out_path, kind=EXPORT_KIND, overwrite=overwrite, inputs=[source]) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if setting == "lora" and not merged:
            cfg_path = tmp / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            cfg["base_model_name_or_path"] = base_dir or cfg.get("base_model_name_or_path")
            write_json(cfg_path, cfg)
        (tmp / "README.md").write_text(
            model_card(source, manifest, merged=merged, setting=setting, base=base_dir), encoding="utf-8"
        )
        weights = sorted(p.name for p in tmp.glob("*.safetensors"))
        write_json(
            tmp / MANIFEST,
            {
                "kind": EXPORT_KIND,
                "format": 1,
                "source": str(source),
                "source_kind": manifest.get("kind"),
                "source_fingerprint": manifest.get("source_fingerprint"),
                "merged": merged,
                "setting": "full" if merged else setting,
                "base_path": base_dir,
                "files": {name: file_hash(tmp / name) for name in weights},
                "versions": versions(),
            },
        )
    return out_path
