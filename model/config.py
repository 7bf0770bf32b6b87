"""Configs: frozen dataclasses, named presets, the per-layer pattern, HF config.json in and out.

The layer pattern is derived here once (`TextConfig.layer_specs`) so model code never computes
`(i + 1) % 4`. `period` is the shortest repeat of that pattern that divides the depth: the decoder
scans over `num_layers // period` blocks of `period` layers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config_checks import (ConfigError, check, check_bools, check_int_tuple, check_ints,
                            check_numbers, is_int, read_int, read_list, read_number, read_object)

COMPUTE_DTYPES = ("float32", "bfloat16")
ROUTER_SCORES = ("input", "output")          # what the router score multiplies: the expert's input or output
ROUTER_ACTIVATIONS = ("sigmoid", "softmax")  # how a chosen expert's logit becomes its score
PARAM_DTYPES = ("float32", "bfloat16", "float16")  # float16: HF checkpoints stored as F16
REMAT = ("none", "full", "dots")
KV_DTYPES = ("int8", "fp8")  # quantized KV caches (model/kv_cache.py); None: the compute dtype


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (Scout only; Maverick uses plain RoPE)."""
    factor: float = 16.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        check_numbers(self, ("factor", "low_freq_factor", "high_freq_factor"), prefix="rope_scaling.")
        check_ints(self, ("original_max_position_embeddings",), prefix="rope_scaling.")


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer is: RoPE + chunked-local or NoPE + global attention; MoE or dense FFN."""
    rope: bool
    chunked: bool
    moe: bool


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 202048
    hidden_size: int = 5120                 # D
    num_layers: int = 48                    # L
    num_heads: int = 40                     # N
    num_kv_heads: int = 8                   # K
    head_dim: int = 128                     # H
    intermediate_size: int = 8192           # F of each routed expert and of the shared expert
    intermediate_size_mlp: int = 16384      # F of the dense (non-MoE) layers
    num_experts: int = 16                   # E
    experts_per_token: int = 1
    moe_layers: tuple[int, ...] = tuple(range(48))
    nope_layers: tuple[int, ...] = tuple(range(3, 48, 4))
    attention_chunk_size: int | None = 8192  # C; None makes the RoPE layers attend globally too
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = RopeScaling()
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 10485760
    router_aux_loss_coef: float = 0.001
    # Modelling choices that ablations vary (experiments/ablations.py). HF's config has no field
    # for them, so `to_hf` refuses any value but the default, which is Llama 4's.
    router_score: str = "input"             # the score scales the routed expert's input, or its output
    router_activation: str = "sigmoid"      # sigmoid of each chosen logit, or softmax over all E
    shared_expert: bool = True              # the always-on shared expert of every MoE layer
    bos_token_id: int | None = 200000
    eos_token_ids: tuple[int, ...] = (200001, 200007, 200008)
    pad_token_id: int | None = 200018

    def __post_init__(self):
        # Types and signs first: the relations below would otherwise fail as a TypeError or a
        # ZeroDivisionError (zero KV heads).
        check_ints(self, ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                          "head_dim", "intermediate_size", "intermediate_size_mlp", "num_experts",
                          "experts_per_token", "max_position_embeddings"))
        check(self.attention_chunk_size is None or is_int(self.attention_chunk_size)
              and self.attention_chunk_size > 0, "attention_chunk_size",
              f"must be a positive integer or null, got {self.attention_chunk_size!r}")
        check_numbers(self, ("rope_theta", "floor_scale", "rms_norm_eps"))
        check_numbers(self, ("attn_scale", "router_aux_loss_coef"), positive=False)
        check_bools(self, ("use_qk_norm", "attn_temperature_tuning", "shared_expert"))
        check(self.router_score in ROUTER_SCORES, "router_score",
              f"{self.router_score!r} is not one of {list(ROUTER_SCORES)}")
        check(self.router_activation in ROUTER_ACTIVATIONS, "router_activation",
              f"{self.router_activation!r} is not one of {list(ROUTER_ACTIVATIONS)}")
        check(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling),
              "rope_scaling", f"must be a RopeScaling or None, got {self.rope_scaling!r}")
        for name in ("moe_layers", "nope_layers", "eos_token_ids"):
            check_int_tuple(self, name)
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            check(v is None or is_int(v) and v >= 0, name,
                  f"must be a token id (an integer >= 0) or null, got {v!r}")
        check(self.num_heads % self.num_kv_heads == 0, "num_heads",
              f"{self.num_heads} query heads are not a multiple of {self.num_kv_heads} KV heads")
        check(self.head_dim % 2 == 0, "head_dim", f"RoPE needs an even head_dim, got {self.head_dim}")
        check(self.experts_per_token <= self.num_experts, "experts_per_token",
              f"{self.experts_per_token} not in 1..{self.num_experts}")
        for name in ("moe_layers", "nope_layers"):
            bad = [i for i in getattr(self, name) if not 0 <= i < self.num_layers]
            check(not bad, name, f"layer indices {bad} outside 0..{self.num_layers - 1}")

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        nope, moe = set(self.nope_layers), set(self.moe_layers)
        return tuple(
            LayerSpec(rope=i not in nope,
                      chunked=i not in nope and self.attention_chunk_size is not None,
                      moe=i in moe)
            for i in range(self.num_layers))

    @property
    def period(self) -> int:
        """Shortest p dividing L with spec[i] == spec[i % p]; L itself when the pattern never repeats."""
        specs = self.layer_specs
        return next(p for p in range(1, self.num_layers + 1)
                    if self.num_layers % p == 0 and all(s == specs[i % p] for i, s in enumerate(specs)))

    @property
    def block_specs(self) -> tuple[LayerSpec, ...]:
        return self.layer_specs[: self.period]

    @property
    def num_blocks(self) -> int:
        return self.num_layers // self.period


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1408
    num_layers: int = 34
    num_heads: int = 16
    intermediate_size: int = 5632
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    vision_output_dim: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        p = "vision_config."
        check_ints(self, ("image_size", "patch_size", "num_channels", "hidden_size", "num_layers",
                          "num_heads", "intermediate_size", "projector_input_dim",
                          "projector_output_dim", "vision_output_dim"), prefix=p)
        check_numbers(self, ("rope_theta", "norm_eps", "pixel_shuffle_ratio"), prefix=p)
        check(self.pixel_shuffle_ratio <= 1, p + "pixel_shuffle_ratio",
              f"must be in (0, 1], got {self.pixel_shuffle_ratio}")
        check(self.image_size % self.patch_size == 0, p + "image_size",
              f"{self.image_size} is not a multiple of patch_size {self.patch_size}")
        check(self.hidden_size % self.num_heads == 0, p + "hidden_size",
              f"{self.hidden_size} is not a multiple of num_attention_heads {self.num_heads}")


@dataclass(frozen=True)
class Config:
    """The whole model: a text decoder and, for early-fusion checkpoints, a vision tower."""
    text: TextConfig = TextConfig()
    vision: VisionConfig | None = VisionConfig()
    image_token_id: int = 200092            # <|patch|>: image features replace these embeddings
    boi_token_id: int = 200080
    eoi_token_id: int = 200081
    dtype: str = "float32"                  # compute dtype (bfloat16 on accelerators)
    param_dtype: str = "float32"
    remat: str = "none"                     # none | full | dots: rematerialisation of each layer block
    kv_dtype: str | None = None             # KV cache: int8 | fp8 with per-(head, position) scales

    def __post_init__(self):
        # float16 is refused, not offered: its range (65504) is exceeded by real activations
        # (RMSNorm's sum of squares, attention scores) on weights a few times the tiny presets',
        # and the model keeps no reduction in float32. bfloat16 costs the same memory.
        check(self.dtype in COMPUTE_DTYPES, "dtype",
              f"compute dtype {self.dtype!r} is not one of {list(COMPUTE_DTYPES)}"
              + (" (float16 overflows to NaN on real weights; use bfloat16, the same size)"
                 if self.dtype == "float16" else ""))
        check(self.param_dtype in PARAM_DTYPES, "param_dtype",
              f"{self.param_dtype!r} is not one of {list(PARAM_DTYPES)}")
        check(self.remat in REMAT, "remat", f"{self.remat!r} is not one of {list(REMAT)}")
        check(self.kv_dtype is None or self.kv_dtype in KV_DTYPES, "kv_dtype",
              f"{self.kv_dtype!r} is not one of {list(KV_DTYPES)} or None (the compute dtype)")
        check_ints(self, ("image_token_id", "boi_token_id", "eoi_token_id"), minimum=0)

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)

    def replace_text(self, **kw) -> "Config":
        return dataclasses.replace(self, text=dataclasses.replace(self.text, **kw))


def every(step: int, num_layers: int, offset: int) -> tuple[int, ...]:
    """Layer indices offset, offset + step, ... below num_layers (how HF derives both patterns)."""
    return tuple(range(offset, num_layers, step))


# ---------------------------------------------------------------------------------------------
# Presets. scout/maverick are the published values (docs/architecture.md, section 1); behemoth
# is a shape.

SCOUT = Config()

MAVERICK = Config(text=TextConfig(
    num_experts=128, moe_layers=every(2, 48, 1), use_qk_norm=False, rope_scaling=None,
    max_position_embeddings=1048576))

# Behemoth: Meta published only "288B active, 16 experts, ~2T total". Every width below is an
# ESTIMATE chosen to meet those totals (MoE in every layer like Scout): D=16384, L=64, N=128, K=8,
# F=38912 gives 288.5B active and 2.12T total parameters with the text-only head.
BEHEMOTH = Config(text=TextConfig(
    hidden_size=16384, num_layers=64, num_heads=128, num_kv_heads=8, head_dim=128,
    intermediate_size=38912, intermediate_size_mlp=2 * 38912, num_experts=16,
    moe_layers=tuple(range(64)), nope_layers=every(4, 64, 3), rope_scaling=None,
    max_position_embeddings=1048576), vision=None)


def tiny(**text_overrides) -> Config:
    """A few-kilobyte model with every feature on: for tests and quick experiments."""
    text = TextConfig(
        vocab_size=128, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
        intermediate_size=16, intermediate_size_mlp=48, num_experts=4, moe_layers=tuple(range(4)),
        nope_layers=(3,), attention_chunk_size=8, floor_scale=4.0, max_position_embeddings=4096,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)
    return Config(text=dataclasses.replace(text, **text_overrides), vision=None)


PRESETS = {"scout": SCOUT, "maverick": MAVERICK, "behemoth": BEHEMOTH, "tiny": tiny()}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------
# HF config.json <-> Config.

# HF fields that carry no information for this implementation: the generic fields every HF
# config carries (4.x and 5.x), and training-time or bookkeeping switches. Anything not here and
# not read below is an error. Fields with one supported value are checked by `_must_equal`.
_GENERIC = {"_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "torch_dtype",
            "id2label", "label2id", "is_encoder_decoder", "model_type", "output_attentions",
            "output_hidden_states", "problem_type", "return_dict", "transformers_version",
            "tie_word_embeddings", "initializer_range", "use_cache", "attention_dropout",
            "for_llm_compressor"}
_IGNORED_TEXT = _GENERIC | {"output_router_logits", "interleave_moe_layer_step",
                            "no_rope_layer_interval", "layer_types", "router_jitter_noise",
                            "hidden_act", "attention_bias"}
_IGNORED_VISION = _GENERIC | {"projector_dropout", "vision_feature_select_strategy", "hidden_act",
                              "multi_modal_projector_bias", "vision_feature_layer"}
_IGNORED_TOP = _GENERIC | {"text_config", "vision_config", "boi_token_index", "eoi_token_index",
                           "image_token_index"}


def _reject_unknown(d: dict, known: set[str], where: str):
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; this implementation does not know "
                          "what they mean, so it refuses to guess")


def _must_equal(d: dict, name: str, expected, where: str):
    if name in d and d[name] != expected:
        raise ConfigError(f"{where}: field {name!r} = {d[name]!r} is not supported "
                          f"(Llama 4 uses {expected!r})")


def _text_from_hf(d: dict, where: str) -> TextConfig:
    read = {"vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "num_local_experts", "num_experts_per_tok", "moe_layers", "no_rope_layers",
            "attention_chunk_size", "rope_theta", "rope_scaling", "rope_parameters", "use_qk_norm",
            "attn_temperature_tuning", "floor_scale", "attn_scale", "rms_norm_eps",
            "max_position_embeddings", "router_aux_loss_coef", "bos_token_id", "eos_token_id",
            "pad_token_id"}
    _reject_unknown(d, read | _IGNORED_TEXT, where)
    _must_equal(d, "hidden_act", "silu", where)
    _must_equal(d, "attention_bias", False, where)
    _must_equal(d, "tie_word_embeddings", False, where)
    _must_equal(d, "router_jitter_noise", 0.0, where)
    dflt = TextConfig()
    # Fields used in arithmetic here are read checked; the rest are checked by TextConfig.
    L = read_int(d, "num_hidden_layers", dflt.num_layers, where)
    step = read_int(d, "interleave_moe_layer_step", 1, where)
    moe = read_list(d, "moe_layers", where)
    moe = tuple(moe) if moe is not None else every(step, L, step - 1)
    interval = read_int(d, "no_rope_layer_interval", 4, where)
    flags = read_list(d, "no_rope_layers", where) or [int((i + 1) % interval != 0) for i in range(L)]
    if len(flags) < L or any(f not in (0, 1) or isinstance(f, float) for f in flags):
        raise ConfigError(f"{where}: 'no_rope_layers' must hold a 0 or 1 for each of the {L} "
                          f"layers, got {flags!r}")
    nope = tuple(i for i in range(L) if not flags[i])

    rope = read_object(d, "rope_parameters", where)
    legacy = read_object(d, "rope_scaling", where)
    if rope and legacy:
        raise ConfigError(f"{where}: both 'rope_parameters' and 'rope_scaling' are set; keep one")
    rope = dict(rope or legacy)
    theta = read_number(rope, "rope_theta", d.get("rope_theta", dflt.rope_theta), where)
    rope.pop("rope_theta", None)
    rope_type = rope.pop("rope_type", rope.pop("type", "default" if not rope else "llama3"))
    if rope_type == "default":
        scaling = None
    elif rope_type == "llama3":
        try:
            scaling = RopeScaling(**rope)
        except TypeError as e:
            raise ConfigError(f"{where}: 'rope_scaling' fields {sorted(rope)}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    else:
        raise ConfigError(f"{where}: rope type {rope_type!r} is not used by Llama 4 "
                          "(expected 'llama3' or 'default')")

    layer_types = read_list(d, "layer_types", where)
    chunk = d.get("attention_chunk_size", dflt.attention_chunk_size)
    if layer_types is not None:
        want = ["chunked_attention" if flags[i] and chunk is not None else "full_attention"
                for i in range(L)]
        if layer_types != want:
            raise ConfigError(f"{where}: 'layer_types' contradicts 'no_rope_layers' / "
                              "'attention_chunk_size' (RoPE layers are chunked, NoPE layers full)")
    eos = d.get("eos_token_id", dflt.eos_token_ids)
    # 4.51-era Scout config.json says `attn_temperature_tuning: 4`; any truthy value means on.
    temp = d.get("attn_temperature_tuning", True)
    if not isinstance(temp, (bool, int)):
        raise ConfigError(f"{where}: 'attn_temperature_tuning' must be a bool, got {temp!r}")
    hidden = read_int(d, "hidden_size", dflt.hidden_size, where)
    heads = read_int(d, "num_attention_heads", dflt.num_heads, where)
    try:
        return TextConfig(
            vocab_size=d.get("vocab_size", dflt.vocab_size), hidden_size=hidden, num_layers=L,
            num_heads=heads, num_kv_heads=d.get("num_key_value_heads", dflt.num_kv_heads),
            head_dim=d["head_dim"] if d.get("head_dim") is not None else hidden // heads,
            intermediate_size=d.get("intermediate_size", dflt.intermediate_size),
            intermediate_size_mlp=d.get("intermediate_size_mlp", dflt.intermediate_size_mlp),
            num_experts=d.get("num_local_experts", dflt.num_experts),
            experts_per_token=d.get("num_experts_per_tok", dflt.experts_per_token),
            moe_layers=moe, nope_layers=nope, attention_chunk_size=chunk,
            rope_theta=theta, rope_scaling=scaling,
            use_qk_norm=d.get("use_qk_norm", True), attn_temperature_tuning=bool(temp),
            floor_scale=read_number(d, "floor_scale", dflt.floor_scale, where),
            attn_scale=read_number(d, "attn_scale", dflt.attn_scale, where),
            rms_norm_eps=read_number(d, "rms_norm_eps", dflt.rms_norm_eps, where),
            max_position_embeddings=d.get("max_position_embeddings", 131072),
            router_aux_loss_coef=read_number(d, "router_aux_loss_coef",
                                             dflt.router_aux_loss_coef, where),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_ids=(() if eos is None  # `eos_token_id: null`: no stop token
                           else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)),
            pad_token_id=d.get("pad_token_id"))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _vision_from_hf(d: dict, where: str) -> VisionConfig:
    read = {"image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "intermediate_size", "pixel_shuffle_ratio",
            "projector_input_dim", "projector_output_dim", "vision_output_dim", "rope_theta",
            "rope_parameters", "norm_eps"}
    _reject_unknown(d, read | _IGNORED_VISION, where)
    _must_equal(d, "multi_modal_projector_bias", False, where)
    dflt = VisionConfig()
    theta = read_number(read_object(d, "rope_parameters", where), "rope_theta",
                        d.get("rope_theta", dflt.rope_theta), where)
    try:
        return VisionConfig(
            image_size=d.get("image_size", 448), patch_size=d.get("patch_size", 14),
            num_channels=d.get("num_channels", 3), hidden_size=d.get("hidden_size", 768),
            num_layers=d.get("num_hidden_layers", 34), num_heads=d.get("num_attention_heads", 16),
            intermediate_size=d.get("intermediate_size", 5632),
            pixel_shuffle_ratio=d.get("pixel_shuffle_ratio", 0.5),
            projector_input_dim=d.get("projector_input_dim", 4096),
            projector_output_dim=d.get("projector_output_dim", 4096),
            vision_output_dim=d.get("vision_output_dim", 7680), rope_theta=theta,
            norm_eps=d.get("norm_eps", 1e-5))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def from_hf(d: dict[str, Any], where: str = "config.json") -> Config:
    """Config from an HF config.json dict: `llama4` (text + vision) or `llama4_text` (text only)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: must be a JSON object, got {type(d).__name__}")
    kind = d.get("model_type")
    if kind == "llama4_text":
        return Config(text=_text_from_hf(d, where), vision=None)
    if kind != "llama4":
        raise ConfigError(f"{where}: model_type {kind!r} is not a Llama 4 model "
                          "(expected 'llama4' or 'llama4_text')")
    _reject_unknown(d, _IGNORED_TOP, where)
    _must_equal(d, "tie_word_embeddings", False, where)
    text = _text_from_hf(read_object(d, "text_config", where), f"{where} text_config")
    vision = d.get("vision_config")
    if vision is not None:  # null (or absent): a text-only checkpoint
        vision = _vision_from_hf(read_object(d, "vision_config", where), f"{where} vision_config")
    try:
        return Config(text=text, vision=vision, image_token_id=d.get("image_token_index", 200092),
                      boi_token_id=d.get("boi_token_index", 200080),
                      eoi_token_id=d.get("eoi_token_index", 200081))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _text_to_hf(t: TextConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_theta": t.rope_theta, "rope_type": "default"}
    if t.rope_scaling is not None:
        rope = {**rope, "rope_type": "llama3", **dataclasses.asdict(t.rope_scaling)}
    flags = [0 if i in set(t.nope_layers) else 1 for i in range(t.num_layers)]
    return {
        "model_type": "llama4_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "intermediate_size_mlp": t.intermediate_size_mlp,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
        "num_local_experts": t.num_experts, "num_experts_per_tok": t.experts_per_token,
        "moe_layers": list(t.moe_layers), "no_rope_layers": flags,
        "attention_chunk_size": t.attention_chunk_size, "rope_parameters": rope,
        "use_qk_norm": t.use_qk_norm, "attn_temperature_tuning": t.attn_temperature_tuning,
        "floor_scale": _int_if_whole(t.floor_scale), "attn_scale": t.attn_scale,
        "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
        "router_aux_loss_coef": t.router_aux_loss_coef, "bos_token_id": t.bos_token_id,
        "eos_token_id": (None if not t.eos_token_ids else t.eos_token_ids[0]
                         if len(t.eos_token_ids) == 1 else list(t.eos_token_ids)),
        "pad_token_id": t.pad_token_id, "hidden_act": "silu", "attention_bias": False,
        "tie_word_embeddings": False,
    }


# TextConfig fields with no HF equivalent: each one's default is Llama 4's choice.
VARIANT_FIELDS = ("router_score", "router_activation", "shared_expert")


def split_variant(cfg: Config) -> tuple[Config, dict[str, Any]]:
    """(cfg with Llama 4's choice in every variant field, {field: value} of those that differ):
    what HF's config can say, and the rest (a training run records both)."""
    dflt = TextConfig()
    variant = {f: getattr(cfg.text, f) for f in VARIANT_FIELDS
               if getattr(cfg.text, f) != getattr(dflt, f)}
    return cfg.replace_text(**{f: getattr(dflt, f) for f in variant}), variant


def _int_if_whole(x: float):
    return int(x) if float(x).is_integer() else x


def to_hf(cfg: Config) -> dict[str, Any]:
    """The HF config.json dict; `llama4` when there is a vision tower, `llama4_text` otherwise.
    A config with an ablation variant (VARIANT_FIELDS) is refused: HF would read it as Llama 4."""
    variant = split_variant(cfg)[1]
    if variant:
        raise ConfigError(f"{', '.join(f'{k}={v!r}' for k, v in variant.items())}: an ablation "
                          "variant that an HF Llama 4 config cannot express; a checkpoint of it "
                          "would load as a different model, so none is written in HF form")
    text = _text_to_hf(cfg.text)
    if cfg.vision is None:
        return {"architectures": ["Llama4ForCausalLM"], **text}
    v = cfg.vision
    vision = {
        "model_type": "llama4_vision_model", "image_size": v.image_size,
        "patch_size": v.patch_size, "num_channels": v.num_channels, "hidden_size": v.hidden_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
        "intermediate_size": v.intermediate_size, "pixel_shuffle_ratio": v.pixel_shuffle_ratio,
        "projector_input_dim": v.projector_input_dim,
        "projector_output_dim": v.projector_output_dim, "vision_output_dim": v.vision_output_dim,
        "rope_parameters": {"rope_theta": v.rope_theta, "rope_type": "default"},
        "norm_eps": v.norm_eps, "hidden_act": "gelu", "multi_modal_projector_bias": False,
    }
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
            "text_config": text, "vision_config": vision, "image_token_index": cfg.image_token_id,
            "boi_token_index": cfg.boi_token_id, "eoi_token_index": cfg.eoi_token_id,
            "tie_word_embeddings": False}


def param_count(cfg: Config) -> dict[str, int]:
    """Parameter counts from the config alone (checked against `jax.eval_shape` in the tests)."""
    t = cfg.text
    D, H = t.hidden_size, t.head_dim
    attn = D * H * (2 * t.num_heads + 2 * t.num_kv_heads) + 2 * D
    expert = 3 * D * t.intermediate_size
    moe = D * t.num_experts + t.num_experts * expert + expert * t.shared_expert
    dense = 3 * D * t.intermediate_size_mlp
    n_moe = len(t.moe_layers)
    layers = t.num_layers * attn + n_moe * moe + (t.num_layers - n_moe) * dense
    text = layers + 2 * t.vocab_size * D + D
    active = text - n_moe * (t.num_experts - t.experts_per_token) * expert
    return {"text": text, "text_active": active}

