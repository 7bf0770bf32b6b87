"""Vision tower and early fusion: parity with HF Llama 4 per module and end to end; bad input.

A tiny random `Llama4ForConditionalGeneration` (32-pixel tiles of 4-pixel patches: 64 patches,
16 features per tile) goes through `save_pretrained` + `checkpoints.load`, as a real one would.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import model
from model import config as C
from model import image_processing as IP
from model import multimodal as MM
from model import vision as V
from model.rope import rotate_by_angles, vision_angles
from tests.hf_models import VISION, multimodal_config, text

SPECIAL = dict(image_token_index=5, boi_token_index=3, eoi_token_index=4)
PATCH = SPECIAL["image_token_index"]
# The tiny vocabulary has no room for Llama 4's ids: ids 0-5 stand in for them.
TOKENS = IP.ImageTokens(image_start=3, image_end=4, tile_x=0, tile_y=1, image=2, patch=PATCH)


@pytest.fixture(scope="module")
def hf_and_ours():
    from experiments.hf_reference import hf_multimodal_model, params_from_hf
    torch.manual_seed(0)
    hf = hf_multimodal_model(VISION, text(), seed=0, **SPECIAL)
    cfg, params = params_from_hf(hf)
    return hf, cfg, params


def _tiles(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


def _nchw(x):
    return torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)


def _rel(ours, ref):
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _close(ours, ref):  # simple modules: 1e-5
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


def _layer0(params):
    return jax.tree.map(lambda a: a[0], params["vision"]["layers"])


# ---------------------------------------------------------------------------------------------
# Per module.

def test_patch_embedding(hf_and_ours):
    hf, cfg, params = hf_and_ours
    x = _tiles(2)
    with torch.no_grad():
        ref = hf.vision_model.patch_embedding(_nchw(x)).numpy()
    ours = V.PatchEmbed(cfg).apply({"params": params["vision"]["patch_embed"]}, x)
    _close(ours, ref)


def test_2d_rope_angles_and_rotation(hf_and_ours):
    from transformers.models.llama4 import modeling_llama4 as M
    hf, cfg, _ = hf_and_ours
    v = cfg.vision
    side, H = v.image_size // v.patch_size, v.hidden_size // v.num_heads
    freqs = hf.vision_model.rotary_embedding.freqs_ci  # [P+1, 1, H/2] complex
    angles = vision_angles(side, H, v.rope_theta)
    np.testing.assert_allclose(np.cos(angles), freqs[:, 0].real.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.sin(angles), freqs[:, 0].imag.numpy(), atol=1e-6)
    assert np.all(angles[-1] == 0)  # the class token is not rotated
    # patch 1 sits at column 1, row 0: x-pairs turn by 2*theta_k, y-pairs by 1*theta_k (1-based)
    np.testing.assert_allclose(angles[1, H // 4:], angles[0, H // 4:])
    np.testing.assert_allclose(angles[1, :H // 4], 2 * angles[0, :H // 4], rtol=1e-6)
    r = np.random.default_rng(1)
    q, k = (r.normal(size=(2, side * side + 1, v.num_heads, H)).astype(np.float32) for _ in "qk")
    ref_q, ref_k = M.vision_apply_rotary_emb(torch.tensor(q), torch.tensor(k), freqs)
    _close(rotate_by_angles(jnp.asarray(q), jnp.asarray(angles)), ref_q.numpy())
    _close(rotate_by_angles(jnp.asarray(k), jnp.asarray(angles)), ref_k.numpy())


def test_one_encoder_block(hf_and_ours):
    hf, cfg, params = hf_and_ours
    v = cfg.vision
    T = (v.image_size // v.patch_size) ** 2 + 1
    x = np.random.default_rng(2).normal(size=(3, T, v.hidden_size)).astype(np.float32)
    with torch.no_grad():
        freqs = hf.vision_model.rotary_embedding.freqs_ci
        ref = hf.vision_model.model.layers[0](torch.tensor(x), freqs_ci=freqs)[0]
    angles = jnp.asarray(vision_angles(v.image_size // v.patch_size, v.hidden_size // v.num_heads,
                                       v.rope_theta))
    ours, _ = V.VisionLayer(cfg).apply({"params": _layer0(params)}, x, angles)
    _close(ours, ref.numpy())


def test_pixel_shuffle():
    from transformers.models.llama4 import modeling_llama4 as M
    x = np.random.default_rng(3).normal(size=(2, 64, 12)).astype(np.float32)
    ref = M.pixel_shuffle(torch.tensor(x), 0.5).numpy()
    ours = np.asarray(V.pixel_shuffle(jnp.asarray(x), 2))
    assert ours.shape == (2, 16, 48)
    np.testing.assert_array_equal(ours, ref)  # a permutation: exact
    # docs/architecture.md, section 4: token (i, j) = patches (2i, 2j), (2i, 2j+1), (2i+1, 2j),
    # (2i+1, 2j+1)
    grid = x.reshape(2, 8, 8, 12)
    i, j = 1, 2
    want = [grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j],
            grid[:, 2 * i + 1, 2 * j + 1]]
    np.testing.assert_array_equal(ours[:, 4 * i + j], np.concatenate(want, -1))


def test_adapter(hf_and_ours):
    hf, cfg, params = hf_and_ours
    x = np.random.default_rng(4).normal(size=(2, 16, 128)).astype(np.float32)
    with torch.no_grad():
        ref = hf.vision_model.vision_adapter.mlp(torch.tensor(x)).numpy()
    _close(V.Adapter(cfg).apply({"params": params["vision"]["adapter"]}, x), ref)


# ---------------------------------------------------------------------------------------------
# Whole models.

def test_vision_model_matches_hf(hf_and_ours):
    hf, cfg, params = hf_and_ours
    x = _tiles(3, seed=5)
    with torch.no_grad():
        ref = hf.vision_model(_nchw(x)).last_hidden_state.numpy()
    ours = V.VisionEncoder(cfg).apply({"params": params["vision"]}, x)
    assert ours.shape == ref.shape == (3, 16, 48)
    assert _rel(ours, ref) < 1e-4


def _hf_logits(hf, ids, pixel_values):
    """Llama4ForConditionalGeneration.forward from its parts (its own forward fails in 5.24 while
    building the output object): vision tower, projector, masked_scatter, language model."""
    with torch.no_grad():
        ids = torch.tensor(ids)
        embeds = hf.get_input_embeddings()(ids)
        feats = hf.get_image_features(pixel_values=_nchw(pixel_values),
                                      return_dict=True).last_hidden_state
        feats = hf.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
        embeds = embeds.masked_scatter((ids == hf.config.image_token_index)[..., None], feats)
        return hf.language_model(inputs_embeds=embeds).logits.numpy()


def _rgb(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def test_multimodal_logits_match_hf(hf_and_ours):
    """Two rows, three images: row 0 a 1x2-tile image (+ global) and a 1-tile image, row 1 one
    1-tile image; ids and pixels from image_processing on the tiny config's 32-pixel tiles."""
    hf, cfg, params = hf_and_ours
    r = np.random.default_rng(6)
    text = lambda n: list(r.integers(6, 128, n))  # noqa: E731  (ids 0-5 are special here)
    ids0, px0 = IP.build_inputs([text(3), _rgb(30, 60, 0), text(2), _rgb(20, 20, 1), text(4)], cfg,
                                 tokens=TOKENS)
    ids1, px1 = IP.build_inputs([text(5), _rgb(28, 24, 2), text(3)], cfg, tokens=TOKENS)
    assert len(px0) == 4 and len(px1) == 1  # (2 tiles + global) + 1; 1
    T = max(len(ids0), len(ids1))
    ids = np.stack([np.pad(i, (0, T - len(i)), constant_values=0) for i in (ids0, ids1)])
    pixel_values = np.concatenate([px0, px1])
    ref = _hf_logits(hf, ids, pixel_values)
    ours = model.forward(cfg, params, ids, pixel_values)
    assert ours.shape == ref.shape
    assert _rel(ours, ref) < 1e-4
    # Row 1 alone, with its own tile only, gives the same logits: features go in row-major order.
    alone = model.forward(cfg, params, ids[1:], px1)
    np.testing.assert_allclose(alone, ours[1:], rtol=1e-5, atol=1e-5)


def test_splice_fills_image_positions_in_row_major_order():
    x = jnp.zeros((2, 5, 3))
    ids = jnp.array([[9, 7, 9, 9, 1], [7, 9, 1, 1, 1]])
    feats = jnp.arange(4 * 3, dtype=jnp.float32).reshape(4, 3) + 1
    out = MM.splice(x, ids, feats, image_token_id=9)
    np.testing.assert_array_equal(out[0, [0, 2, 3]], feats[:3])
    np.testing.assert_array_equal(out[1, 1], feats[3])
    assert float(jnp.abs(out[0, [1, 4]]).sum() + jnp.abs(out[1, [0, 2, 3, 4]]).sum()) == 0


# ---------------------------------------------------------------------------------------------
# Parameter tree, presets, bad input (no HF model needed).

def tiny_vision_cfg():
    return multimodal_config(image_token_id=PATCH).replace(boi_token_id=3, eoi_token_id=4)


def test_scout_total_with_vision_tower():
    shapes = model.param_shapes(C.SCOUT)  # abstract
    count = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))  # noqa: E731
    vision = count({k: shapes[k] for k in MM.VISION_KEYS})
    assert count(shapes) - vision == C.param_count(C.SCOUT)["text"]
    # docs/architecture.md, section 6: the whole checkpoint's total
    assert abs(count(shapes) / 109.68e9 - 1) < 0.01
    assert shapes["vision"]["layers"]["attn"]["q"].shape == (34, 1408, 16, 88)
    assert shapes["vision"]["adapter"]["fc1"].shape == (5632, 4096)
    assert shapes["projector"]["kernel"].shape == (4096, 5120)
    axes = model.param_axes(C.SCOUT)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    for spec, leaf in zip(jax.tree.leaves(axes["vision"], is_leaf=is_spec),
                          jax.tree.leaves(shapes["vision"])):
        assert len(spec) == len(leaf.shape) and all(a is not None for a in spec)


def _ids(n_image_tokens, T=40):
    ids = np.full((1, T), 7)
    ids[0, 2:2 + n_image_tokens] = PATCH
    return ids


def test_text_only_forward_of_a_vision_model(hf_and_ours):
    hf, cfg, params = hf_and_ours
    ids = np.full((1, 5), 7)
    with torch.no_grad():
        ref = hf.language_model(torch.tensor(ids)).logits.numpy()
    assert _rel(model.forward(cfg, params, ids), ref) < 1e-4


@pytest.mark.parametrize("shape", [(2, 28, 28, 3), (2, 32, 32, 1), (32, 32, 3), (2, 3, 32, 32)])
def test_tile_of_the_wrong_size(hf_and_ours, shape):
    _, cfg, params = hf_and_ours
    with pytest.raises(ValueError, match=r"must be channel-last tiles \[tiles, 32, 32, 3\]"):
        model.forward(cfg, params, _ids(32), np.zeros(shape, np.float32))


def test_pixel_values_without_image_tokens(hf_and_ours):
    _, cfg, params = hf_and_ours
    with pytest.raises(ValueError, match="no image tokens"):
        model.forward(cfg, params, _ids(0), _tiles(2))


def test_image_token_count_does_not_match_features(hf_and_ours):
    _, cfg, params = hf_and_ours
    with pytest.raises(ValueError, match=r"input_ids hold 20 image tokens .* give 32 features"):
        model.forward(cfg, params, _ids(20), _tiles(2))


def test_image_tokens_without_pixel_values(hf_and_ours):
    _, cfg, params = hf_and_ours
    with pytest.raises(ValueError, match="16 image tokens .* but no pixel_values"):
        model.forward(cfg, params, _ids(16))


def test_pixel_values_for_a_text_only_model(hf_and_ours):
    _, cfg, params = hf_and_ours
    cfg = cfg.replace(vision=None)
    with pytest.raises(ValueError, match="no vision tower"):
        model.forward(cfg, params, _ids(16), _tiles(1))


def test_unrunnable_vision_config():
    v = tiny_vision_cfg().vision
    with pytest.raises(C.ConfigError, match="vision_output_dim"):
        V.check_config(C.VisionConfig(**{**v.__dict__, "vision_output_dim": 64}))
    with pytest.raises(C.ConfigError, match="multiple of 4"):
        V.check_config(C.VisionConfig(**{**v.__dict__, "hidden_size": 24, "num_heads": 4}))


@pytest.mark.slow
def test_generation_with_images(hf_and_ours):
    """Prefill splices the image features (its last logits equal the full forward's), and a
    ragged batch with images decodes like each row alone."""
    from model import sampling
    _, cfg, params = hf_and_ours
    r = np.random.default_rng(8)
    text = lambda n: list(r.integers(6, 128, n))  # noqa: E731
    ids0, px0 = IP.build_inputs([text(3), _rgb(30, 60, 0), text(2)], cfg, tokens=TOKENS)
    ids1, px1 = IP.build_inputs([text(5), _rgb(28, 24, 2), text(9)], cfg, tokens=TOKENS)
    rows, pixel_values = [ids0.tolist(), ids1.tolist()], np.concatenate([px0, px1])
    _, state = sampling.prefill(cfg, params, rows, max_new_tokens=4, pixel_values=pixel_values,
                                prefill_chunk=16)  # several pieces: features cross piece borders
    for b, (ids, px) in enumerate([(ids0, px0), (ids1, px1)]):
        full = model.forward(cfg, params, ids[None], px)[0, -1]
        np.testing.assert_allclose(state[0][b], full, rtol=1e-4, atol=1e-4 * np.abs(full).max())
    batch = model.generate(cfg, params, rows, pixel_values=pixel_values, max_new_tokens=6,
                           stop_tokens=[])
    T = max(map(len, rows))
    for b, (ids, px) in enumerate([(ids0, px0), (ids1, px1)]):
        alone = model.generate(cfg, params, [ids.tolist()], pixel_values=px, max_new_tokens=6,
                               stop_tokens=[])[0]
        assert batch[b, T - len(ids):].tolist() == alone.tolist()
    with pytest.raises(ValueError, match="image tokens"):
        model.generate(cfg, params, rows, max_new_tokens=2)  # image tokens but no pixels
