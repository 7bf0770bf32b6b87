"""Meta's published FP8 checkpoints (Llama-4-Maverick-17B-128E-Instruct-FP8), read as they are.

Their layout, as HF transformers' compressed-tensors loader reads it (vLLM's loader was not
checked here):
- config.json has a top-level `quantization_config` in compressed-tensors' FP8_DYNAMIC form:
  quant_method "compressed-tensors", format "float-quantized", quantization_status
  "compressed"; config groups targeting Linear layers with 8-bit float, symmetric, static weights
  with one scale per output channel (strategy "channel") and 8-bit float input activations
  quantized dynamically per token; no KV-cache scheme. Its `ignore` list names the Linear layers
  left in bf16.
- The routed experts are stored one per expert, as nn.Linear layers:
  `...layers.{i}.feed_forward.experts.{e}.{gate,up,down}_proj.weight` in float8_e4m3fn [out, in],
  each with `...weight_scale` [out, 1]; no input scale (activations are dynamic), no zero point.
  Everything else is as in the bf16 checkpoint: router, shared expert, attention, dense MLPs,
  embeddings, LM head, norms, vision tower, projector.
Sources: transformers' `integrations/compressed_tensors.py` (CompressedTensorsDequantize: an
expert's weight is `weight.float() * weight_scale.float()`, per expert, then stacked;
ConvertFP8LinearScale: a channel-strategy scale is stored [out, 1]) and its
`quantizers/quantizer_compressed_tensors.py`; the quantization_config fields are
compressed-tensors' (QuantizationArgs: num_bits, type, symmetric, strategy, dynamic).

Which layers are fp8 is read from the tensors (a layer whose experts have F8_E4M3 weights or a
weight_scale), not from `ignore`. They load in the layout of fp8_mixed (model/quantization.py):
fp8 values and their scales (in float32, which holds the stored bf16 or fp32 scales exactly),
not dequantized; the per-expert tensors go to expert e of the stacked leaves
(checkpoints/keys.py FP8_EXPERT). A MoE layer whose experts the checkpoint leaves in bf16 (named
in `ignore`: Meta's recipe skips the first and last layers' experts) is quantized to fp8 as it
loads, by fp8_mixed's own per-channel rule, with a warning: the stored tree stacks each expert
weight over the blocks, one dtype per leaf, so one layer cannot stay bf16 while the others of
its slot are fp8. (Dequantizing every layer to bf16 instead would double the experts' memory,
which is what loading this checkpoint avoids.)
"""
from __future__ import annotations

import re

from checkpoints.errors import CheckpointError

SCALE_SUFFIX = ".weight_scale"
FP8_DTYPE = "F8_E4M3"  # the safetensors name of float8_e4m3fn
_EXPERT = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.\d+\.")
WEIGHTS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
           "dynamic": False}
ACTIVATIONS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
               "dynamic": True}


def fp8_layers(tensors: dict[str, tuple]) -> frozenset[int]:
    """The decoder layers whose routed experts are stored in fp8 (an F8_E4M3 weight or a
    weight_scale among their per-expert tensors), from {name: (file, dtype name, shape)}."""
    return frozenset(int(m.group(1)) for n, (_, d, _) in tensors.items()
                     if (d == FP8_DTYPE or n.endswith(SCALE_SUFFIX)) and (m := _EXPERT.search(n)))


def has_scales(names) -> bool:
    return any(n.endswith(SCALE_SUFFIX) for n in names)


def split_config(d: dict, where: str) -> tuple[dict, dict | None]:
    """(config.json without its quantization_config, that quantization_config checked), for a
    config of Meta's FP8 layout; a quantization of any other kind is one CheckpointError."""
    if not isinstance(d, dict) or "quantization_config" not in d:
        return d, None
    q = d["quantization_config"]
    rest = {k: v for k, v in d.items() if k != "quantization_config"}
    problems = []
    if not isinstance(q, dict):
        problems.append(f"it is {q!r}")
        q = {}
    for field, want in (("quant_method", "compressed-tensors"), ("format", "float-quantized"),
                        ("quantization_status", "compressed")):
        if q.get(field) != want:
            problems.append(f"{field} {q.get(field)!r} (expected {want!r})")
    if q.get("kv_cache_scheme") is not None:
        problems.append(f"kv_cache_scheme {q['kv_cache_scheme']!r} (expected null)")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        problems.append("no config_groups")
        groups = {}
    for name, g in groups.items():
        g = g if isinstance(g, dict) else {}
        for part, want in (("weights", WEIGHTS), ("input_activations", ACTIVATIONS)):
            spec = g.get(part) if isinstance(g.get(part), dict) else {}
            bad = [f"{k}={spec.get(k)!r}" for k, v in want.items() if spec.get(k) != v]
            if bad:
                problems.append(f"config group {name!r} {part}: {', '.join(bad)}")
        if g.get("output_activations") is not None:
            problems.append(f"config group {name!r} quantizes output activations")
    if problems:
        raise CheckpointError(
            f"{where}: quantization_config is not Meta's FP8 layout (compressed-tensors fp8, one "
            "scale per output channel, dynamic per-token fp8 activations), which is the only "
            "quantized HF layout read here: " + "; ".join(problems))
    return rest, q
