"""The text decoder: embeddings, layers scanned over the repeating block, final norm, LM head."""
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
    split: bool = False  # each expert's weights a parameter of their own (model/split.py)

    @nn.compact
    def __call__(self, x, positions, cache=None):  # x [B, T, D]
        t = self.cfg.text
        x = constrain(x, ACTIVATION)
        with jax.named_scope("attention"):
            h = RMSNorm(self.cfg, t.rms_norm_eps, name="attn_norm")(x)
            attn = Attention(self.cfg, self.spec, self.fresh_cache, write_first=self.split,
                             name="attn")
            h, new_kv = attn(h, positions, cache)
            x = x + h
        with jax.named_scope("moe" if self.spec.moe else "mlp"):
            h = RMSNorm(self.cfg, t.rms_norm_eps, name="ffn_norm")(x)
            if self.spec.moe:
                ffn = MoE(self.cfg, self.moe_impl, self.split, name="moe")
            else:
                ffn = MLP(self.cfg, t.intermediate_size_mlp, name="mlp")
            return x + ffn(h), new_kv


class Block(nn.Module):
    """One period of the layer pattern (4 layers for Scout and Maverick); the unit of the scan."""
    cfg: Config
    moe_impl: str = "grouped"
    fresh_cache: bool = False
    split: bool = False

    @nn.compact
    def __call__(self, x, positions, cache):
        """-> (x, the new keys/values of each layer, for kv_cache.write; None without a cache).
        `split`: each layer's updated cache instead (the layers write before they read)."""
        new_kv = {}
        for j, spec in enumerate(self.cfg.text.block_specs):
            name = f"layer_{j}"
            layer_cache = None if cache is None else cache[name]
            layer = DecoderLayer(self.cfg, spec, self.moe_impl, self.fresh_cache, self.split,
                                 name=name)
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
    # The split layout (model/split.py): blocks run one by one from parameters "block_{i}" of
    # their own, each expert's weights separate, and the cache a tuple of per-block caches.
    split: bool = False

    @nn.compact
    def __call__(self, input_ids, positions=None, embed_fn=None, cache=None):
        """input_ids [B, T] -> (logits [B, T, V], cache); positions [B, T] default to 0..T-1.
        `embed_fn(x)` may rewrite the token embeddings (early fusion splices image features).
        With a `cache` (kv_cache.init_cache) the tokens extend it and the new cache is returned."""
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
        if self.split:
            if cache is not None and T != 1:
                raise ValueError(f"the split layout decodes one token per row, got {T}")
            blocks = [None] * t.num_blocks if cache is None else list(cache)
            for i in range(t.num_blocks):
                x, blocks[i] = block(self.cfg, self.moe_impl, self.fresh_cache, split=True,
                                     name=f"block_{i}")(x, positions, blocks[i])
            cache = None if cache is None else tuple(blocks)
        else:
            scanned = nn.scan(
                block, variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True}, in_axes=(nn.broadcast, 0), length=t.num_blocks,
                metadata_params={nn.PARTITION_NAME: "layers"})
            blocks = scanned(self.cfg, self.moe_impl, self.fresh_cache, name="blocks")
            x, new_kv = blocks(x, positions, cache)  # the layers read the cache; written once here
            if cache is not None:
                cache = {name: {n: constrain(a, kv_cache.AXES[n]) for n, a in layer.items()}
                         for name, layer in kv_cache.write(cache, new_kv, positions).items()}
        x = RMSNorm(self.cfg, t.rms_norm_eps, name="final_norm")(x)
        logits = LMHead(self.cfg, name="lm_head")(x).astype(jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab")), cache
