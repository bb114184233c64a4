"""Architecture registry: one place that maps abstract sites to module paths.

A *site* is an abstract place in a decoder block ("q", "k", "v", "o" for
attention projections, "gate", "up", "down" for the MLP, plus activation sites
such as "mlp_output"). Everything else in bdvax_lab (deltas, ablations,
signatures, suppression, probes) asks this module for paths, shapes and weights
(:meth:`Layout.weight`) instead of hard-coding LLaMA names.

Fused projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``): kinds that share one module path are
stacked along that module's output rows, in the registry's kind order (q, k, v; gate, up), each with its
own height (q: ``n_heads·head_dim``, k and v: ``n_kv_heads·head_dim``, gate and up: ``d_ff``). So
``q`` is rows ``[0, n_heads·head_dim)`` of ``qkv_proj.weight``, ``up`` rows ``[d_ff, 2·d_ff)`` of
``gate_up_proj.weight``, and a LoRA adapter on the fused module has its ΔW rows (its ``lora_B`` rows)
split the same way. :meth:`Layout.rows` gives the slice, :meth:`Layout.weight` the view; only input-side
kinds can be fused (o and down read the whole head / channel axis as their input columns).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from transformers import PreTrainedModel

    from .types import Model


Key = tuple[int, str]


SETTINGS = ("lora", "full")


ATTN_KINDS: tuple[str, ...] = ("q", "k", "v", "o")


MLP_KINDS: tuple[str, ...] = ("gate", "up", "down")


ALL_KINDS: tuple[str, ...] = ATTN_KINDS + MLP_KINDS


#: Which weight axis indexes an MLP intermediate channel (``nn.Linear.weight`` is [out, in]).
CHANNEL_DIM: dict[str, int] = {"gate": 0, "up": 0, "down": 1}


#: Which weight axis indexes attention heads.
HEAD_DIM_AXIS: dict[str, int] = {"q": 0, "k": 0, "v": 0, "o": 1}


class UnsupportedArchitectureError(ValueError):
    """Raised for a model family that the registry does not describe."""


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one model family (relative to the causal-LM wrapper)."""

    family: str
    blocks: str = "model.layers"
    modules: dict[str, str] = field(
        default_factory=lambda: {
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj",
            "up": "mlp.up_proj",
            "down": "mlp.down_proj",
        }
    )
    #: Activation sites inside a block, for probes (nnsight / hooks).
    sites: dict[str, str] = field(
        default_factory=lambda: {
            "attn_output": "self_attn",
            "mlp_output": "mlp",
            "mlp_hidden": "mlp.down_proj",
        }
    )
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    #: what differs from LLaMA in a way that matters here (``bdvax list architectures`` shows it)
    note: str = ""

    def fused(self) -> dict[str, tuple[str, ...]]:
        """Module paths shared by several kinds → those kinds, stacked in this order along the output rows."""
        groups: dict[str, list[str]] = {}
        for kind in ALL_KINDS:
            if kind in self.modules:
                groups.setdefault(self.modules[kind], []).append(kind)
        return {path: tuple(kinds) for path, kinds in groups.items() if len(kinds) > 1}


#: groups of kinds that may share one module (stacked along its output rows, in this order)
FUSABLE: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("gate", "up"))


_REGISTRY: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec) -> None:
    """Add (or replace) a family. Its ``family`` is the HF ``config.model_type``.

    Every kind of :data:`ALL_KINDS` needs a path; kinds may share a path only within one group of
    :data:`FUSABLE` (an input-side fusion such as ``qkv_proj`` or ``gate_up_proj``).
    """
    missing = [k for k in ALL_KINDS if k not in spec.modules]
    if missing:
        raise UnsupportedArchitectureError(f"{spec.family}: no module path for kind(s) {missing}")
    for path, kinds in spec.fused().items():
        if not any(set(kinds) <= set(group) for group in FUSABLE):
            raise UnsupportedArchitectureError(
                f"{spec.family}: {path} fuses {list(kinds)}; only q/k/v or gate/up can share a module "
                "(stacked along its output rows)"
            )
    _REGISTRY[spec.family] = spec


for _family in ("llama", "mistral", "qwen2", "qwen3"):
    register_architecture(ArchSpec(family=_family))

register_architecture(
    ArchSpec(family="gemma", note="GeGLU MLP (gelu(gate)·up), embeddings scaled by √hidden, tied LM head")
)
register_architecture(
    ArchSpec(
        family="gemma2",
        note="GeGLU MLP, extra pre/post norms, attention and final-logit soft-capping, sliding-window layers",
    )
)
register_architecture(
    ArchSpec(
        family="gemma3_text",
        note="Gemma 3 text models (1B; Gemma3ForCausalLM): GeGLU MLP, q/k norms, sliding-window layers",
    )
)
register_architecture(
    ArchSpec(
        family="gemma3",
        blocks="model.language_model.layers",
        embed="model.language_model.embed_tokens",
        final_norm="model.language_model.norm",
        note="Gemma 3 with its vision tower (4B and up; Gemma3ForConditionalGeneration): the language "
        "model's blocks only, sizes from text_config",
    )
)
register_architecture(
    ArchSpec(
        family="phi3",
        modules={
            "q": "self_attn.qkv_proj",
            "k": "self_attn.qkv_proj",
            "v": "self_attn.qkv_proj",
            "o": "self_attn.o_proj",
            "gate": "mlp.gate_up_proj",
            "up": "mlp.gate_up_proj",
            "down": "mlp.down_proj",
        },
        note="fused qkv_proj (rows q | k | v) and gate_up_proj (rows gate | up), sliced by the layout",
    )
)
register_architecture(
    ArchSpec(family="olmo2", note="q/k norms over all heads, norms after attention and MLP (no pre-norm)")
)


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(model_type: str) -> ArchSpec:
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_architectures())}"
        ) from None


@dataclass(frozen=True)
class Layout:
    """An :class:`ArchSpec` bound to one model's sizes."""

    spec: ArchSpec
    n_blocks: int
    hidden: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def family(self) -> str:
        return self.spec.family

    def module_name(self, block: int, kind: str) -> str:
        """Full dotted path of projection ``kind`` in ``block`` (HF naming, no peft prefix)."""
        if kind not in self.spec.modules:
            raise KeyError(f"unknown module kind {kind!r}; kinds: {list(self.spec.modules)}")
        if not 0 <= block < self.n_blocks:
            raise IndexError(f"block {block} out of range 0..{self.n_blocks - 1}")
        return f"{self.spec.blocks}.{block}.{self.spec.modules[kind]}"

    def site_name(self, block: int, site: str) -> str:
        if site == "block":
            return f"{self.spec.blocks}.{block}"
        return f"{self.spec.blocks}.{block}.{self.spec.sites[site]}"

    def iter_modules(
        self, kinds: tuple[str, ...] = ALL_KINDS, blocks: Any = None
    ) -> Iterator[tuple[int, str, str]]:
        """Yield ``(block, kind, module_name)`` for the chosen kinds and blocks."""
        block_list = range(self.n_blocks) if blocks is None else blocks
        for b in block_list:
            for kind in kinds:
                yield b, kind, self.module_name(b, kind)

    def parse(self, name: str) -> tuple[int, str] | None:
        """Inverse of :meth:`module_name` (tolerates peft prefixes); None if not a block projection."""
        prefix = self.spec.blocks + "."
        idx = name.find(prefix)
        if idx < 0:
            return None
        rest = name[idx + len(prefix) :]
        head, _, tail = rest.partition(".")
        if not head.isdigit():
            return None
        for kind, path in self.spec.modules.items():
            if tail == path or tail.startswith(path + "."):
                return int(head), kind
        return None

    def heads_of(self, kind: str) -> int:
        return self.n_heads if kind in ("q", "o") else self.n_kv_heads

    def out_features(self, kind: str) -> int:
        """Height of ``kind``'s weight (its rows, ``[out, in]``)."""
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"q": q_out, "k": kv_out, "v": kv_out, "o": self.hidden}.get(
            kind, self.d_ff if kind in ("gate", "up") else self.hidden
        )

    @property
    def fused(self) -> bool:
        """True when some kinds share a module (module docstring, "Fused projections")."""
        return bool(self.spec.fused())

    def rows(self, kind: str) -> slice | None:
        """The rows of ``kind`` inside its module's weight when the module is fused, else None (all)."""
        path = self.spec.modules[kind]
        group = self.spec.fused().get(path)
        if group is None:
            return None
        start = sum(self.out_features(k) for k in group[: group.index(kind)])
        return slice(start, start + self.out_features(kind))

    def weight(self, model: Any, block: int, kind: str, *, base_layer: bool = True) -> Any:
        """The weight of ``kind`` in ``block``, ``[out, in]``: a view of its rows for a fused module.

        In-place edits of the view change the model. ``base_layer``: under a LoRA wrapper, the frozen
        base layer's weight (the adapter is :meth:`lora_rows`' business).
        """
        module = unwrap(model).get_submodule(self.module_name(block, kind))
        if base_layer and hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        r = self.rows(kind)
        return module.weight if r is None else module.weight[r]

    def bias(self, model: Any, block: int, kind: str) -> Any:
        """The bias of ``kind`` in ``block`` (its rows for a fused module), or None."""
        module = unwrap(model).get_submodule(self.module_name(block, kind))
        if hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        b = getattr(module, "bias", None)
        r = self.rows(kind)
        return b if b is None or r is None else b[r]

    def to_frame(self) -> pd.DataFrame:
        """One row per (block, kind): path and weight shape [out, in]."""
        import pandas as pd

        rows = []
        q_out = self.n_heads * self.head_dim
        kv_out = self.n_kv_heads * self.head_dim
        shapes = {
            "q": (q_out, self.hidden),
            "k": (kv_out, self.hidden),
            "v": (kv_out, self.hidden),
            "o": (self.hidden, q_out),
            "gate": (self.d_ff, self.hidden),
            "up": (self.d_ff, self.hidden),
            "down": (self.hidden, self.d_ff),
        }
        for b, kind, name in self.iter_modules():
            r = self.rows(kind)
            rows.append(
                {
                    "block": b,
                    "kind": kind,
                    "group": "mlp" if kind in MLP_KINDS else "attention",
                    "module": name,
                    "rows": "all" if r is None else f"{r.start}:{r.stop}",
                    "out_features": shapes[kind][0],
                    "in_features": shapes[kind][1],
                }
            )
        return pd.DataFrame(rows)


def is_peft(model: Model) -> bool:
    """True for a peft ``PeftModel`` (the adapter-only threat model)."""
    return type(model).__name__.startswith("Peft")


def setting_of(model: Model) -> str:
    """``"lora"`` for a PeftModel (adapter-only setting), ``"full"`` for a plain model.

    Decided from the object itself.
    """
    return "lora" if is_peft(model) else "full"


def unwrap(model: Any) -> PreTrainedModel:
    """The underlying HF causal LM of a PeftModel / nnsight wrapper / HF model."""
    inner = model
    for _ in range(4):
        if hasattr(inner, "get_base_model") and type(inner).__name__.startswith("Peft"):
            inner = inner.get_base_model()
        elif hasattr(inner, "_model") and not hasattr(inner, "config"):
            inner = inner._model
        else:
            break
    return inner


def text_config(config: Any) -> Any:
    """The config that holds the decoder's sizes: ``config`` itself, or a multimodal model's text config."""
    if hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def layout_of(model_or_config: Any) -> Layout:
    """Build a :class:`Layout` from a model (HF, peft) or an HF config.

    Sizes come from the text config (a multimodal wrapper's ``text_config``). Given a model with fused
    projections, the fused modules' heights are checked against the layout's slicing.
    """
    hf = unwrap(model_or_config)
    config = getattr(hf, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type is None and isinstance(config, dict):
        model_type = config.get("model_type")
    spec = get_spec(str(model_type))
    config = text_config(config)
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    layout = Layout(
        spec=spec,
        n_blocks=config.num_hidden_layers,
        hidden=config.hidden_size,
        d_ff=config.intermediate_size,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
    )
    if layout.fused and hasattr(hf, "get_submodule") and layout.n_blocks:
        for path, kinds in spec.fused().items():
            module = hf.get_submodule(f"{spec.blocks}.0.{path}")
            module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            want = sum(layout.out_features(k) for k in kinds)
            if module.weight.shape[0] != want:
                raise UnsupportedArchitectureError(
                    f"{spec.family}: {path} has {module.weight.shape[0]} output rows, but {'+'.join(kinds)} "
                    f"from the config make {want}; the fused slicing does not fit this model"
                )
    return layout


def get_module(model: Model, name: str) -> Any:
    """Resolve a dotted HF module path on a (possibly peft-wrapped) model."""
    return unwrap(model).get_submodule(name)


def registry_frame() -> pd.DataFrame:
    """The registry itself as a DataFrame: one row per (family, site)."""
    import pandas as pd

    rows = []
    for fam in supported_architectures():
        spec = _REGISTRY[fam]
        for kind, path in spec.modules.items():
            rows.append(
                {
                    "family": fam,
                    "site": kind,
                    "group": "mlp" if kind in MLP_KINDS else "attention",
                    "path": f"{spec.blocks}.{{i}}.{path}",
                }
            )
        for site, path in spec.sites.items():
            rows.append(
                {"family": fam, "site": site, "group": "activation", "path": f"{spec.blocks}.{{i}}.{path}"}
            )
    return pd.DataFrame(rows)
