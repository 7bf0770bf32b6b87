"""Context parallelism on 8 simulated CPU devices: positions and the KV cache split over the
`context` mesh axis give the logits, greedy tokens, loss and gradients of one device.

48-token rows over 8 devices are 6 positions a shard, so the 8-token chunks of the RoPE layers
straddle shards; prompts are ragged (left padding) and prefilled in 16-token pieces, the last
crossing a chunk boundary."""
import jax
import numpy as np
import pytest

import model
import sharding
from experiments.hf_reference import hf_text_model, params_from_hf
from model import sampling
from sharding import ShardingError
from tests.hf_models import text
from training import loss_fn

MESHES = ["context=8", "context=4,tensor=2", "context=2,expert=2,tensor=2"]
PROMPTS = [list(range(5, 45)), list(range(7, 20))]


def relative(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def ref():
    # Two blocks of three chunked RoPE layers and a global NoPE layer, MoE on every layer, with
    # the parity tests' random weights (activations O(1), attention far from uniform, so that a
    # wrong mask shows). Weights much larger than that make the fp32 gradients themselves
    # ill-conditioned: two equivalent single-device kernels (dense and grouped experts) then
    # differ by 5e-5 to 1e-3, and so does context parallelism, which agrees to 1e-13 once every
    # fp32 cast is made fp64.
    cfg, params = params_from_hf(hf_text_model(text(num_hidden_layers=8, num_local_experts=8)))
    ids = np.random.default_rng(0).integers(3, cfg.text.vocab_size, (2, 48))
    logits = np.asarray(model.forward(cfg, params, ids))
    tokens = model.generate(cfg, params, PROMPTS, max_new_tokens=10, stop_tokens=[],
                            prefill_chunk=16)
    return cfg, params, ids, logits, tokens


def _batch(ids):
    r = np.random.default_rng(1)
    tokens = np.concatenate([ids, ids[:, :1]], axis=1).astype(np.int32)  # [B, T + 1]
    weights = (r.random(tokens.shape) > 0.2).astype(np.float32)
    return {"tokens": tokens, "weights": weights, "real": np.ones(tokens.shape, bool)}


def _loss_and_grads(cfg, params, batch, plan=None):
    rt = model.resolve(cfg, "train", plan)
    if plan is not None:
        params = sharding.shard_params(cfg, params, plan.mesh)
        batch = {k: plan.put(v, ("batch", None)) for k, v in batch.items()}
    fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(cfg, rt, p, batch)[0]))
    return fn(params)


@pytest.mark.slow
@pytest.mark.parametrize("spec", MESHES)
def test_context_parallel_equals_one_device(ref, spec):
    cfg, params, ids, logits, tokens = ref
    mesh = sharding.make_mesh(spec)
    assert model.resolve(cfg, "prefill", sharding.make_plan(cfg, mesh, seq=48)).attention == \
        "context"
    assert relative(model.forward(cfg, params, ids, mesh=mesh), logits) < 1e-5
    got = model.generate(cfg, params, PROMPTS, max_new_tokens=10, stop_tokens=[], mesh=mesh,
                         prefill_chunk=16)
    assert got.tolist() == tokens.tolist()
    batch = _batch(ids)
    loss, grads = _loss_and_grads(cfg, params, batch)
    loss_c, grads_c = _loss_and_grads(cfg, params, batch,
                                      sharding.make_plan(cfg, mesh, batch=2, seq=48))
    assert relative(loss_c, loss) < 1e-5
    for (path, g), g_c in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                              jax.tree.leaves(grads_c)):
        assert relative(g_c, g) < 1e-5, jax.tree_util.keystr(path)


def test_each_cache_shard_holds_its_slice_of_positions(ref):
    cfg, params, *_ = ref
    mesh = sharding.make_mesh("context=8")
    _, state = sampling.prefill(cfg, params, PROMPTS, max_new_tokens=10, prefill_chunk=16,
                                mesh=mesh)
    pos = state.cache["layer_3"]["pos"]  # a global layer: [blocks, B, S], S = 64 slots
    S = pos.shape[-1]
    assert len(pos.addressable_shards) == 8
    for shard in pos.addressable_shards:
        slots = range(S)[shard.index[-1]]
        assert len(slots) == S // 8
        held = np.asarray(shard.data)
        # a slot holds position p at p mod S, or nothing (-1)
        assert np.all((held == -1) | (held % S == np.asarray(slots)))
    whole = np.asarray(pos)[0, 0]
    assert sorted(whole[whole >= 0]) == list(range(40))  # row 0's 40 prompt positions, once each


def test_bad_context_splits(ref):
    cfg, params, *_ = ref
    mesh = sharding.make_mesh("context=8")
    ids = np.random.default_rng(0).integers(3, cfg.text.vocab_size, (2, 45))
    with pytest.raises(ShardingError, match="a sequence of 45 positions does not split over mesh "
                                            "axis context of size 8"):
        model.forward(cfg, params, ids, mesh=mesh)
    twelve = cfg.replace_text(attention_chunk_size=12)  # a 12-slot ring over 8 devices
    with pytest.raises(ShardingError, match="'cache_seq' of size 12 is not divisible by mesh "
                                            "axes context of size 8"):
        sampling.prefill(twelve, params, PROMPTS, max_new_tokens=10, prefill_chunk=16,
                         mesh=mesh)


def test_decoding_past_the_cache_is_an_error(ref):
    cfg, params, *_ = ref
    _, state = sampling.prefill(cfg, params, PROMPTS, max_new_tokens=10)
    with pytest.raises(ValueError, match="the cache holds 64 positions"):
        next(sampling.decode_stream(cfg, params, state, max_new_tokens=30))
