"""The Llama 4 vision tower: 336-pixel tiles in, one text-width embedding per <|patch|> token out.

Per tile (HF `Llama4VisionModel`, Meta `VisionEncoder`):
  unfold 14x14 patches (channel order c, kh, kw) -> one linear map -> append the class token LAST
  -> + learned positions (last row: class token) -> LayerNorm -> Lv pre-LN ViT blocks
  (bidirectional attention with biases and 2-D RoPE; exact-erf GELU MLP) -> LayerNorm
  -> drop the class token -> pixel shuffle (2x2 neighbours into channels) -> adapter MLP with GELU
  after BOTH layers -> projector into the text width (in `VisionTower`).

Extra einsum letters, local to this file: Y/X rows/columns of patches in a tile, h/w pixel rows and
columns inside a patch, C colour channels (everywhere else C is the attention chunk).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from .config import Config, ConfigError, VisionConfig
from .layers import REMAT_POLICIES, merge_heads, param
from .rope import rotate_by_angles, vision_angles

_zeros = nn.initializers.zeros
_ones = nn.initializers.ones


def shuffle_factor(v: VisionConfig) -> int:
    """s with pixel_shuffle_ratio == 1/s: s x s neighbouring patches merge into one token."""
    s = round(1 / v.pixel_shuffle_ratio)
    if abs(s * v.pixel_shuffle_ratio - 1) > 1e-9:
        raise ConfigError(f"vision field 'pixel_shuffle_ratio' = {v.pixel_shuffle_ratio}: only 1/s "
                          "for an integer s is supported")
    return s


def tokens_per_tile(v: VisionConfig) -> int:
    """<|patch|> tokens (features) per tile: (image_size / patch_size)^2 / s^2 (144 for Llama 4)."""
    return (v.image_size // v.patch_size) ** 2 // shuffle_factor(v) ** 2


def check_config(v: VisionConfig) -> None:
    """Reject vision configs the tower cannot run (HF would fail later with a shape error)."""
    def need(ok, field, why):
        if not ok:
            raise ConfigError(f"vision field {field!r}: {why}")
    need(v.hidden_size % v.num_heads == 0, "hidden_size",
         f"{v.hidden_size} is not a multiple of num_attention_heads = {v.num_heads}")
    need((v.hidden_size // v.num_heads) % 4 == 0, "num_attention_heads",
         f"head_dim {v.hidden_size // v.num_heads} must be a multiple of 4 for 2-D RoPE")
    need(v.image_size % v.patch_size == 0, "image_size",
         f"{v.image_size} is not a multiple of patch_size = {v.patch_size}")
    s = shuffle_factor(v)
    need((v.image_size // v.patch_size) % s == 0, "pixel_shuffle_ratio",
         f"{v.image_size // v.patch_size} patches per side do not split into groups of {s}")
    need(v.projector_input_dim == v.projector_output_dim == v.vision_output_dim,
         "projector_output_dim",
         "the adapter feeds fc1 -> fc2 -> projector, so projector_input_dim "
         f"({v.projector_input_dim}), projector_output_dim ({v.projector_output_dim}) and "
         f"vision_output_dim ({v.vision_output_dim}) must be equal")


class LayerNorm(nn.Module):
    """LayerNorm with bias over the last axis; statistics in fp32 (torch's nn.LayerNorm)."""
    cfg: Config
    eps: float = 1e-5  # HF uses nn.LayerNorm's default and ignores the config's norm_eps

    @nn.compact
    def __call__(self, x):  # [..., D]
        scale = param(self, "scale", (x.shape[-1],), ("vision_embed",), _ones)
        bias = param(self, "bias", (x.shape[-1],), ("vision_embed",), _zeros)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return y * scale.astype(x.dtype) + bias.astype(x.dtype)


class PatchEmbed(nn.Module):
    """nn.Unfold(p, stride p) + Linear(C*p*p -> D, no bias), on channel-last tiles."""
    cfg: Config

    @nn.compact
    def __call__(self, pixels):  # [B, H, W, C] -> [B, P, D]
        v = self.cfg.vision
        p, C, D = v.patch_size, v.num_channels, v.hidden_size
        B, H, W, _ = pixels.shape
        # Rows of the kernel run over (c, kh, kw): the order nn.Unfold flattens a patch in.
        kernel = param(self, "kernel", (C * p * p, D), ("vision_patch", "vision_embed"))
        tiles = pixels.reshape(B, H // p, p, W // p, p, C)
        x = jnp.einsum("BYhXwC,ChwD->BYXD", tiles, kernel.reshape(C, p, p, D).astype(pixels.dtype))
        return x.reshape(B, (H // p) * (W // p), D)  # patches row-major, as Unfold orders them


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with q/k/v/o biases and 2-D RoPE on q and k."""
    cfg: Config

    @nn.compact
    def __call__(self, x, angles):  # x [B, T, D], angles [T, H/2]
        v = self.cfg.vision
        D, N = v.hidden_size, v.num_heads
        H = D // N
        dt = x.dtype
        heads = ("vision_heads", "vision_head_dim")
        w = {}
        for name in ("q", "k", "v"):
            w[name] = param(self, name, (D, N, H), ("vision_embed", *heads))
            w[name + "_bias"] = param(self, name + "_bias", (N, H), heads, _zeros)
        o = param(self, "o", (N, H, D), (*heads, "vision_embed"))
        o_bias = param(self, "o_bias", (D,), ("vision_embed",), _zeros)
        q, k, val = (jnp.einsum("BTD,DNH->BTNH", x, w[n].astype(dt)) + w[n + "_bias"].astype(dt)
                     for n in ("q", "k", "v"))
        q, k = rotate_by_angles(q, angles), rotate_by_angles(k, angles)
        s = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * H ** -0.5
        probs = jax.nn.softmax(s, axis=-1).astype(dt)
        out = jnp.einsum("BNTS,BSNH->BTNH", probs, val)
        return merge_heads(out, o) + o_bias.astype(dt)


class VisionMLP(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        v = self.cfg.vision
        D, F = v.hidden_size, v.intermediate_size
        fc1 = param(self, "fc1", (D, F), ("vision_embed", "vision_mlp"))
        fc1_bias = param(self, "fc1_bias", (F,), ("vision_mlp",), _zeros)
        fc2 = param(self, "fc2", (F, D), ("vision_mlp", "vision_embed"))
        fc2_bias = param(self, "fc2_bias", (D,), ("vision_embed",), _zeros)
        dt = x.dtype
        h = jax.nn.gelu(jnp.einsum("BTD,DF->BTF", x, fc1.astype(dt)) + fc1_bias.astype(dt),
                        approximate=False)
        return jnp.einsum("BTF,FD->BTD", h, fc2.astype(dt)) + fc2_bias.astype(dt)


class VisionLayer(nn.Module):
    """One pre-LN ViT block; the unit of the scan over layers."""
    cfg: Config

    @nn.compact
    def __call__(self, x, angles):
        with jax.named_scope("vision_attention"):
            x = x + VisionAttention(self.cfg, name="attn")(LayerNorm(self.cfg, name="attn_norm")(x),
                                                           angles)
        with jax.named_scope("vision_mlp"):
            x = x + VisionMLP(self.cfg, name="mlp")(LayerNorm(self.cfg, name="mlp_norm")(x))
        return x, None


def pixel_shuffle(x, s: int):
    """[B, P, D] -> [B, P/s², s²·D]: token (i, j) of the (side/s)² grid, row-major, concatenates
    the patches (s·i + a, s·j + b) in the order a-major, b-minor (HF's pixel_shuffle: for s = 2
    the channel index is a·2D + b·D + d)."""
    B, P, D = x.shape
    side = round(P ** 0.5)
    x = x.reshape(B, side // s, s, side // s, s, D)  # [B, i, a, j, b, D]
    x = x.transpose(0, 1, 3, 2, 4, 5)                # [B, i, j, a, b, D]
    return x.reshape(B, (side // s) ** 2, s * s * D)


class Adapter(nn.Module):
    """HF Llama4VisionMLP2 / Meta's PixelShuffleMLP: fc1 -> GELU -> fc2 -> GELU, no biases."""
    cfg: Config

    @nn.compact
    def __call__(self, x):  # [B, P', s²·Dv] -> [B, P', Pout]
        v = self.cfg.vision
        fc1 = param(self, "fc1", (x.shape[-1], v.projector_input_dim),
                    ("vision_shuffled", "vision_adapter"))
        fc2 = param(self, "fc2", (v.projector_output_dim, v.projector_output_dim),
                    ("vision_adapter", "vision_out"))
        dt = x.dtype
        h = jax.nn.gelu(jnp.einsum("BTF,FA->BTA", x, fc1.astype(dt)), approximate=False)
        return jax.nn.gelu(jnp.einsum("BTA,AO->BTO", h, fc2.astype(dt)), approximate=False)


class VisionEncoder(nn.Module):
    """Tiles [B, S, S, C] (normalised, channel-last) -> adapter features [B, P', O]
    (O = vision_output_dim)."""
    cfg: Config

    @nn.compact
    def __call__(self, pixels):
        v = self.cfg.vision
        check_config(v)
        D, side = v.hidden_size, v.image_size // v.patch_size
        pixels = pixels.astype(jnp.dtype(self.cfg.dtype))
        with jax.named_scope("patch_embed"):
            x = PatchEmbed(self.cfg, name="patch_embed")(pixels)
            cls = param(self, "class_embedding", (D,), ("vision_embed",))
            pos = param(self, "pos_embedding", (side * side + 1, D),
                        ("vision_tokens", "vision_embed"))
            cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, D))
            x = jnp.concatenate([x, cls], axis=1) + pos.astype(x.dtype)  # class token LAST
            x = LayerNorm(self.cfg, name="pre_norm")(x)
        angles = jnp.asarray(vision_angles(side, D // v.num_heads, v.rope_theta))
        layer = VisionLayer
        if self.cfg.remat != "none":
            layer = nn.remat(VisionLayer, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
        scanned = nn.scan(
            layer, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=nn.broadcast, length=v.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = scanned(self.cfg, name="layers")(x, angles)
        x = LayerNorm(self.cfg, name="post_norm")(x)[:, :-1]  # drop the class token
        with jax.named_scope("pixel_shuffle"):
            x = pixel_shuffle(x, shuffle_factor(v))
        with jax.named_scope("vision_adapter"):
            return Adapter(self.cfg, name="adapter")(x)


class Projector(nn.Module):
    """HF multi_modal_projector.linear_1 / Meta vision_projection: into the text width, no bias."""
    cfg: Config

    @nn.compact
    def __call__(self, x):  # [B, P', O] -> [B, P', D]
        O, D = self.cfg.vision.vision_output_dim, self.cfg.text.hidden_size
        kernel = param(self, "kernel", (O, D), ("vision_out", "embed"))
        return jnp.einsum("BTO,OD->BTD", x, kernel.astype(x.dtype))


class VisionTower(nn.Module):
    """Params {"vision": ..., "projector": ...}: tiles [B, S, S, C] -> features [B, P', D]."""
    cfg: Config

    @nn.compact
    def __call__(self, pixels):
        feats = VisionEncoder(self.cfg, name="vision")(pixels)
        with jax.named_scope("projector"):
            return Projector(self.cfg, name="projector")(feats)
