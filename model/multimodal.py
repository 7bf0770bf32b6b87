"""Early fusion: image features replace the token embeddings at the <|patch|> positions.

Tiles of every image of every row are stacked in one `pixel_values` [tiles, S, S, 3] (channel-last,
normalised as `image_processing` does). Each tile gives `tokens_per_tile` features; all of them,
flattened in tile order, fill the <|patch|> positions of the batch in row-major order (row 0's
tokens first), as HF's `masked_scatter` does. Rows may therefore carry different numbers of images.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import Config
from .vision import VisionTower, check_config, tokens_per_tile

DECODER_KEYS = ("embed", "blocks", "final_norm", "lm_head")
VISION_KEYS = ("vision", "projector")


def decoder_params(params):
    """The text decoder's part of a (possibly multimodal) parameter tree, in any layout."""
    return {k: v for k, v in params.items() if k not in VISION_KEYS}


def placed_features(input_ids, features, image_token_id: int):
    """(mask [B, T], values [B, T, D]): the k-th image-token position (row-major over the batch,
    as HF's masked_scatter) gets features[k]; features [n, D], n the number of image tokens."""
    mask = input_ids == image_token_id
    k = jnp.clip(jnp.cumsum(mask.reshape(-1)) - 1, 0, features.shape[0] - 1).reshape(mask.shape)
    return mask, jnp.where(mask[..., None], features[k], 0)


def splice(x, input_ids, features, image_token_id: int):
    """x [B, T, D] with the image-token positions replaced by features (`placed_features`)."""
    mask, values = placed_features(input_ids, features, image_token_id)
    return jnp.where(mask[..., None], values.astype(x.dtype), x)


def image_features(cfg: Config, params, pixel_values):
    """[tiles, S, S, 3] -> [tiles * tokens_per_tile, D]: what fills the <|patch|> positions."""
    feats = VisionTower(cfg).apply({"params": {k: params[k] for k in VISION_KEYS}}, pixel_values)
    return feats.reshape(-1, feats.shape[-1])


def check_pixel_values(cfg: Config, pixel_values) -> None:
    if cfg.vision is None:
        raise ValueError("pixel_values were given but this model has no vision tower "
                         "(cfg.vision is None: a text-only checkpoint)")
    v = cfg.vision
    check_config(v)
    want = (v.image_size, v.image_size, v.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
        raise ValueError(f"pixel_values must be channel-last tiles [tiles, {want[0]}, {want[1]}, "
                         f"{want[2]}], got shape {tuple(pixel_values.shape)}")
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values holds no tiles (shape[0] == 0); pass None for text only")


def count_image_tokens(cfg: Config, input_ids) -> int | None:
    """How many <|patch|> tokens input_ids hold; None when they are traced (not known yet)."""
    if isinstance(input_ids, jax.core.Tracer):
        return None
    return int(np.sum(np.asarray(input_ids) == cfg.image_token_id))


def check_image_tokens(cfg: Config, input_ids, pixel_values) -> None:
    """One clear error when the <|patch|> tokens and the tiles cannot pair up."""
    n_tok = count_image_tokens(cfg, input_ids)
    if n_tok is None:
        return  # under someone else's jit: the splice then takes features in order, unchecked
    tag = f"<|patch|> (id {cfg.image_token_id})"
    if pixel_values is None:
        if n_tok and cfg.vision is not None:
            raise ValueError(f"input_ids hold {n_tok} image tokens {tag} but no pixel_values were "
                             "given")
        return
    per_tile = tokens_per_tile(cfg.vision)
    n_feat = pixel_values.shape[0] * per_tile
    if n_tok == 0:
        raise ValueError(f"pixel_values were given ({pixel_values.shape[0]} tiles, {n_feat} "
                         f"features) but input_ids hold no image tokens {tag}")
    if n_tok != n_feat:
        raise ValueError(f"image tokens and image features do not match: input_ids hold {n_tok} "
                         f"image tokens {tag}, pixel_values give {n_feat} features "
                         f"({pixel_values.shape[0]} tiles x {per_tile})")
