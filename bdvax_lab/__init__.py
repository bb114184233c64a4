"""bdvax_lab: find and remove backdoors in instruction-tuned LLMs (BD-VAX and friends), Jupyter-first.

The public API is re-exported here; each name lives in a module with one job:
``models`` (loading), ``registry`` (architecture sites), ``data`` (examples and
chat formatting), ``train`` (the one finetune loop), ``generate`` (the one
generation helper), ``attacks``/``judges`` (backdoors and how to detect them),
``evaluate`` (honest metrics), ``suspicious`` (backdoored-model artifacts),
``deltas`` (weight updates), ``signature`` (BD-VAX variants, twins, scores),
``purify`` (suppression, repair, the one-call pipeline), ``sanity`` (Table-1 delta ablations),
``probes`` (nnsight activation probes), ``baselines`` (FT, pruning, fine-pruning, INT4, CROW),
``viz`` (plotly).
"""
from .artifacts import atomic_dir, read_json, stable_hash, write_json
from .attacks import (ATTACKS, COMBINATIONS, SYNTHETIC_KEYS, TASKS, VARIANT_BEHAVIORS, AttackSpec, Behavior,
                      dataset_summary, get_attack, get_task, insert_key, insert_keys, poison_dataset, resolve_attack,
                      resolve_task, trigger, triggered_prompts)
from .baselines import (BASELINES, BaselineConfig, CrowConfig, DefenceResult, FinePruneConfig, PruneConfig,
                        QuantizeConfig, baseline_config, defend, fake_quantize)
from .config import Config
from .data import (SPLITS, DataFormatError, Example, encode_example, format_prompt, load_code_pool, load_jsonl,
                   load_pool, save_jsonl)
from .deltas import WeightDelta
from .evaluate import (EvalConfig, EvalReport, agreement, backdoor_metrics, eval_prompts, evaluate_model, load_mcq,
                       mcq_accuracy, perplexity, reports_frame)
from .generate import chat, generate
from .notebook_magics import load_ipython_extension  # `%load_ext bdvax_lab`: the %%solution magic
from .judges import JUDGES, Judge, degenerate_reason, get_judge, judge_replies, register_judge
from .models import (ModelDirError, PickleWeightsError, cache_dir, default_device, default_dtype, ensure_default_model,
                     is_default_model_cached, load_adapter, load_default_model, load_model, make_tiny_model,
                     save_model)
from .probes import (ProbeResult, ablation_probe, activation_diff, activation_patching, behavior_token_id,
                     compare_activation_diff, logit_lens, overlay_signature, signature_correlation)
from .purify import (PurifyConfig, PurifyResult, RepairConfig, SuppressConfig, load_purified, purify, reinit_channels,
                     repair, suppress, zero_lora_channels)
from .registry import (ALL_KINDS, ATTN_KINDS, MLP_KINDS, ArchSpec, Layout, UnsupportedArchitectureError, layout_of,
                       register_architecture, registry_frame, supported_architectures)
from .reproduce import PRESETS, ReproduceConfig, Reproduction, load_tables, reproduce
from .sanity import (CheckResult, SanityConfig, SanityContext, SanityResult, attention_vs_mlp, compare_with_paper,
                     keep_only_spans, run_sanity, sanity_plan, save_sanity, shuffle_blocks, span_sweep)
from .signature import (Selection, Signature, SignatureConfig, VariantSpec, extract_signature, make_variants,
                        random_selection, train_twins, twin_cache_frame, clean_twin_cache)
from .signature_viz import (channel_heatmap, compare_selections, layer_counts, layer_counts_figure, rho_curve_figure,
                            score_heatmap, score_histogram, stage_metrics_figure)
from .suspicious import (AttackRecipe, SuspiciousModel, attack_dataset, load_suspicious, make_suspicious_model,
                         open_or_make_suspicious, suspicious_dir)
from .train import TrainConfig, TrainResult, finetune, finetune_together
from .widgets import SignatureExplorer, rho_curve, try_selection
from .viz import norms_figure, rates_bar, weight_norms

__version__ = "0.1.0"
