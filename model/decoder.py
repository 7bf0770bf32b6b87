"""The text decoder: embeddings, layers scanned over the repeating block (run block by block in
the split layouts of CPU inference, model/split.py), final norm, LM head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from . import kv_cache
from .attention import Attention
from .config import Config, LayerSpec
from .layers import MLP, RMSNorm, constrain, param
from .moe import MoE

ACTIVATION = ("batch", "seq", "act_embed")  # logical axes of the residual stream [B, T, D]

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderLayer(nn.Module):
    cfg: Config
    spec: LayerSpec
    moe_impl: str = "grouped"
    fresh_cache: bool = False  # the KV cache is known to be empty (a prompt's first piece)
    split_experts: bool = False  # each expert's weights a parameter of their own (model/split.py)
    write_first: bool = False  # one token per row: write the cache, then read it (Attention)

    @nn.compact
    def __call__(self, x, positions, cache=None):  # x [B, T, D]
        t = self.cfg.text
        x = constrain(x, ACTIVATION)
        with jax.named_scope("attention"):
            h = RMSNorm(self.cfg, t.rms_norm_eps, name="attn_norm")(x)
            attn = Attention(self.cfg, self.spec, self.fresh_cache, self.write_first, name="attn")
            h, new_kv = attn(h, positions, cache)
            x = x + h
        with jax.named_scope("moe" if self.spec.moe else "mlp"):
            h = RMSNorm(self.cfg, t.rms_norm_eps, name="ffn_norm")(x)
            if self.spec.moe:
                ffn = MoE(self.cfg, self.moe_impl, self.split_experts, name="moe")
            else:
                ffn = MLP(self.cfg, t.intermediate_size_mlp, name="mlp")
            return x + ffn(h), new_kv


class Block(nn.Module):
    """One period of the layer pattern (4 layers for Scout and Maverick); the unit of the scan."""
    cfg: Config
    moe_impl: str = "grouped"
    fresh_cache: bool = False
    split_experts: bool = False
    write_first: bool = False

    @nn.compact
    def __call__(self, x, positions, cache):
        """-> (x, the new keys/values of each layer, for kv_cache.write; None without a cache).
        `write_first`: each layer's updated cache instead."""
        new_kv = {}
        for j, spec in enumerate(self.cfg.text.block_specs):
            name = f"layer_{j}"
            layer_cache = None if cache is None else cache[name]
            layer = DecoderLayer(self.cfg, spec, self.moe_impl, self.fresh_cache,
                                 self.split_experts, self.write_first, name=name)
            x, new_kv[name] = layer(x, positions, layer_cache)
        return x, (None if cache is None else new_kv)


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
        return jnp.einsum("BTD,DV->BTV", x, kernel.astype(x.dtype))


class Decoder(nn.Module):
    cfg: Config
    moe_impl: str = "grouped"
    fresh_cache: bool = False  # with a cache: it is empty, so attention skips it
    # How the parameters are laid out (model/split.py): "stacked" as stored, the blocks scanned;
    # "blocks" / "experts", CPU inference: each block's parameters ("block_{i}"), and with
    # "experts" each expert's weights, arrays of their own; the blocks run one by one and the
    # cache is a tuple of per-block caches.
    layout: str = "stacked"

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
        x = constrain(x, ACTIVATION)
        block = Block
        if self.cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
        if self.layout == "stacked":
            scanned = nn.scan(
                block, variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True}, in_axes=(nn.broadcast, 0), length=t.num_blocks,
                metadata_params={nn.PARTITION_NAME: "layers"})
            blocks = scanned(self.cfg, self.moe_impl, self.fresh_cache, name="blocks")
            x, new_kv = blocks(x, positions, cache)  # the layers read the cache; written once here
            if cache is not None:
                cache = {name: {n: constrain(a, kv_cache.AXES[n]) for n, a in layer.items()}
                         for name, layer in kv_cache.write(cache, new_kv, positions).items()}
        else:
            # One token per row overwrites no key still needed: the layers write their slot,
            # then read the cache, and XLA updates it in place (see Attention.write_first).
            write_first = T == 1
            blocks = [None] * t.num_blocks if cache is None else list(cache)
            for i in range(t.num_blocks):
                x, new_kv = block(self.cfg, self.moe_impl, self.fresh_cache,
                                  self.layout == "experts", write_first,
                                  name=f"block_{i}")(x, positions, blocks[i])
                if cache is not None:
                    blocks[i] = new_kv if write_first else kv_cache.write(blocks[i], new_kv,
                                                                          positions)
            cache = None if cache is None else tuple(blocks)
        if last_only:
            x = x[:, -1:]
        x = RMSNorm(self.cfg, t.rms_norm_eps, name="final_norm")(x)
        logits = LMHead(self.cfg, name="lm_head")(x).astype(jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab")), cache
