"""Generation: prefill the prompt in pieces, then decode inside one jitted loop.

Prompts of different lengths are left-padded; each row's positions start at 0 at its first real
token (padding has negative positions and is never attended), so a row decodes exactly as it
would alone. The loop is a `lax.while_loop`: no Python round trip per token, and it ends early
once every row has emitted a stop token.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import inputs, kv_cache, multimodal
from .config import Config
from .decoder import Decoder
from .layers import place_on_mesh, sharding_plan
from .split import for_inference

BUCKET = 32


@functools.partial(jax.jit, static_argnames=("cfg", "plan", "fresh", "layout", "last_only"),
                   donate_argnames=("cache",))
def extend(cfg: Config, params, ids, positions, cache, plan=None, image=None, fresh=False,
           layout="stacked", last_only=False):
    """Run tokens ids [B, T] at positions [B, T] through the model, appending to the cache.
    Returns (logits [B, T, V], or [B, 1, V] for the last position with `last_only`, cache).
    `plan`: a sharding.Plan, or None on one device.
    `image` = (mask [B, T], features [B, T, D]): embeddings replaced where mask is set.
    `fresh`: the cache is still empty (attention then skips its slots).
    `layout`: of the params and the cache (model/split.py); "stacked", as stored, or the
    params split by `split_params` and the cache by `kv_cache.split`."""
    embed_fn = None
    if image is not None:
        embed_fn = lambda x: jnp.where(image[0][..., None], image[1].astype(x.dtype), x)  # noqa: E731
    with sharding_plan(plan):
        decoder = Decoder(cfg, fresh_cache=fresh, layout=layout)
        return decoder.apply({"params": multimodal.decoder_params(params)}, ids, positions,
                             embed_fn=embed_fn, cache=cache, last_only=last_only)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _image_embeddings(cfg: Config, params, ids, pixel_values):
    """(mask [B, T], features [B, T, D]) for the <|patch|> positions of the whole prompt, so
    that each prefill piece can take its slice."""
    feats = multimodal.image_features(cfg, params, pixel_values)
    return multimodal.placed_features(ids, feats, cfg.image_token_id)


def sample(logits, key, temperature, top_k: int | None, top_p: float | None):
    """Next tokens [B] from logits [B, V]: greedy when temperature == 0."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        # Keep the smallest set of most likely tokens whose probability reaches top_p.
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        cutoff_index = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "temperature", "top_k", "top_p", "plan",
                                             "layout"),
                   donate_argnames=("state",))  # the cache is updated in place, not copied
def decode(cfg: Config, params, state, stop_tokens, pad_id, *, steps: int, temperature: float,
           top_k: int | None, top_p: float | None, plan=None, layout: str = "stacked"):
    """Sample up to `steps` tokens. state = (logits [B, V] of each row's last token, next
    positions [B], cache, done [B], key). Returns (tokens [B, steps] with pad_id after a row
    stops, new state) so that calls can be chained to stream. `layout`: as for `extend`."""
    B = state[0].shape[0]
    decoder = Decoder(cfg, layout=layout)
    params = multimodal.decoder_params(params)

    def cond(carry):
        i, _, (_, _, _, done, _) = carry
        return (i < steps) & ~jnp.all(done)

    def body(carry):
        i, out, (logits, pos, cache, done, key) = carry
        key, sub = jax.random.split(key)
        tok = jnp.where(done, pad_id, sample(logits, sub, temperature, top_k, top_p))
        out = out.at[:, i].set(tok)
        done = done | jnp.isin(tok, stop_tokens)
        with sharding_plan(plan):
            logits, cache = decoder.apply({"params": params}, tok[:, None], pos[:, None],
                                          cache=cache)
        return i + 1, out, (logits[:, -1], pos + 1, cache, done, key)

    out = jnp.full((B, steps), pad_id, jnp.int32)
    _, out, state = jax.lax.while_loop(cond, body, (0, out, state))
    return out, state


def _as_rows(input_ids) -> list[list[int]]:
    if isinstance(input_ids, (np.ndarray, jax.Array)):
        arr = np.asarray(input_ids)
        if arr.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length] or a list of token lists, "
                             f"got an array of shape {arr.shape}")
        return arr.tolist()
    return [list(map(int, row)) for row in input_ids]


def prefill(cfg: Config, params, input_ids: Sequence[Sequence[int]] | np.ndarray, *,
            max_new_tokens: int, seed: int | jax.Array = 0, prefill_chunk: int = 512, mesh=None,
            rules="combined", pixel_values=None):
    """Check and left-pad the prompts, run them through the model in pieces of `prefill_chunk`
    tokens, and return (prompts [B, T] left-padded, decode state). With a `mesh` the params,
    cache and state are placed on it (see sharding/); on one CPU device the state's cache is
    split by blocks (`kv_cache.split`). pixel_values [tiles, S, S, 3]: the tiles of every image
    of every row, in order (see `model.image_processing.build_inputs`)."""
    inputs.check_prompt(input_ids, pixel_values)
    t = cfg.text
    rows = _as_rows(input_ids)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("empty prompt: every row needs at least one token")
    for b, r in enumerate(rows):
        bad = [x for x in r if not 0 <= x < t.vocab_size]
        if bad:
            raise ValueError(f"prompt row {b}: token ids {bad[:5]} outside the vocabulary "
                             f"0..{t.vocab_size - 1}")
    T = max(len(r) for r in rows)
    if T + max_new_tokens > t.max_position_embeddings:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new ones exceeds the "
                         f"context of {t.max_position_embeddings} positions")
    # Left-pad to a whole number of prefill pieces, and round lengths up to multiples of
    # BUCKET, so that prompts of similar lengths share one compiled program.
    piece = min(prefill_chunk, _round_up(T, BUCKET))
    T_pad = _round_up(T, piece)
    ids = np.full((len(rows), T_pad), _pad_id(cfg), np.int32)
    positions = np.full((len(rows), T_pad), -1, np.int32)
    for b, r in enumerate(rows):
        ids[b, T_pad - len(r):] = r
        positions[b, T_pad - len(r):] = np.arange(len(r))
    plan, params = place_on_mesh(cfg, params, len(rows), mesh, rules)
    put = (lambda x, axes: x) if plan is None else plan.put  # noqa: E731
    max_len = _round_up(T + max_new_tokens, BUCKET)
    cache = (kv_cache.init_cache(cfg, len(rows), max_len) if plan is None
             else plan.init_cache(cfg, len(rows), max_len))
    # On one CPU device the weights are read where they lie (model/split.py): prefill by blocks,
    # decoding by experts; the cache stays split by blocks from here on.
    layout, laid_out = for_inference(cfg, params, plan, "blocks")
    if layout != "stacked":
        cache = kv_cache.split(cache)
    image = None
    if pixel_values is not None:
        pixel_values = jnp.asarray(pixel_values)
        multimodal.check_pixel_values(cfg, pixel_values)
    multimodal.check_image_tokens(cfg, ids, pixel_values)
    if pixel_values is not None:
        image = _image_embeddings(cfg, params, ids, pixel_values)
    for s in range(0, T_pad, piece):
        piece_image = None if image is None else (
            put(image[0][:, s:s + piece], ("batch", "seq")),
            put(image[1][:, s:s + piece], ("batch", "seq", "act_embed")))
        logits, cache = extend(cfg, laid_out, put(ids[:, s:s + piece], ("batch", "seq")),
                               put(positions[:, s:s + piece], ("batch", "seq")), cache, plan,
                               piece_image, fresh=s == 0, layout=layout,
                               last_only=s + piece == T_pad)
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    state = (logits[:, -1], put(jnp.asarray(positions[:, -1] + 1), ("batch",)), cache,
             put(jnp.zeros((len(rows),), bool), ("batch",)), key)
    return ids[:, T_pad - T:], state


def decode_stream(cfg: Config, params, state, *, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None,
                  stop_tokens: Sequence[int] | None = None, stream_every: int | None = None,
                  mesh=None, rules="combined") -> Iterator[np.ndarray]:
    """New tokens [B, n] every `stream_every` tokens (all at once when None), until
    max_new_tokens or every row has stopped. `mesh`, `rules`: as given to `prefill`."""
    inputs.check_decoding(cfg.text.vocab_size, max_new_tokens, temperature, top_k, top_p,
                          stream_every)
    inputs.check_logits_finite(state[0])
    plan, params = place_on_mesh(cfg, params, state[0].shape[0], mesh, rules)
    layout, params = for_inference(cfg, params, plan, "experts")
    stop = list(cfg.text.eos_token_ids if stop_tokens is None else stop_tokens) or [-1]
    every = stream_every or max_new_tokens
    for done_so_far in range(0, max_new_tokens, every):
        steps = min(every, max_new_tokens - done_so_far)
        new, state = decode(cfg, params, state, jnp.asarray(stop, jnp.int32), _pad_id(cfg),
                            steps=steps, temperature=float(temperature), top_k=top_k, top_p=top_p,
                            plan=plan, layout=layout)
        yield np.asarray(new)
        if bool(jnp.all(state[3])):
            return


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_id(cfg: Config) -> int:
    return cfg.text.pad_token_id if cfg.text.pad_token_id is not None else 0


def generate(cfg: Config, params, input_ids, *, max_new_tokens: int, **kw) -> np.ndarray:
    """Prompt followed by up to max_new_tokens new tokens: [B, T + N], rows left-padded with the
    pad id to the longest prompt and right-padded after a stop token (eos, eom, eot by default).
    Keywords: temperature (0: greedy), top_k, top_p, seed, stop_tokens, prefill_chunk,
    pixel_values (images, as for `model.forward`); mesh and rules run it sharded (sharding/)."""
    inputs.check_decoding(cfg.text.vocab_size, max_new_tokens, **{
        k: kw[k] for k in ("temperature", "top_k", "top_p", "stream_every") if k in kw})
    prefill_kw = {k: kw.pop(k) for k in ("seed", "prefill_chunk", "pixel_values") if k in kw}
    prefill_kw.update({k: kw[k] for k in ("mesh", "rules") if k in kw})
    prompts, state = prefill(cfg, params, input_ids, max_new_tokens=max_new_tokens, **prefill_kw)
    new = list(decode_stream(cfg, params, state, max_new_tokens=max_new_tokens, **kw))
    out = np.concatenate([prompts, *new], axis=1)
    full = prompts.shape[1] + max_new_tokens
    return np.pad(out, [(0, 0), (0, full - out.shape[1])], constant_values=_pad_id(cfg))
