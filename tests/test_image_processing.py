"""Llama 4 image tiling: the canvas rule on hand-worked cases, pixels, the token layout, bad input.

HF's Llama4ImageProcessor needs torchvision (not installed here), so the cases are worked by hand
from the rule (docs/architecture.md, "Image processor") and cross-checked against an
exact-fraction statement of it.
"""
import random
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from model import image_processing as IP

T = IP.ImageTokens()
P = T.patch


@pytest.mark.parametrize("hw, canvas, resized", [
    # wide: scale min(336a/200, 336b/1000) reaches 1 first at b = 3 (1.008); (1, 3) is the smallest
    # such canvas; the width 1000 fits in 1008, so no resize at all (upscaling is capped at 336).
    ((200, 1000), (336, 1008), (200, 1000)),
    ((1000, 200), (1008, 336), (1000, 200)),        # tall: the transpose
    # tiny: every canvas upscales; the smallest scale is 4.2 (336/80) on (1, 1) and every (a, 1);
    # the smallest area wins; fit into 336x336: width 336, height floor(50 * 4.2) = 210.
    ((50, 80), (336, 336), (210, 336)),
    ((100, 150), (336, 336), (224, 336)),           # upscaled 2.24x to reach 336 on its long side
    # small but wide: (1, 2) scales by 1.68 (height-limited 3.36); the cap (max(H, 336) = 336,
    # max(W, 336) = 400) lets it fit unscaled.
    ((100, 400), (336, 672), (100, 400)),
    # huge: nothing upscales; the largest scale is 0.252 on (3, 5) (0.084 * 3 vs 0.056 * 5);
    # height-limited: 1008 x floor(6000 * 0.252) = 1512.
    ((4000, 6000), (1008, 1680), (1008, 1512)),
    ((672, 1008), (672, 1008), (672, 1008)),         # exact multiples: scale 1 on (2, 3)
    ((336, 336), (336, 336), (336, 336)),
    ((1344, 1344), (1344, 1344), (1344, 1344)),      # 4 x 4 = 16 tiles, the most allowed
    ((336, 6000), (336, 5376), (301, 5376)),         # wider than 16 tiles: 1 x 16, shrunk to fit
])
def test_canvas_and_resize_hand_worked(hw, canvas, resized):
    assert IP.best_canvas(*hw) == canvas
    assert IP.resized_size(*hw, canvas) == resized


def test_canvas_rule_against_exact_fractions():
    canvases = IP.supported_canvases()
    assert len(canvases) == len(set(canvases)) == sum(
        1 for a in range(1, 17) for b in range(1, 17) if a * b <= 16)

    def exact(H, W):
        scales = [min(Fraction(h, H), Fraction(w, W)) for h, w in canvases]
        up = [s for s in scales if s >= 1]
        best = min(up) if up else max(scales)
        return min((c for c, s in zip(canvases, scales) if s == best), key=lambda c: c[0] * c[1])

    r = random.Random(0)
    for _ in range(300):
        H, W = r.randint(1, 8000), r.randint(1, 8000)
        assert IP.best_canvas(H, W) == exact(H, W), (H, W)


def test_max_tiles_and_tile_size_are_parameters():
    assert IP.best_canvas(200, 1000, max_tiles=2) == (336, 672)
    assert IP.best_canvas(30, 60, tile=32) == (32, 64)


def _img(h, w, mode="RGB", seed=0):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
    return Image.fromarray(a).convert(mode)


def test_preprocess_one_tile_no_global():
    img = _img(336, 336)
    px, ratio = IP.preprocess(img)
    assert ratio == (1, 1) and px.shape == (1, 336, 336, 3) and px.dtype == np.float32
    np.testing.assert_allclose(px[0], np.asarray(img) / 255 * 2 - 1, atol=1e-6)


def test_preprocess_tiles_row_major_padding_and_global_tile():
    # scale min(0.672a, 0.48b) first reaches 1 at (2, 3) (1.344); the cap max(H, 336) x max(W, 336)
    # keeps the image at 500 x 700, padded to 672 x 1008.
    img = _img(500, 700, seed=1)
    px, ratio = IP.preprocess(img)
    assert ratio == (2, 3) and px.shape == (7, 336, 336, 3)
    canvas = np.zeros((672, 1008, 3), np.uint8)
    canvas[:500, :700] = np.asarray(img)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(px[3 * i + j], IP.normalize(canvas[336 * i:336 * (i + 1),
                                                                          336 * j:336 * (j + 1)]))
    # padding is black: -1 after normalisation
    assert np.all(px[5, :, 700 - 672:] == -1) and np.all(px[5, 500 - 336:] == -1)
    assert not np.all(px[5, :500 - 336, :700 - 672] == -1)
    glob = np.asarray(img.resize((336, 336), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(px[6], IP.normalize(glob))


def test_token_layout_one_tile():
    ids = IP.image_token_ids((1, 1))
    assert ids == [T.image_start, T.image] + [P] * 144 + [T.image_end]


def test_token_layout_two_by_two():
    ids = IP.image_token_ids((2, 2))
    row = [P] * 144 + [T.tile_x] + [P] * 144 + [T.tile_y]
    assert ids == [T.image_start] + row + row + [T.image] + [P] * 144 + [T.image_end]
    assert ids.count(P) == 5 * 144  # 4 tiles + the global tile, one feature each


def test_build_inputs_pairs_tokens_with_tiles():
    ids, px = IP.build_inputs([[1, 2], _img(500, 700), [3], _img(100, 100), [4, 5]])
    assert px.shape == (7 + 1, 336, 336, 3)
    assert int((ids == P).sum()) == 144 * len(px)
    assert ids[:3].tolist() == [1, 2, T.image_start] and ids[-2:].tolist() == [4, 5]
    ids1, px1 = IP.encode_prompt([1], _img(40, 40), [2])
    assert ids1.shape == (1, 1 + 147 + 1) and px1.shape == (1, 336, 336, 3)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1"])
def test_8bit_modes_convert_to_rgb(mode):
    px, _ = IP.preprocess(_img(20, 30, mode))
    assert px.shape == (1, 336, 336, 3)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    assert IP.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (10, 10), (0, 128))
    assert IP.to_rgb(la).getpixel((0, 0)) == (127, 127, 127)


@pytest.mark.parametrize("image, message", [
    (Image.new("RGB", (0, 10)), r"empty \(0x10 pixels\)"),
    (Image.new("RGB", (10, 0)), r"empty \(10x0 pixels\)"),
    (Image.new("I;16", (10, 10)), "mode 'I;16' has more than 8 bits"),
    (Image.new("F", (10, 10)), "mode 'F' has more than 8 bits"),
    (np.zeros((10, 10, 3), np.uint8), "expected a PIL.Image.Image, got ndarray"),
])
def test_bad_images(image, message):
    with pytest.raises(ValueError, match=message):
        IP.preprocess(image)


def test_text_must_be_token_ids():
    with pytest.raises(ValueError, match=r"parts\[0\] is a str"):
        IP.build_inputs(["hello", _img(10, 10)])


def test_the_readme_spelling_works_in_a_fresh_process():
    """`import model` is enough for model.image_processing and model.tokenizer (the README's
    image and text snippets): nothing else imported them first."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import model; print(model.image_processing.build_inputs.__name__, "
            "model.tokenizer.Tokenizer.__name__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1],
                         env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0 and run.stdout.split() == ["build_inputs", "Tokenizer"], run.stderr


def test_image_ids_come_from_one_place():
    """A checkpoint whose image ids are not Llama 4's: without its tokenizer's ids, an error (the
    config holds three of the six, and the other three would be Llama 4's, outside a small
    vocabulary); with them, every id of the layout is the tokenizer's."""
    from experiments.tiny_checkpoint import train_tokenizer
    from model.tokenizer import Tokenizer
    from tests.hf_models import multimodal_config
    tok = Tokenizer(train_tokenizer(["def f(x):\n    return x\n"] * 5, 300))
    cfg = multimodal_config(image_token_id=tok.special["patch"]).replace(
        boi_token_id=tok.special["image_start"], eoi_token_id=tok.special["image_end"])
    image = _img(70, 40)  # several tiles of 32 pixels (so separators), and the global tile
    with pytest.raises(ValueError, match=r"image ids are not Llama 4's \(<\|patch\|> "
                                         f"{tok.special['patch']} \\(Llama 4's: 200092\\)"):
        IP.build_inputs([[1], image, [2]], cfg)
    tokens = IP.ImageTokens.from_tokenizer(tok)
    ids, px = IP.build_inputs([[1], image, [2]], cfg, tokens=tokens)
    layout = set(ids.tolist()) - {1, 2}
    assert layout == {tok.special[n] for n in ("image_start", "image_end", "tile_x_separator",
                                               "tile_y_separator", "image", "patch")}
    assert max(ids) < tok.vocab_size
    assert int((ids == tok.special["patch"]).sum()) == 16 * len(px)  # 16 features per tile
    with pytest.raises(ValueError, match="tokens.patch 7 is not the checkpoint's <\\|patch\\|>"):
        IP.build_inputs([[1], image], cfg, tokens=IP.ImageTokens(patch=7))


def test_a_tokenizer_without_the_image_tokens():
    from model.tokenizer import Tokenizer
    from training import byte_tokenizer  # bytes and the chat tokens only
    with pytest.raises(ValueError, match=r"the tokenizer has no <\|image_start\|>, "
                                         r"<\|image_end\|>, <\|tile_x_separator\|>, "
                                         r"<\|tile_y_separator\|>, <\|image\|>, <\|patch\|> "
                                         r"token\(s\), which an image's layout needs"):
        IP.ImageTokens.from_tokenizer(Tokenizer(byte_tokenizer().tk))
