"""Inference: cached decode against the full forward, greedy generation against HF `generate`,
ragged batches against one prompt at a time, and bad input."""
import jax
import numpy as np
import pytest
import torch

import model
from experiments.hf_reference import hf_text_model, params_from_hf
from model import kv_cache, sampling
from tests.hf_models import text

# Chunks of 8 and temperature tuning stepping every 4 positions: a 40-token run crosses both
# several times. The HF side stops at eos_token_id 2 like ours.
HF = text(vocab_size=97)


@pytest.fixture(scope="module", params=["scout_like", "maverick_like"])
def pair(request):
    extra = {"maverick_like": dict(interleave_moe_layer_step=2, use_qk_norm=False)}.get(request.param, {})
    hf = hf_text_model({**HF, **extra}, seed=1)
    cfg, params = params_from_hf(hf)
    return hf, cfg, params


def _cached_equals_full_forward(cfg, params, **kernel):
    ids = np.random.default_rng(0).integers(3, 97, (2, 37))
    full = np.asarray(model.forward(cfg, params, ids))
    cache = kv_cache.init_cache(cfg, 2, 37)
    pos = np.broadcast_to(np.arange(37), (2, 37))
    got, s = [], 0
    for n in (11, 5, 1, 1, 8, 11):  # uneven prefill pieces, then single-token steps
        rt = model.resolve(cfg, "decode" if n == 1 else "prefill", layout="stacked")
        logits, cache = sampling.extend(cfg, rt.replace(**kernel), params, ids[:, s:s + n],
                                        pos[:, s:s + n], cache)
        got.append(np.asarray(logits))
        s += n
    got = np.concatenate(got, axis=1)
    np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-4 * np.abs(full).max())


@pytest.mark.slow
def test_cached_decode_equals_full_forward(pair):
    _, cfg, params = pair
    _cached_equals_full_forward(cfg, params)


@pytest.mark.slow
def test_cache_read_in_blocks_equals_full_forward(pair):
    """Caches longer than the runtime's dense_max_len slots are read block by block; here with
    blocks of 5 over 37 slots (8 in the ring buffers)."""
    _, cfg, params = pair
    _cached_equals_full_forward(cfg, params, dense_max_len=4, block=5)


def test_greedy_equals_hf_generate(pair):
    hf, cfg, params = pair
    for prompt_len in (3, 13):
        prompt = np.random.default_rng(prompt_len).integers(3, 97, (1, prompt_len))
        with torch.no_grad():
            ref = hf.generate(torch.tensor(prompt), max_new_tokens=30, do_sample=False,
                              eos_token_id=2, pad_token_id=0).numpy()[0]
        ours = model.generate(cfg, params, prompt, max_new_tokens=30)[0]
        n = len(ref)
        assert ours[:n].tolist() == ref.tolist()
        assert (ours[n:] == 0).all()  # stopped where HF stopped (or ran to the same length)


@pytest.mark.slow
def test_ragged_batch_equals_one_by_one(pair):
    _, cfg, params = pair
    r = np.random.default_rng(5)
    prompts = [r.integers(3, 97, n).tolist() for n in (3, 17, 9)]
    batch = model.generate(cfg, params, prompts, max_new_tokens=20, stop_tokens=[])
    T = max(map(len, prompts))
    for b, p in enumerate(prompts):
        alone = model.generate(cfg, params, [p], max_new_tokens=20, stop_tokens=[])[0]
        assert batch[b, T - len(p):].tolist() == alone.tolist()
        assert (batch[b, :T - len(p)] == cfg.text.pad_token_id).all()


@pytest.mark.slow
def test_streaming_equals_one_call(pair):
    _, cfg, params = pair
    prompt = [[5, 6, 7, 8]]
    whole = model.generate(cfg, params, prompt, max_new_tokens=12, stop_tokens=[])
    _, state = sampling.prefill(cfg, params, prompt, max_new_tokens=12)
    pieces = list(sampling.decode_stream(cfg, params, state, max_new_tokens=12, stop_tokens=[],
                                         stream_every=5))
    assert [p.shape[1] for p in pieces] == [5, 5, 2]
    assert np.concatenate(pieces, 1).tolist() == whole[:, 4:].tolist()


@pytest.mark.slow
def test_sampling_is_seeded_and_respects_top_k(pair):
    _, cfg, params = pair
    kw = dict(max_new_tokens=15, temperature=1.0, top_k=3, stop_tokens=[])
    a = model.generate(cfg, params, [[5, 6, 7]], seed=1, **kw)
    assert a.tolist() == model.generate(cfg, params, [[5, 6, 7]], seed=1, **kw).tolist()
    assert a.tolist() != model.generate(cfg, params, [[5, 6, 7]], seed=2, **kw).tolist()
    # top_k=1 is greedy whatever the temperature
    greedy = model.generate(cfg, params, [[5, 6, 7]], max_new_tokens=15, stop_tokens=[])
    assert model.generate(cfg, params, [[5, 6, 7]], seed=3, max_new_tokens=15, temperature=2.0,
                          top_k=1, stop_tokens=[]).tolist() == greedy.tolist()


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    seen = {int(sampling.sample(logits, jax.random.key(i), 1.0, None, 0.7)[0]) for i in range(200)}
    assert seen == {0, 1}


def test_cache_memory_of_scout():
    # The hybrid layout: 12 global layers keep every token (48 KiB a token in bf16); the 36
    # chunked layers keep 8192 positions whatever the context.
    scout = model.preset("scout")
    per_token = 12 * 2 * 8 * 128 * 2
    assert per_token == 48 * 1024
    for ctx in (131072, 1 << 20, 10 * (1 << 20)):
        assert kv_cache.cache_bytes(scout, 1, ctx, 2) == per_token * ctx + 36 * 2 * 8 * 128 * 2 * 8192


@pytest.mark.parametrize("prompt, kw, message", [
    ([[]], {}, "empty prompt"),
    ([], {}, "empty prompt"),
    ([[1, 2, 500]], {}, "outside the vocabulary"),
    ([[1, -1]], {}, "outside the vocabulary"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens"),
    ([[1] * 4090], {"max_new_tokens": 10}, "exceeds the context"),
    ([[1, 2]], {"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ([[1, 2]], {"temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ([[1, 2]], {"top_k": 0}, r"top_k must be an integer in 1\.\.97"),
    ([[1, 2]], {"top_k": 98}, r"top_k must be an integer in 1\.\.97"),
    ([[1, 2]], {"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
    ([[1, 2]], {"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
    ([[1, 2.7]], {}, "prompt row 0, position 1: token id 2.7 is not an integer"),
    ([[1, 2], [3, 4.0]], {}, "prompt row 1, position 1: token id 4.0 is not an integer"),
    (np.array([[1.0, 2.5]]), {}, "input_ids must hold integer token ids, got an array of float64"),
    ([[1, 2]], {"pixel_values": np.full((2, 16, 16, 3), np.nan, np.float32)},
     r"pixel_values hold 1536 NaN or infinite values \(in tiles \[0, 1\]\)"),
])
def test_bad_input(pair, prompt, kw, message):
    _, cfg, params = pair
    cfg = cfg.replace_text(max_position_embeddings=4096)
    with pytest.raises(ValueError, match=message):
        model.generate(cfg, params, prompt, **{"max_new_tokens": 4, **kw})


@pytest.mark.parametrize("ids, bad", [([[1, 2, 100000]], 100000), (np.array([[1, -1]]), -1),
                                      (np.array([[2**40]]), 2**40)])
def test_forward_refuses_ids_outside_the_vocabulary_as_generate_does(pair, ids, bad):
    """One check for both (model.inputs): not another token, which the embedding lookup would
    make of it (it clamps: 100000 reads 96, -1 reads 0)."""
    _, cfg, params = pair
    message = (rf"token id {bad} is outside the vocabulary 0\.\.96|outside the vocabulary "
               rf"0\.\.96, e\.g\. {bad} at position")
    with pytest.raises(ValueError, match=message):
        model.forward(cfg, params, ids)
    with pytest.raises(ValueError, match=message):
        model.generate(cfg, params, ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must hold integer token ids"):
        model.forward(cfg, params, [[1, 2.5]])


def test_forward_under_a_callers_jit(pair):
    _, cfg, params = pair
    ids = np.array([[1, 2, 3]])
    traced = jax.jit(lambda i: model.forward(cfg, params, i))(ids)
    np.testing.assert_array_equal(traced, model.forward(cfg, params, ids))


def test_decode_compiles_once_for_a_ragged_last_call(pair):
    """max_new_tokens not a multiple of stream_every: the last, shorter call runs the same
    program (its length is an argument, not part of the program), and compile_decode is that
    program, compiled ahead."""
    _, cfg, params = pair
    compiled = []

    def listen(event, seconds, **kw):
        if event == "/jax/core/compile/backend_compile_duration" and kw.get("fun_name") == \
                "jit(decode)":
            compiled.append(seconds)
    _, state = sampling.prefill(cfg, params, [[5, 6, 7]], max_new_tokens=10, seed=3)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        kw = dict(max_new_tokens=10, stream_every=4, temperature=0.7, top_k=7, stop_tokens=[])
        sampling.compile_decode(cfg, params, state, **kw)
        assert len(compiled) == 1
        chunks = list(sampling.decode_stream(cfg, params, state, **kw))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert [c.shape[1] for c in chunks] == [4, 4, 2] and len(compiled) == 1
    whole = model.generate(cfg, params, [[5, 6, 7]], max_new_tokens=10, seed=3, temperature=0.7,
                           top_k=7, stop_tokens=[])
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), whole[:, 3:])


def test_streaming_needs_a_positive_stream_every(pair):
    _, cfg, params = pair
    _, state = sampling.prefill(cfg, params, [[1, 2]], max_new_tokens=4)
    with pytest.raises(ValueError, match="stream_every must be an integer of at least 1"):
        next(sampling.decode_stream(cfg, params, state, max_new_tokens=4, stream_every=-1))


def test_nan_weights_are_an_error_not_token_0_for_ever():
    cfg = model.tiny()
    params = model.init_params(cfg, jax.random.key(0))
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[0, 5].set(np.nan)
    with pytest.raises(ValueError, match=r"logits after the prompt are NaN or infinite \(rows "
                                         r"\[0\]\): its weights hold NaN or inf"):
        model.generate(cfg, params, [[5, 6, 7]], max_new_tokens=5)


def test_config_without_stop_tokens():  # an HF config may say `eos_token_id: null`
    cfg = model.tiny().replace_text(eos_token_ids=())
    params = model.init_params(cfg, jax.random.key(0))
    out = model.generate(cfg, params, [[5, 6, 7]], max_new_tokens=5)
    np.testing.assert_array_equal(
        out, model.generate(cfg, params, [[5, 6, 7]], max_new_tokens=5, stop_tokens=[]))
    assert out.shape == (1, 8)
