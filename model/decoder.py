"""The text decoder: embeddings, the layers scanned over the repeating block, final norm, LM head.

The stored parameters stack the `cfg.text.num_blocks` repeats of the `cfg.text.period`-layer
pattern under "blocks", and the decoder scans over them. On one CPU device, inference reads split
views of the same tree instead and runs the blocks one after another (runtime.py: the layouts).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from . import kv_cache
from .attention import Attention
from .config import Config, LayerSpec
from .kernels import views
from .kernels.quantized import dense
from .layers import MLP, REMAT_POLICIES, RMSNorm, param
from .moe import MoE
from .runtime import Runtime

ACTIVATION = ("batch", "seq", "act_embed")  # logical axes of the residual stream [B, T, D]


class DecoderLayer(nn.Module):
    cfg: Config
    spec: LayerSpec
    rt: Runtime = Runtime()

    @nn.compact
    def __call__(self, x, positions, cache=None):  # x [B, T, D]
        t = self.cfg.text
        x = self.rt.constrain(x, ACTIVATION)
        with jax.named_scope("attention"):
            h = RMSNorm(self.cfg, t.rms_norm_eps, name="attn_norm")(x)
            h, new_kv = Attention(self.cfg, self.spec, self.rt, name="attn")(h, positions, cache)
            x = x + h
        with jax.named_scope("moe" if self.spec.moe else "mlp"):
            h = RMSNorm(self.cfg, t.rms_norm_eps, name="ffn_norm")(x)
            if self.spec.moe:
                ffn = MoE(self.cfg, self.rt, name="moe")
            else:
                ffn = MLP(self.cfg, t.intermediate_size_mlp, name="mlp")
            return x + ffn(h), new_kv


class Block(nn.Module):
    """One period of the layer pattern (4 layers for Scout and Maverick); the unit of the scan."""
    cfg: Config
    rt: Runtime = Runtime()

    @nn.compact
    def __call__(self, x, positions, cache):
        """-> (x, what each layer gives its cache (kernels.attention.attend); None without one)."""
        new = {}
        for j, spec in enumerate(self.cfg.text.block_specs):
            name = f"layer_{j}"
            layer_cache = None if cache is None else cache[name]
            x, new[name] = DecoderLayer(self.cfg, spec, self.rt, name=name)(x, positions,
                                                                            layer_cache)
        return x, (None if cache is None else new)


class Embed(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, input_ids):  # [B, T] -> [B, T, D]
        t = self.cfg.text
        table = param(self, "embedding", (t.vocab_size, t.hidden_size), ("vocab", "embed"))
        return table[input_ids].astype(jnp.dtype(self.cfg.dtype))


class LMHead(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x):  # [B, T, D] -> [B, T, V]
        t = self.cfg.text
        kernel = param(self, "kernel", (t.hidden_size, t.vocab_size), ("embed", "vocab"))
        return jnp.einsum("BTD,DV->BTV", x, dense(kernel, x.dtype))


class Decoder(nn.Module):
    cfg: Config
    rt: Runtime = Runtime()

    @nn.compact
    def __call__(self, input_ids, positions=None, embed_fn=None, cache=None,
                 last_only: bool = False):
        """input_ids [B, T] -> (logits [B, T, V], cache); positions [B, T] default to 0..T-1.
        `embed_fn(x)` may rewrite the token embeddings (early fusion splices image features).
        With a `cache` (kv_cache.init_cache) the tokens extend it and the new cache is returned.
        `last_only`: the logits of the last position only, [B, 1, V] (what a prefill needs)."""
        t = self.cfg.text
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        x = Embed(self.cfg, name="embed")(input_ids)
        if embed_fn is not None:
            x = embed_fn(x)
        x = self.rt.constrain(x, ACTIVATION)
        block = Block
        if self.cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
        blocks = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                         split_rngs={"params": True}, in_axes=(nn.broadcast, 0),
                         length=t.num_blocks, metadata_params={nn.PARTITION_NAME: "layers"})(
                             self.cfg, self.rt, name="blocks")
        if self.rt.layout == "stacked" or self.is_initializing():
            x, new = blocks(x, positions, cache)  # the layers read the cache; written once here
            if cache is not None:
                cache = {name: {n: self.rt.constrain(a, kv_cache.AXES[n]) for n, a in layer.items()}
                         for name, layer in kv_cache.write(cache, new, positions).items()}
        else:
            x, cache = self._blocks_in_turn(x, positions, cache)
        if last_only:
            x = x[:, -1:]
        x = RMSNorm(self.cfg, t.rms_norm_eps, name="final_norm")(x)
        logits = LMHead(self.cfg, name="lm_head")(x).astype(jnp.float32)
        return self.rt.constrain(logits, ("batch", None if last_only else "seq", "vocab")), cache

    def _blocks_in_turn(self, x, positions, cache):
        """The split layouts: the blocks one after another, each reading its own views of the
        stored weights (the "blocks" params are `views.Parts`) and of the cache."""
        stacked = self.variables["params"]["blocks"]
        block = Block(self.cfg, self.rt, parent=None)
        caches = []
        for i in range(self.cfg.text.num_blocks):
            block_cache = None if cache is None else views.part(cache, i)
            x, new = block.apply({"params": views.part(stacked, i)}, x, positions, block_cache)
            if cache is not None:  # each layer's new keys written, unless it wrote them already
                caches.append({})
                for j, spec in enumerate(self.cfg.text.block_specs):
                    name = f"layer_{j}"
                    caches[-1][name] = new[name] if self.rt.writes_cache_first(spec.chunked) else \
                        kv_cache.write_layer(block_cache[name], new[name]["k"], new[name]["v"],
                                             positions)
        return x, (views.join(caches) if cache is not None else None)
