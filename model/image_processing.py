"""Llama 4 image preprocessing and the prompt layout of an image's tokens
(docs/architecture.md, "Vision").

From a PIL image to `pixel_values` [tiles, 336, 336, 3] (channel-last, float32) and the token ids
that stand for it; HF's `Llama4ImageProcessor` + `Llama4Processor._prompt_split_image`, Meta's
`VariableSizeImageTransform` + `_encode_image`:

1. Canvas: among every (a*336, b*336) with a*b <= max_tiles, scale = min(canvas_h/H, canvas_w/W);
   take the smallest scale >= 1 if any, else the largest below 1; ties go to the smallest area
   (then to the first canvas in HF's candidate order). Scales are compared in float32, like HF.
2. Resize without distortion (Pillow, bilinear) to fit (min(max(H, 336), canvas_h),
   min(max(W, 336), canvas_w)): a small image is upscaled at most until its sides reach 336.
3. Pad bottom/right with black, split into 336-pixel tiles row-major; when there is more than one
   tile, append a global tile: the whole image resized to 336x336, with distortion.
4. Normalise: (x/255 - 0.5) / 0.5, in float32 (HF does this step in bfloat16; the difference is
   bfloat16 rounding, < 0.4% of a pixel).

Colour modes: 8-bit images of any mode are converted to RGB; modes with transparency (RGBA, LA,
PA, P with a transparent colour) are composited onto white first, as HF's `convert_to_rgb` does.
Images of more than 8 bits per sample (I, I;16, F) are refused rather than silently clipped, and so
is an image with no pixels.

Callers pass the token ids of their text around the image. The image's own special ids (start,
end, tile separators, <|image|>, <|patch|>) all come from one place: the checkpoint's tokenizer
(`ImageTokens.from_tokenizer`), or Llama 4's published ids where the checkpoint uses those.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageMode

from .config import Config
from .tokenizer import SPECIAL
from .vision import tokens_per_tile as _tokens_per_tile

TILE = 336
MAX_TILES = 16


@dataclass(frozen=True)
class ImageTokens:
    """Special token ids of the image layout; the defaults are Llama 4's published tokenizer's
    (docs/architecture.md, "Tokenizer and chat format")."""
    image_start: int = 200080   # <|image_start|>
    image_end: int = 200081     # <|image_end|>
    tile_x: int = 200084        # <|tile_x_separator|>: between the tiles of a row
    tile_y: int = 200085        # <|tile_y_separator|>: after each row
    image: int = 200090         # <|image|>: before the global tile (or the only tile)
    patch: int = 200092         # <|patch|>: replaced by one image feature each

    # field -> the tokenizer's name of the token (model.tokenizer.SPECIAL)
    NAMES = {"image_start": "image_start", "image_end": "image_end", "tile_x": "tile_x_separator",
             "tile_y": "tile_y_separator", "image": "image", "patch": "patch"}

    @classmethod
    def from_tokenizer(cls, tok) -> "ImageTokens":
        """All six ids from a `model.tokenizer.Tokenizer`; ValueError naming any it lacks."""
        missing = [SPECIAL[n] for n in cls.NAMES.values() if n not in tok.special]
        if missing:
            raise ValueError(f"the tokenizer has no {', '.join(missing)} token(s), which an "
                             "image's layout needs")
        return cls(**{field: tok.special[name] for field, name in cls.NAMES.items()})


# --------------------------------------------------------------------------------------------
# The canvas rule.

def supported_canvases(max_tiles: int = MAX_TILES, tile: int = TILE) -> list[tuple[int, int]]:
    """Every (a*tile, b*tile) with a*b <= max_tiles, in HF's order (grouped by aspect ratio in
    order of first appearance, counting down from max_tiles): the order decides exact ties."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for n in range(max_tiles, 0, -1):
        for a in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio[a / (n // a)].append((a, n // a))
    return [(a * tile, b * tile) for group in by_ratio.values() for a, b in group]


def best_canvas(height: int, width: int, max_tiles: int = MAX_TILES,
                tile: int = TILE) -> tuple[int, int]:
    """(canvas_h, canvas_w) for an image of height x width: the rule of the module docstring."""
    canvases = np.array(supported_canvases(max_tiles, tile))
    c = canvases.astype(np.float32)
    scales = np.minimum(c[:, 0] / np.float32(height), c[:, 1] / np.float32(width))
    up = scales[scales >= 1]
    chosen = up.min() if up.size else scales.max()
    candidates = canvases[scales == chosen]
    h, w = candidates[np.argmin(candidates[:, 0] * candidates[:, 1])]
    return int(h), int(w)


def fit_without_distortion(height: int, width: int, target_h: int,
                           target_w: int) -> tuple[int, int]:
    """The largest (h, w) with the image's aspect ratio inside target_h x target_w (HF's
    get_max_res_without_distortion: the limiting side is exact, the other rounded down, >= 1)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        h, w = min(int(height * scale_w), target_h), target_w
    else:
        h, w = target_h, min(int(width * scale_h), target_w)
    return max(h, 1), max(w, 1)


def resized_size(height: int, width: int, canvas: tuple[int, int],
                 tile: int = TILE) -> tuple[int, int]:
    """Size the image is resized to before padding to `canvas`: upscaling stops at `tile`."""
    target = (min(max(height, tile), canvas[0]), min(max(width, tile), canvas[1]))
    return fit_without_distortion(height, width, *target)


# --------------------------------------------------------------------------------------------
# Pixels.

def to_rgb(image) -> Image.Image:
    """An 8-bit RGB copy of a PIL image; ValueError for anything else (see the module docstring)."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"the image is empty ({image.width}x{image.height} pixels)")
    if ImageMode.getmode(image.mode).typestr not in ("|u1", "|b1"):
        raise ValueError(f"image mode {image.mode!r} has more than 8 bits per sample; convert it "
                         "to 8-bit RGB first (mapping its range onto 0..255 is the caller's call)")
    if image.mode == "RGB":
        return image
    try:
        if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert an image of mode {image.mode!r} to RGB: {e}") from None


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1]: (x/255 - 0.5) / 0.5."""
    return (pixels.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


def preprocess(image, max_tiles: int = MAX_TILES,
               tile: int = TILE) -> tuple[np.ndarray, tuple[int, int]]:
    """PIL image -> (pixel_values [tiles, tile, tile, 3] float32, (rows, cols) of tiles).

    tiles = rows*cols, plus one global tile when rows*cols > 1."""
    img = to_rgb(image)
    W, H = img.size
    canvas = best_canvas(H, W, max_tiles, tile)
    h, w = resized_size(H, W, canvas, tile)
    resized = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR))
    padded = np.zeros((*canvas, 3), np.uint8)
    padded[:h, :w] = resized
    rows, cols = canvas[0] // tile, canvas[1] // tile
    tiles = padded.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4)
    tiles = tiles.reshape(rows * cols, tile, tile, 3)
    if rows * cols > 1:
        whole = np.asarray(img.resize((tile, tile), Image.Resampling.BILINEAR))
        tiles = np.concatenate([tiles, whole[None]], axis=0)
    return normalize(tiles), (rows, cols)


# --------------------------------------------------------------------------------------------
# Tokens.

def image_token_ids(aspect_ratio: tuple[int, int], tokens_per_tile: int = 144,
                    tokens: ImageTokens = ImageTokens()) -> list[int]:
    """The token ids standing for one image of rows x cols tiles.

    1 tile:   <|image_start|> <|image|> <|patch|>*n <|image_end|>
    r x c:    <|image_start|> then per row: (<|patch|>*n joined by <|tile_x_separator|>)
              <|tile_y_separator|>; then the global tile <|image|> <|patch|>*n; <|image_end|>"""
    rows, cols = aspect_ratio
    patches = [tokens.patch] * tokens_per_tile
    ids = [tokens.image_start]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                ids += patches
                if x < cols - 1:
                    ids.append(tokens.tile_x)
            ids.append(tokens.tile_y)
    return ids + [tokens.image] + patches + [tokens.image_end]


def build_inputs(parts: Sequence, cfg: Config | None = None, max_tiles: int = MAX_TILES,
                 tokens: ImageTokens | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Interleaved text token ids and images -> (input_ids [T] int32, pixel_values or None).

    `parts` holds lists of token ids and PIL images in prompt order, e.g.
    `[ids_before, image, ids_after]` or several images. The tiles of all images are stacked in
    order, which is the order `model.forward` consumes them in. With `cfg`, the tile size and the
    tokens per tile come from the checkpoint's config; without it, Llama 4's.
    The special ids all come from `tokens` (`ImageTokens.from_tokenizer(tok)`), else Llama 4's
    published ones, which must then be the checkpoint's: a config holds only three of the six
    (<|patch|>, start and end), so a checkpoint with other ids needs its tokenizer's.
    For a batch, stack the rows' input_ids (padded) and concatenate their pixel_values in row
    order."""
    tile, per_tile = TILE, 144
    if cfg is not None:
        if cfg.vision is None:
            raise ValueError("this config has no vision tower; it cannot take images")
        tile, per_tile = cfg.vision.image_size, _tokens_per_tile(cfg.vision)
        _check_tokens(cfg, tokens)
    tokens = tokens or ImageTokens()
    ids: list[int] = []
    pixels: list[np.ndarray] = []
    for i, part in enumerate(parts):
        if isinstance(part, Image.Image):
            px, ratio = preprocess(part, max_tiles, tile)
            pixels.append(px)
            ids += image_token_ids(ratio, per_tile, tokens)
        elif isinstance(part, (list, tuple, np.ndarray)):
            ids += [int(t) for t in np.asarray(part).reshape(-1)]
        else:
            raise ValueError(f"parts[{i}] is a {type(part).__name__}; expected a list of token ids "
                             "or a PIL image (tokenize text first)")
    return (np.asarray(ids, np.int32),
            np.concatenate(pixels, axis=0) if pixels else None)


def _check_tokens(cfg: Config, tokens: ImageTokens | None):
    """Given tokens place features where the model looks for them (<|patch|>, the config's
    image_token_id); without them, the config's three ids must be Llama 4's, which stand for
    the six."""
    if tokens is not None:
        if tokens.patch != cfg.image_token_id:
            raise ValueError(f"tokens.patch {tokens.patch} is not the checkpoint's <|patch|> "
                             f"(image_token_id {cfg.image_token_id})")
        return
    t = ImageTokens()
    differ = [f"{name} {theirs} (Llama 4's: {ours})" for name, ours, theirs in (
        ("<|patch|>", t.patch, cfg.image_token_id), ("<|image_start|>", t.image_start,
                                                     cfg.boi_token_id),
        ("<|image_end|>", t.image_end, cfg.eoi_token_id)) if ours != theirs]
    if differ:
        raise ValueError(f"the checkpoint's image ids are not Llama 4's ({', '.join(differ)}), "
                         "and its config lacks the other three (tile separators, <|image|>): "
                         "pass tokens=ImageTokens.from_tokenizer(tok), all six from its tokenizer")


def encode_prompt(before: Sequence[int], image, after: Sequence[int], cfg: Config | None = None,
                  max_tiles: int = MAX_TILES, tokens: ImageTokens | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """input_ids [1, T] and pixel_values [tiles, S, S, 3] for `before` + image + `after`."""
    ids, pixels = build_inputs([before, image, after], cfg, max_tiles, tokens)
    return ids[None], pixels
