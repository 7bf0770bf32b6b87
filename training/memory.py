"""Will a training run fit? An estimate from the config alone (before anything is allocated or
compiled), then XLA's own figure for the compiled step, each checked against the memory the
device has.

The estimate counts the fp32 master weights, their gradients and Adam's two moments (16 bytes a
parameter), and the activations kept for the backward pass per token per layer: norms and
residuals, q/k/v/attention output, the attention probabilities (scores and softmax, over the
chunk for chunked layers and the whole row for global ones), the MoE's sorted token copies and
SwiGLU hiddens (routed and shared), and the logits with their softmax and gradient. With remat,
only each block's input is kept, plus one block's activations during its recomputation.
XLA keeps more than this count (fusion temporaries, fp32 upcasts, the MoE's padding to whole
rounds): on CPU, for configs from `tiny` to 8 layers x 8 experts at D=256, its compiled figure
was 1.0-2.3x the count, so activations are doubled (the estimate then lies within 0.6-1.2x of
XLA's figure). The estimate only refuses runs that would exceed all the memory there is; the
compiled step's own figure is then checked against 90% of it.
"""
from __future__ import annotations

import jax

from model.config import Config, param_count


class MemoryLimitError(MemoryError):
    """The run would not fit in memory; the message gives the estimate and the limit."""


def available_bytes() -> tuple[int, str]:
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]), f"{dev.device_kind} memory"
    import psutil
    return int(psutil.virtual_memory().available), "available host memory"


def estimate_bytes(cfg: Config, batch: int, seq: int) -> dict[str, int]:
    t = cfg.text
    act = 2 if cfg.dtype in ("bfloat16", "float16") else 4
    P = param_count(cfg)["text"]
    D, H, N, K, k = t.hidden_size, t.head_dim, t.num_heads, t.num_kv_heads, t.experts_per_token
    tokens = batch * seq

    def layer(spec) -> float:  # bytes per token
        s = min(seq, t.attention_chunk_size) if spec.chunked else seq
        b = act * (6 * D + 3 * (N + 2 * K) * H + 2 * N * H) + 4 * 2 * N * s
        F = t.intermediate_size
        b += act * (t.num_experts + k * D * 3 + k * 3 * F + 3 * F) if spec.moe else \
            act * 3 * t.intermediate_size_mlp
        return b

    per_layer = [layer(s) for s in t.layer_specs]
    if cfg.remat == "none":
        activations = 2 * tokens * sum(per_layer)
    else:
        activations = 2 * tokens * (t.num_blocks * act * D + sum(per_layer[: t.period]))
    logits = tokens * t.vocab_size * 4 * 3
    return {"weights, grads, Adam": 16 * P, "activations": int(activations), "logits": logits,
            "total": int(16 * P + activations + logits)}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check(need: int, what: str, batch: int, seq: int, headroom: float = 0.9):
    have, where = available_bytes()
    if need > headroom * have:
        limit = f"the {_gib(have)} of {where}"
        raise MemoryLimitError(
            f"batch {batch} x seq {seq} needs about {_gib(need)} ({what}), more than "
            f"{limit if headroom == 1 else f'{headroom:.0%} of {limit}'}. Use a smaller --batch "
            "or --seq, or --remat full.")


def check_estimate(cfg: Config, batch: int, seq: int, devices: int = 1) -> dict[str, int]:
    """`devices`: the run is split over that many (a mesh); accelerators then hold a share each,
    while CPU devices all live in the one host memory."""
    est = estimate_bytes(cfg, batch, seq)
    detail = ", ".join(f"{k} {_gib(v)}" for k, v in est.items() if k != "total")
    need = est["total"] if jax.devices()[0].platform == "cpu" else est["total"] // devices
    if need != est["total"]:
        detail += f"; 1/{devices} of it per device"
    check(need, f"estimated from the config: {detail}", batch, seq, headroom=1.0)
    return est


def check_compiled(compiled, batch: int, seq: int) -> int | None:
    """XLA's peak for the compiled step (arguments + outputs + temporaries, less donated)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    need = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)
    check(need, "XLA's figure for the compiled train step", batch, seq)
    return need
