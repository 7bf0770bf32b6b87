"""Memory planner: does a model, mesh, dtype, batch and context fit, before renting the hardware?

    python -m experiments.plan --preset scout --mesh tensor=8 --dtype bfloat16 --batch 1 --context 1048576
    python -m experiments.plan --table experiments/results/plan.md     # the table in the README

Prefill and decode are compiled ahead of time for the text decoder on abstract inputs
(jax.ShapeDtypeStruct carrying the target shardings: nothing is allocated) over simulated CPU
devices, one per mesh position, and `compiled.memory_analysis()` of the per-device SPMD program
gives the bytes of arguments, outputs (less those aliased to donated inputs) and temporaries.
Prefill is one piece of --prefill-chunk tokens appended to a cache of --context positions (the
last and largest piece: every piece runs the same program); decode is the jitted loop.

Params and KV cache per device are exact: they are the shard sizes. Read the temporaries as an
estimate: they come from XLA:CPU's buffer assignment, and XLA:GPU or TPU fuse differently.
bfloat16 is compiled as float16, the same size: XLA:CPU has no bf16 arithmetic, rewrites every
bf16 op in f32 and hoists f32 copies of whole stacked weights and caches out of the layer loop
(measured: 73 GB of temporaries for Scout's decode on tensor=8 at 1M context, against 10 GB as
float16), which would describe XLA:CPU rather than the model. Quantized weights (--quantize
RECIPE) and an 8-bit cache (--kv-dtype) are compiled as they are (int4 two to a byte, as XLA
stores it; scales included), so the temporaries are those of the quantized kernels.
Three XLA:CPU habits that describe XLA:CPU, not the GPUs and TPUs planned for (which store int4
and fp8 and multiply f16 and bf16 as they are), are switched off (COMPILER_OPTIONS):
its passes that widen int4 to int8 and fp8 to a float for the ops it lacks (float-normalization-
s4, -f8e4m3fn), whose widened copies of whole stacked weights it then hoists out of the layer
loop (measured: 110 GB of temporaries for Scout int4_mixed's decode on one device at 256K);
the pass that upcasts f16 matmul operands to f32 (change-op-data-type: 4 GB for Scout's LM head
alone, hoisted out of the decode loop); and its default scheduler, which orders for concurrency
and starts every layer of a block at once (with it, a block's four layers' expert weights were
live together), for its memory-optimised one. The programs are only compiled, never run.
Memory per chip is taken as H100 80 GB, H200 141 GB, TPU v5p 95 GB (1 GB = 1e9 bytes), and a
plan "fits" within 95% of it (on GPUs also set XLA_PYTHON_CLIENT_MEM_FRACTION=.95: JAX
preallocates 75% by default).
"""
from __future__ import annotations

import copy
import math
import sys
import time

import numpy as np

from experiments import cli

# JAX is imported where used: --help and bad flags answer before it loads.

DEVICES_GB = {"H100": 80, "H200": 141, "TPU v5p": 95}
# dense bf16 peak per chip, TFLOP/s (no sparsity): H100 and H200 SXM 989, TPU v5p 459
PEAK_TFLOPS = {"H100": 989, "H200": 989, "TPU v5p": 459}
MFU = 0.4  # the utilisation prefill times are stated at: a good large-model figure on H100s
GB = 1e9
# XLA:CPU passes that make copies a GPU or TPU compiler does not (the module docstring)
COMPILER_OPTIONS = {
    "xla_disable_hlo_passes": "float-normalization-s4,float-normalization-f8e4m3fn,"
                              "change-op-data-type",
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
HEADROOM = 0.95  # a runtime keeps some memory for itself: "fits" leaves 5% of the chip free


def simulate_devices(n: int):
    """n CPU devices: set before JAX starts its backends (as when run with python -m)."""
    from sharding import simulate_cpu_devices
    return simulate_cpu_devices(n)


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard set);
    int4 values two to a byte, as XLA:GPU and TPU store them."""
    import jax
    total = 0
    for x in jax.tree.leaves(tree):
        total += math.prod(x.sharding.shard_shape(x.shape)) * _itemsize(x.dtype)
    return round(total)


def _itemsize(dtype) -> float:
    import jax.numpy as jnp
    return 0.5 if jnp.dtype(dtype) == jnp.int4 else jnp.dtype(dtype).itemsize


def float16_stand_in(cfg, dtype: str, param_dtype: str):
    """cfg with bfloat16 written as float16 (see the docstring). Config refuses float16 compute,
    as it overflows on real weights; this config is only compiled on abstract inputs, never run,
    so it is set past that check."""
    cfg = copy.copy(cfg)
    for field, d in (("dtype", dtype), ("param_dtype", param_dtype)):
        object.__setattr__(cfg, field, "float16" if d == "bfloat16" else d)
    return cfg


def abstract(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings`; a quantized leaf (QArray) takes its
    weight's sharding for its qvalue and scale (sharding.rules.child_sharding) unless given
    one per child."""
    import jax

    from model.quantization import is_quantized
    from sharding.rules import child_sharding

    def one(s, sh):
        if not is_quantized(s):
            return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
        if not is_quantized(sh):
            sh = jax.tree.map(lambda c: child_sharding(sh, s.shape, c.shape), s)
        return jax.tree.map(lambda c, csh: jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=csh),
                            s, sh)
    return jax.tree.map(one, tree, shardings, is_leaf=is_quantized)


def plan(preset: str, mesh_spec: str, dtype: str, batch: int, context: int, *,
         param_dtype: str | None = None, rules: str = "combined", prefill_chunk: int = 512,
         steps: int = 16, devices=None, quantize: str | None = None,
         kv_dtype: str | None = None, announce: bool = False) -> dict:
    """Per-device memory of prefill and decode (see the module docstring; `report` prints it).
    devices: the mesh's devices; default the first CPU devices it needs (`simulate_devices`).
    quantize: a weight recipe (model/quantization.py); kv_dtype: an 8-bit KV cache.
    announce: say on stderr that the (long) compiles start."""
    import jax
    import model
    import sharding
    from model import kv_cache, quantization, sampling

    cfg = float16_stand_in(model.preset(preset).replace(vision=None, kv_dtype=kv_dtype), dtype,
                           param_dtype or dtype)
    if devices is None:
        devices = jax.devices("cpu")[:math.prod(sharding.parse_mesh(mesh_spec).values())]
    mesh = sharding.make_mesh(mesh_spec, devices)
    piece = min(prefill_chunk, context)
    p = sharding.make_plan(cfg, mesh, rules, batch=batch, seq=piece)
    p_decode = sharding.make_plan(cfg, mesh, rules, batch=batch, seq=1)
    shardings = sharding.param_shardings(cfg, mesh, rules)

    def decoder(tree):
        return {k: tree[k] for k in model.DECODER_KEYS}
    params = decoder(abstract(quantization.quantized_shapes(cfg, quantize), shardings))
    cache = jax.eval_shape(lambda: kv_cache.init_cache(cfg, batch, context))
    cache = abstract(cache, p.cache_shardings(cache))
    tokens = lambda shape: jax.ShapeDtypeStruct(  # noqa: E731
        shape, np.int32, sharding=p.sharding(("batch", "seq")[:len(shape)], shape))
    row = lambda logical, shape, dt: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dt, sharding=p.sharding(logical, shape))
    out = {"preset": preset, "mesh": mesh_spec, "dtype": dtype,
           "param_dtype": param_dtype or dtype, "batch": batch, "context": context,
           "quantize": quantize, "kv_dtype": kv_dtype,
           "params": _bytes_per_device(params), "cache": _bytes_per_device(cache)}

    if announce:
        print(f"compiling prefill and decode of {preset} on {mesh_spec} (a minute or more for "
              "the full presets)...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    prefill = sampling.extend.lower(cfg, model.resolve(cfg, "prefill", p), params,
                                    tokens((batch, piece)), tokens((batch, piece)), cache
                                    ).compile(COMPILER_OPTIONS)
    t1 = time.perf_counter()
    key = jax.eval_shape(lambda: jax.random.key(0))
    state = sampling.DecodeState(row(("batch", "vocab"), (batch, cfg.text.vocab_size), np.float32),
                                 tokens((batch,)), cache, row(("batch",), (batch,), np.bool_), key)
    stop = jax.ShapeDtypeStruct((len(cfg.text.eos_token_ids),), np.int32)
    decode = sampling.decode.lower(cfg, model.resolve(cfg, "decode", p_decode), params, state, stop,
                                   0, steps, steps=steps, temperature=0.0, top_k=None,
                                   top_p=None).compile(COMPILER_OPTIONS)
    t2 = time.perf_counter()
    out["compile_s"] = {"prefill": t1 - t0, "decode": t2 - t1}
    for name, c in (("prefill", prefill), ("decode", decode)):
        m = c.memory_analysis()
        args, outs, alias, temp = (m.argument_size_in_bytes, m.output_size_in_bytes,
                                   m.alias_size_in_bytes, m.temp_size_in_bytes)
        out[name] = {"arguments": args, "outputs": outs, "aliased": alias, "temporaries": temp,
                     "total": args + outs - alias + temp}
    out["arithmetic"] = arithmetic(cfg, mesh, batch, context, piece, quantize)
    out["prefill_flops"] = batch * prefill_flops(cfg, context)
    out["prefill_s"] = out["prefill_flops"] / (mesh.size * PEAK_TFLOPS["H100"] * 1e12 * MFU)
    out["checkpoint"] = checkpoint_bytes(preset, param_dtype or dtype)
    return out


def checkpoint_bytes(preset: str, param_dtype: str) -> int:
    """Bytes of the whole published checkpoint (vision tower included) in `param_dtype`: what a
    load from an HF directory holds in host memory before placing anything (checkpoints.load)."""
    import jax
    import jax.numpy as jnp
    import model
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(model.param_shapes(model.preset(preset))))
    return n * jnp.dtype(param_dtype).itemsize


def arithmetic(cfg, mesh, batch: int, context: int, piece: int, quantize: str | None = None
               ) -> dict:
    """The same figures from the config alone: params / model shards, KV cache / its shards, and
    the largest activation of prefill: one global layer's fp32 query x key scores and the bf16
    or fp32 probabilities (the XLA attention path), over the devices that split the heads, for
    the keys scored at once: the whole cache and the piece, or one block of a cache longer than
    DENSE_MAX_LEN slots (model/kernels/attention.py)."""
    import jax
    from flax import traverse_util

    from model import kv_cache, quantization
    from model.kernels.attention import BLOCK, DENSE_MAX_LEN
    t = cfg.text
    size = dict(mesh.shape)
    tp, ep, fsdp = size["tensor"], size["expert"], size["fsdp"]
    a = np.dtype(cfg.dtype).itemsize
    experts = rest = 0
    for path, leaf in traverse_util.flatten_dict(quantization.quantized_shapes(cfg, quantize)
                                                 ).items():
        n = sum(math.prod(x.shape) * _itemsize(x.dtype) for x in jax.tree.leaves(leaf))
        if path[-2:-1] == ("moe",) and path[-1] in ("wi_gate", "wi_up", "wo"):
            experts += n
        else:
            rest += n
    # experts split over expert x tensor x fsdp; everything else over tensor x fsdp (near enough:
    # the norms are split over fsdp only, and they are a rounding error)
    params = experts / (ep * tp * fsdp) + rest / (tp * fsdp)
    kv_split = tp if t.num_kv_heads % tp == 0 else 1
    cache = kv_cache.cache_bytes(cfg, batch, context) / (kv_split * size["context"])
    keys = context + piece if context <= DENSE_MAX_LEN else max(BLOCK, piece)
    scores = batch * (t.num_heads // tp) * piece * keys * (4 + a)
    return {"params": params, "cache": cache, "scores": scores,
            "total": params + cache + scores}


def prefill_flops(cfg, tokens: int) -> float:
    """Useful FLOPs of prefilling one prompt of `tokens` (forward only): 2 per active weight per
    token for the matmuls (the embedding is a lookup; the LM head runs on each piece's last token
    only, left out), plus causal attention, QK^T and PV, 4 * H FLOPs per head per (query, key):
    a global layer's query sees on average T/2 keys, a chunked layer's C/2 (its chunk's causal
    half). The XLA kernels also score the masked half of each global layer's cache blocks (up to
    twice the global layers' useful work): the MFU below is of useful FLOPs, as MFU is."""
    from model.config import param_count
    t = cfg.text
    matmul = 2 * (param_count(cfg)["text_active"] - 2 * t.vocab_size * t.hidden_size) * tokens
    per_key = 4 * t.head_dim * t.num_heads
    attention = 0
    for spec in t.layer_specs:
        seen = min(t.attention_chunk_size, tokens) if spec.chunked else tokens
        attention += per_key * tokens * seen / 2
    return matmul + attention


def _gb(x) -> str:
    return f"{x / GB:.1f}"


def report(r: dict) -> str:
    lines = [f"{r['preset']} on {r['mesh']}, {r['dtype']} compute, {_weights(r)} params, "
             f"{r.get('kv_dtype') or r['dtype']} KV cache, batch {r['batch']}, context "
             f"{r['context']}: per device (GB = 1e9 bytes)",
             f"  params {_gb(r['params'])}   KV cache {_gb(r['cache'])}   (shard sizes)"]
    for name in ("prefill", "decode"):
        m = r[name]
        fits = "  ".join(f"{d} {'yes' if m['total'] <= HEADROOM * gb * GB else 'NO'}"
                         for d, gb in DEVICES_GB.items())
        lines.append(f"  {name:8s} arguments {_gb(m['arguments'])}  outputs {_gb(m['outputs'])}"
                     f"  aliased {_gb(m['aliased'])}  temporaries {_gb(m['temporaries'])}"
                     f"  -> total {_gb(m['total'])}   fits: {fits}")
    a = r["arithmetic"]
    lines.append(f"  arithmetic: params {_gb(a['params'])} + cache {_gb(a['cache'])} + prefill "
                 f"attention scores {_gb(a['scores'])} = {_gb(a['total'])}")
    lines.append(f"  loading: from an HF directory the whole checkpoint is read into host memory "
                 f"first, {_gb(r['checkpoint'])} GB in {r['param_dtype']} (vision tower "
                 f"included); from Orbax (python -m checkpoints.convert) each device reads its "
                 f"{_gb(r['params'])} GB of shards straight (sharding.load)")
    lines.append(f"  prefill of the whole context: {r['prefill_flops']:.3g} FLOPs, "
                 f"{_duration(r['prefill_s'])} at {MFU:.0%} MFU on H100s or H200s (dense bf16 "
                 f"peak {PEAK_TFLOPS['H100']} TFLOP/s a chip)")
    c = r["compile_s"]
    lines.append(f"  compiled in {c['prefill']:.0f} s (prefill) + {c['decode']:.0f} s (decode)")
    return "\n".join(lines)


def _weights(r: dict) -> str:
    """The weights' storage: the recipe's name, or the params dtype."""
    return r.get("quantize") or r["param_dtype"]


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _context(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10}K"


def figure(results: list[dict]):
    """A bar a plan: per-device GB at the larger of prefill and decode (parameters, KV cache, the
    rest), against each chip's memory less the headroom."""
    import matplotlib.pyplot as plt
    peak = np.array([max(r["prefill"]["total"], r["decode"]["total"]) for r in results]) / GB
    params = np.array([r["params"] for r in results]) / GB
    cache = np.array([r["cache"] for r in results]) / GB
    x = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(results)), 4))
    ax.bar(x, params, label="parameters")
    ax.bar(x, cache, bottom=params, label="KV cache")
    ax.bar(x, np.maximum(peak - params - cache, 0), bottom=params + cache,
           label="activations, temporaries")
    for (chip, gb), style in zip(DEVICES_GB.items(), (":", "--", "-.")):
        ax.axhline(HEADROOM * gb, color="k", ls=style, lw=1,
                   label=f"{chip} ({gb} GB, {HEADROOM:.0%} usable)")
    short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}
    labels = ["\n".join([r["preset"], *r["mesh"].split(","),
                         f"{short.get(r['dtype'], r['dtype'])}, {_context(r['context'])}"])
              for r in results]
    ax.set_xticks(x, labels, fontsize="small")
    ax.set(ylabel="GB per device", title=f"Memory per device, batch {results[0]['batch']}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return fig


TABLE = [  # (preset, mesh, dtype, context, weight recipe, KV-cache dtype)
    ("scout", "tensor=8", "bfloat16", 8192, None, None),
    ("scout", "tensor=8", "bfloat16", 131072, None, None),
    ("scout", "tensor=8", "bfloat16", 1048576, None, None),
    ("scout", "context=2,tensor=4", "bfloat16", 1048576, None, None),
    ("scout", "tensor=8", "bfloat16", 10485760, None, None),
    ("scout", "context=2,tensor=4", "bfloat16", 10485760, None, None),
    ("scout", "context=2,tensor=8", "bfloat16", 10485760, None, None),  # 16 chips: two hosts
    ("scout", "tensor=8", "bfloat16", 10485760, None, "int8"),
    ("scout", "tensor=8", "float32", 131072, None, None),
    ("scout", "expert=8", "bfloat16", 131072, None, None),
    ("maverick", "tensor=8", "bfloat16", 8192, None, None),
    ("maverick", "tensor=8", "bfloat16", 1048576, None, None),
    ("maverick", "expert=4,tensor=2", "bfloat16", 131072, None, None),
    ("maverick", "expert=8", "bfloat16", 131072, None, None),
]
# Meta's deployment claims: Scout int4 on one chip (H100 80 GB, H200, TPU v5p) at 128K, 256K
# and 1M with an 8-bit cache; Maverick fp8 on one 8-GPU host at its longest context, 1M, with an
# 8-bit and a bf16 cache.
QUANTIZED = [
    ("scout", "tensor=1", "bfloat16", 131072, "int4_mixed", "int8"),
    ("scout", "tensor=1", "bfloat16", 262144, "int4_mixed", "int8"),
    ("scout", "tensor=1", "bfloat16", 1048576, "int4_mixed", "int8"),
    ("maverick", "tensor=8", "bfloat16", 1048576, "fp8_mixed", "int8"),
    ("maverick", "tensor=8", "bfloat16", 1048576, "fp8_mixed", None),
]


def table(path: str, devices, batch: int):
    rows = []
    from sharding import parse_mesh
    for preset, mesh, dtype, ctx, recipe, kv in TABLE + QUANTIZED:
        r = plan(preset, mesh, dtype, batch, ctx, quantize=recipe, kv_dtype=kv,
                 devices=devices[:math.prod(parse_mesh(mesh).values())])
        print(report(r), flush=True)
        rows.append(r)
    head = ("| model | mesh | dtype | weights | KV cache dtype | context | params | KV cache "
            "| prefill total | decode total | arithmetic | H100 80 | H200 141 | v5p 95 "
            f"| prefill at {MFU:.0%} MFU |\n" + "|---" * 15 + "|")
    body = []
    for r in rows:
        peak = max(r["prefill"]["total"], r["decode"]["total"])
        fit = [("yes" if peak <= HEADROOM * gb * GB else "no") for gb in DEVICES_GB.values()]
        body.append(f"| {r['preset']} | {r['mesh']} | {r['dtype']} | {_weights(r)} "
                    f"| {r['kv_dtype'] or r['dtype']} | {r['context']} "
                    f"| {_gb(r['params'])} | {_gb(r['cache'])} | {_gb(r['prefill']['total'])} "
                    f"| {_gb(r['decode']['total'])} | {_gb(r['arithmetic']['total'])} "
                    f"| {' | '.join(fit)} | {_duration(r['prefill_s'])} |")
    import jax
    with open(path, "w") as f:
        f.write(f"""# Memory plan: per-device GB (1e9 bytes), batch 1, text decoder

Made by `python -m experiments.plan --table {path}` (jax {jax.__version__}, XLA:CPU with
{len(devices)} simulated devices, about ten minutes); one row alone: `python -m experiments.plan
--preset scout --mesh tensor=8 --dtype bfloat16 --batch 1 --context 1048576`.

- params, KV cache: shard sizes (exact). prefill / decode total: arguments + outputs - aliased
  (donated cache) + temporaries of the compiled programs (prefill: one 512-token piece at the end
  of the context; decode: the jitted loop). Fits: the larger total within 95% of the chip's
  memory (a runtime keeps some for itself).
- arithmetic: from the config alone, params / their shards + KV cache / its shards + one global
  layer's prefill attention scores (fp32) and probabilities for the keys scored at once: a cache
  longer than 2048 slots is read 512 slots at a time with an online softmax, so at long context
  that is 512 x 512 scores per head, not 512 x the context.
- Compiled on XLA:CPU with the options of `experiments/plan.py` (COMPILER_OPTIONS: int4 and fp8
  kept as they are, f16 matmuls not upcast to f32, the memory-optimised scheduler), because
  those XLA:CPU passes copy whole weight stacks that a GPU or TPU compiler does not; bfloat16 is
  compiled as float16 (same bytes), as XLA:CPU rewrites bf16 arithmetic in f32. Temporaries are
  XLA:CPU's; GPU and TPU compilers fuse differently.
- prefill at {MFU:.0%} MFU: the useful FLOPs of a prompt filling the whole context (matmuls of
  the active weights, causal attention; `prefill_flops`) over the mesh's chips at {MFU:.0%} of a
  dense bf16 peak of {PEAK_TFLOPS["H100"]} TFLOP/s a chip (H100 and H200 alike); the XLA kernels
  also score the masked half of the global layers' cache blocks, up to twice their useful work.
- Long context: Scout has 8 KV heads, so tensor=8 already splits the cache 8 ways; the context
  axis splits it further, by positions. On one 8-chip host context=2,tensor=4 holds the same
  cache per chip and twice the weights (worse than tensor=8); it pays past 8 chips:
  context=2,tensor=8 on two hosts halves the cache per chip. The 10M rows are bf16 weights; the
  one with an int8 cache shows what an 8-bit cache saves (int8 values plus a scale per head_dim).
- Meshes run the stacked layout, whose prefill temporaries on XLA:CPU hold about two of one
  block's global-layer buffers (what the layer scan reads, copied to be written after it: about
  6 GB per chip at 10M on tensor=8); the split layouts of one CPU device make no such copy.
- expert=8 alone replicates attention, the shared experts, Maverick's dense layers and the vocab
  on every device, hence its larger params; combine it with tensor (or fsdp) for big models.
- weights int4_mixed / fp8_mixed / int8 (model/quantization.py) and an int8 KV cache: compiled
  as they are (int4 two to a byte, float32 scales included). The MoE kernel dequantizes one
  expert at a time (model/kernels/experts.py `swiglu_by_expert`), so a layer's temporaries hold
  its quantized expert stack (copied out of the stacked layers for the expert loop) and one
  expert in float. One row: `python -m experiments.plan --preset scout --mesh tensor=1
  --quantize int4_mixed --kv-dtype int8 --context 262144`.

""" + head + "\n" + "\n".join(body) + "\n")


def parse_args(argv=None):
    ap = cli.parser(__spec__.name, __doc__)
    ap.add_argument("--preset", default="scout", choices=cli.PRESETS,
                    help="model preset (default: %(default)s)")
    ap.add_argument("--mesh", default="tensor=8",
                    help="mesh axes and sizes, e.g. expert=4,tensor=2; axes data, fsdp, expert, "
                         "context, tensor (default: %(default)s)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="compute dtype (default: %(default)s)")
    ap.add_argument("--param-dtype", choices=("bfloat16", "float32"),
                    help="the weights' dtype (default: --dtype)")
    ap.add_argument("--rules", default="combined", choices=cli.STRATEGIES,
                    help="sharding strategy (default: %(default)s)")
    ap.add_argument("--quantize", choices=("int8", "int4_mixed", "fp8_mixed"),
                    help="weights quantized by a recipe of model/quantization.py")
    ap.add_argument("--kv-dtype", choices=("int8", "fp8"),
                    help="an 8-bit KV cache (default: the compute dtype)")
    ap.add_argument("--batch", type=int, default=1, help="rows (default: %(default)s)")
    ap.add_argument("--context", type=int, default=131072,
                    help="KV-cache positions (default: %(default)s)")
    ap.add_argument("--prefill-chunk", type=int, default=512,
                    help="tokens per prefill piece (default: %(default)s)")
    ap.add_argument("--table", metavar="PATH",
                    help="plan the configurations of TABLE (16 devices) and write PATH")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for flag in ("batch", "context", "prefill_chunk"):
        if getattr(args, flag) < 1:
            sys.exit(f"error: --{flag.replace('_', '-')} must be at least 1, got "
                     f"{getattr(args, flag)}")
    from model.config import ConfigError
    from sharding import ShardingError, parse_mesh
    try:
        meshes = [m for _, m, *_ in TABLE + QUANTIZED] if args.table else [args.mesh]
        n = max(math.prod(parse_mesh(m).values()) for m in meshes)  # the largest mesh's devices
        devices = simulate_devices(n)
        if args.table:
            return table(args.table, devices, args.batch)
        print(report(plan(args.preset, args.mesh, args.dtype, args.batch, args.context,
                          param_dtype=args.param_dtype, rules=args.rules,
                          prefill_chunk=args.prefill_chunk, devices=devices, announce=True,
                          quantize=args.quantize, kv_dtype=args.kv_dtype)))
    except (ShardingError, ConfigError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
