"""Generation: prefill the prompt in pieces, then decode inside one jitted loop.

Prompts of different lengths are left-padded; each row's positions start at 0 at its first real
token (padding has negative positions and is never attended), so a row decodes exactly as it
would alone. The loop is a `lax.while_loop`: no Python round trip per token, and it ends early
once every row has emitted a stop token.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import inputs, kv_cache, multimodal, runtime
from .config import Config
from .decoder import Decoder
from .runtime import Runtime

BUCKET = 32


class DecodeState(NamedTuple):
    """What decoding carries from one step to the next (a pytree)."""
    logits: jax.Array      # [B, V] of each row's last token
    positions: jax.Array   # [B] where each row's next token goes
    cache: dict            # model.kv_cache, as the runtime's layout holds it
    done: jax.Array        # [B] the row has emitted a stop token
    key: jax.Array         # PRNG key for sampling


@functools.partial(jax.jit, static_argnames=("cfg", "rt", "last_only"),
                   donate_argnames=("cache",))
def extend(cfg: Config, rt: Runtime, params, ids, positions, cache, image=None,
           last_only: bool = False):
    """Run tokens ids [B, T] at positions [B, T] through the model, appending to the cache.
    Returns (logits [B, T, V], or [B, 1, V] for the last position with `last_only`, cache).
    `params` and `cache` as `rt` reads them (`rt.view_params`, `rt.view_cache`).
    `image` = (mask [B, T], features [B, T, D]): embeddings replaced where mask is set."""
    embed_fn = None
    if image is not None:
        embed_fn = lambda x: jnp.where(image[0][..., None], image[1].astype(x.dtype), x)  # noqa: E731
    return Decoder(cfg, rt).apply({"params": multimodal.decoder_params(params)}, ids, positions,
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


@functools.partial(jax.jit, static_argnames=("cfg", "rt", "steps", "temperature", "top_k",
                                             "top_p"),
                   donate_argnames=("state",))  # the cache is updated in place, not copied
def decode(cfg: Config, rt: Runtime, params, state: DecodeState, stop_tokens, pad_id, limit, *,
           steps: int, temperature: float, top_k: int | None, top_p: float | None):
    """Sample up to `limit` <= `steps` tokens. Returns (tokens [B, steps] with pad_id after a row
    stops or past `limit`, new state), so that calls can be chained to stream. `limit` is traced,
    so a last, shorter call runs the same program. `params` as `rt` reads them."""
    B = state.logits.shape[0]
    decoder = Decoder(cfg, rt)
    params = multimodal.decoder_params(params)

    def cond(carry):
        i, _, s = carry
        return (i < limit) & ~jnp.all(s.done)

    def body(carry):
        i, out, s = carry
        key, sub = jax.random.split(s.key)
        tok = jnp.where(s.done, pad_id, sample(s.logits, sub, temperature, top_k, top_p))
        out = out.at[:, i].set(tok)
        done = s.done | jnp.isin(tok, stop_tokens)
        logits, cache = decoder.apply({"params": params}, tok[:, None], s.positions[:, None],
                                      cache=s.cache)
        return i + 1, out, DecodeState(logits[:, -1], s.positions + 1, cache, done, key)

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
            max_new_tokens: int, seed: int | jax.Array = 0, prefill_chunk: int = 512,
            pixel_values=None, mesh=None, rules="combined", experts: str | None = None,
            layout: str | None = None) -> tuple[np.ndarray, DecodeState]:
    """Check and left-pad the prompts, run them through the model in pieces of `prefill_chunk`
    tokens, and return (prompts [B, T] left-padded, decode state). With a `mesh` the params,
    cache and state are placed on it (see sharding/). pixel_values [tiles, S, S, 3]: the tiles
    of every image of every row, in order (see `model.image_processing.build_inputs`).
    `experts`, `layout`: override the runtime's choice (runtime.resolve)."""
    t = cfg.text
    inputs.check_token_ids(input_ids, t.vocab_size)
    inputs.check_pixel_values(pixel_values)
    rows = _as_rows(input_ids)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("empty prompt: every row needs at least one token")
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
    if pixel_values is not None:
        pixel_values = jnp.asarray(pixel_values)
        multimodal.check_pixel_values(cfg, pixel_values)
    multimodal.check_image_tokens(cfg, ids, pixel_values)
    placement, params = runtime.place(cfg, params, len(rows), piece, mesh, rules)
    rt = runtime.resolve(cfg, "prefill", placement, experts=experts, layout=layout)
    put = (lambda x, axes: x) if placement is None else placement.put  # noqa: E731
    max_len = _round_up(T + max_new_tokens, BUCKET)
    cache = rt.init_cache(cfg, len(rows), max_len)
    image = None
    if pixel_values is not None:
        image = _image_embeddings(cfg, params, ids, pixel_values)
    viewed = rt.view_params(params)
    for s in range(0, T_pad, piece):
        piece_image = None if image is None else (
            put(image[0][:, s:s + piece], ("batch", "seq")),
            put(image[1][:, s:s + piece], ("batch", "seq", "act_embed")))
        logits, cache = extend(cfg, rt.replace(cache_empty=s == 0), viewed,
                               put(ids[:, s:s + piece], ("batch", "seq")),
                               put(positions[:, s:s + piece], ("batch", "seq")), cache,
                               piece_image, last_only=s + piece == T_pad)
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    state = DecodeState(logits[:, -1], put(jnp.asarray(positions[:, -1] + 1), ("batch",)), cache,
                        put(jnp.zeros((len(rows),), bool), ("batch",)), key)
    if placement is None:  # committed to the device, as the state `decode` returns: otherwise
        state = jax.device_put(state, logits.sharding)  # its second call compiles a new program
    return ids[:, T_pad - T:], state


class _Decoding(NamedTuple):
    """decode's arguments for one stream, as decode_stream and compile_decode both pass them."""
    rt: Runtime
    params: dict
    state: DecodeState
    stop: jax.Array
    static: dict


def _decoding(cfg: Config, params, state: DecodeState, max_new_tokens: int, temperature, top_k,
              top_p, stop_tokens, stream_every, mesh, rules, experts, layout) -> _Decoding:
    inputs.check_decoding(cfg.text.vocab_size, max_new_tokens, temperature, top_k, top_p,
                          stream_every)
    room, start = kv_cache.room(cfg, state.cache), int(np.max(np.asarray(state.positions)))
    if room is not None and start + max_new_tokens > room:
        raise ValueError(f"the cache holds {room} positions and the longest row is at {start}: "
                         f"{max_new_tokens} new tokens would run past its end (prefill with a "
                         "max_new_tokens that covers every token to be decoded)")
    placement, params = runtime.place(cfg, params, state.logits.shape[0], 1, mesh, rules)
    rt = runtime.resolve(cfg, "decode", placement, experts=experts, layout=layout)
    params, state = rt.view_params(params), state._replace(cache=rt.view_cache(state.cache))
    stop = jnp.asarray(list(cfg.text.eos_token_ids if stop_tokens is None else stop_tokens)
                       or [-1], jnp.int32)
    steps = min(stream_every or max_new_tokens, max_new_tokens)
    return _Decoding(rt, params, state, stop, dict(steps=steps, temperature=float(temperature),
                                                   top_k=top_k, top_p=top_p))


def compile_decode(cfg: Config, params, state: DecodeState, *, max_new_tokens: int,
                   temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, stop_tokens: Sequence[int] | None = None,
                   stream_every: int | None = None, mesh=None, rules="combined",
                   experts: str | None = None, layout: str | None = None) -> float:
    """Compile the decode loop that `decode_stream` with the same arguments runs, without
    running it (a caller can then say how long the compile took and time decoding alone);
    returns the seconds it took. One program serves every call of the stream."""
    d = _decoding(cfg, params, state, max_new_tokens, temperature, top_k, top_p, stop_tokens,
                  stream_every, mesh, rules, experts, layout)
    t0 = time.perf_counter()
    decode.lower(cfg, d.rt, d.params, d.state, d.stop, _pad_id(cfg), d.static["steps"],
                 **d.static).compile()
    return time.perf_counter() - t0


def decode_stream(cfg: Config, params, state: DecodeState, *, max_new_tokens: int,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  stop_tokens: Sequence[int] | None = None, stream_every: int | None = None,
                  mesh=None, rules="combined", experts: str | None = None,
                  layout: str | None = None) -> Iterator[np.ndarray]:
    """New tokens [B, n] every `stream_every` tokens (all at once when None), until
    max_new_tokens or every row has stopped. `mesh`, `rules`, `experts`, `layout`: as given to
    `prefill` (the state's cache is brought to the decoding layout once)."""
    d = _decoding(cfg, params, state, max_new_tokens, temperature, top_k, top_p, stop_tokens,
                  stream_every, mesh, rules, experts, layout)
    inputs.check_logits_finite(d.state.logits)
    state, every = d.state, d.static["steps"]
    for done_so_far in range(0, max_new_tokens, every):
        n = min(every, max_new_tokens - done_so_far)
        new, state = decode(cfg, d.rt, d.params, state, d.stop, _pad_id(cfg), n, **d.static)
        yield np.asarray(new[:, :n])
        if bool(jnp.all(state.done)):
            return


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_id(cfg: Config) -> int:
    return cfg.text.pad_token_id if cfg.text.pad_token_id is not None else 0


def generate(cfg: Config, params, input_ids, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | jax.Array = 0,
             stop_tokens: Sequence[int] | None = None, prefill_chunk: int = 512,
             pixel_values=None, mesh=None, rules="combined", experts: str | None = None,
             layout: str | None = None) -> np.ndarray:
    """Prompt followed by up to max_new_tokens new tokens: [B, T + N], rows left-padded with the
    pad id to the longest prompt and right-padded after a stop token (eos, eom, eot by default).
    temperature 0 is greedy; pixel_values are images, as for `model.forward`; mesh and rules run
    it sharded (sharding/); experts and layout override the runtime's choice (runtime.resolve)."""
    inputs.check_decoding(cfg.text.vocab_size, max_new_tokens, temperature, top_k, top_p)
    shared = dict(mesh=mesh, rules=rules, experts=experts, layout=layout)
    prompts, state = prefill(cfg, params, input_ids, max_new_tokens=max_new_tokens, seed=seed,
                             prefill_chunk=prefill_chunk, pixel_values=pixel_values, **shared)
    new = list(decode_stream(cfg, params, state, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p,
                             stop_tokens=stop_tokens, **shared))
    out = np.concatenate([prompts, *new], axis=1)
    full = prompts.shape[1] + max_new_tokens
    return np.pad(out, [(0, 0), (0, full - out.shape[1])], constant_values=_pad_id(cfg))
