"""The split layout (model/split.py): its parameter tree is the one `Decoder(split=True)`
declares, it aliases the stacked arrays on the CPU, and decoding with it gives the tokens,
logits and cache of the stacked (scanned) layout."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import kv_cache, multimodal, sampling
from model.decoder import Decoder
from model.split import split_params


@pytest.fixture(scope="module", params=["all_moe", "interleaved"])
def tiny(request):
    # "interleaved": MoE on odd layers and dense MLPs between, as Maverick; two blocks of 4.
    kw = {"all_moe": dict(moe_layers=tuple(range(8))),
          "interleaved": dict(moe_layers=(1, 3, 5, 7))}[request.param]
    cfg = model.tiny(num_layers=8, nope_layers=(3, 7), **kw)
    return cfg, model.init_params(cfg, jax.random.key(1))


def test_split_tree_is_what_the_split_decoder_declares(tiny):
    cfg, params = tiny
    declared = jax.eval_shape(lambda: nn.unbox(Decoder(cfg, split=True).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    split = split_params(cfg, params)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
    assert shapes(split) == shapes(declared)
    stacked = params["blocks"]["layer_1"]
    np.testing.assert_array_equal(split["block_1"]["layer_1"]["attn"]["q"], stacked["attn"]["q"][1])
    np.testing.assert_array_equal(split["block_1"]["layer_1"]["moe"]["wo_3"],
                                  stacked["moe"]["wo"][1, 3])


def test_split_arrays_alias_the_stacked_ones_on_cpu(tiny):
    cfg, params = tiny
    # Each expert's slice starts on a 64-byte boundary here, so jax takes it as it lies.
    stacked = params["blocks"]["layer_1"]["moe"]["wi_gate"]                # [nb, E, D, F]
    view = split_params(cfg, params)["block_1"]["layer_1"]["moe"]["wi_gate_2"]
    offset = (1 * stacked.shape[1] + 2) * stacked[0, 0].nbytes
    assert view.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + offset


def test_split_decoding_equals_stacked(tiny):
    cfg, params = tiny
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]   # ragged: left padding
    stop = jnp.asarray([-1], jnp.int32)
    results = {}
    for split in (False, True):
        _, state = sampling.prefill(cfg, params, prompts, max_new_tokens=12)
        p = split_params(cfg, params) if split else params
        results[split] = sampling.decode(cfg, p, state, stop, 0, steps=12, temperature=0.0,
                                         top_k=None, top_p=None, split=split)
    (tok_a, state_a), (tok_b, state_b) = results[False], results[True]
    np.testing.assert_array_equal(tok_a, tok_b)
    np.testing.assert_allclose(state_a[0], state_b[0], rtol=1e-5, atol=1e-5)   # last logits
    for a, b in zip(jax.tree.leaves(state_a[2]), jax.tree.leaves(state_b[2])):  # the caches
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_split_decoder_takes_one_token_per_row(tiny):
    cfg, params = tiny
    cache = kv_cache.split(kv_cache.init_cache(cfg, 1, 8))
    with pytest.raises(ValueError, match="one token per row"):
        Decoder(cfg, split=True).apply({"params": split_params(cfg, params)},
                                       jnp.ones((1, 2), jnp.int32), cache=cache)
    assert set(multimodal.DECODER_KEYS) - {"blocks"} < set(split_params(cfg, params))
