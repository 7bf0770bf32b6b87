"""The pieces of the ablations that need no training: the passkey generator, the statistics and
the rule that turns them into findings, the stability and MoE-health metrics, the variants'
configs."""
import math

import numpy as np
import pytest

from experiments import ablation_report as R
from experiments import evals, retrieval
from experiments.ablations import ABLATIONS, SIZES, base_config
from training import byte_tokenizer

TOK = byte_tokenizer()
FILLER = np.frombuffer(b"def f(x):\n    return x + 1\n" * 200, np.uint8).astype(np.int32)


@pytest.mark.parametrize("length", [40, 129, 600])
def test_passkey_examples_have_the_length_and_the_needle_at_its_depth(length):
    ex = retrieval.examples(TOK, FILLER, length, retrieval.DEPTHS, seed=0)
    assert ex.ids.shape == (5, length) and ex.answer == retrieval.DIGITS
    for row, depth in zip(ex.ids, ex.depths):
        text = TOK.decode(row)
        key = text[-retrieval.DIGITS:]
        assert key.isdigit() and text.endswith(retrieval.QUERY + key)
        at = text.index(retrieval.NEEDLE.format(key=key))
        hay = length - len(retrieval.NEEDLE.format(key=key)) - len(retrieval.QUERY) - 6
        assert abs(at - depth * hay) <= 1            # the needle sits at its depth of the filler
    with pytest.raises(ValueError, match="needs more than 20 tokens"):
        retrieval.examples(TOK, FILLER, 20, [0.5], seed=0)


def test_exact_match_wants_every_answer_token():
    ex = retrieval.examples(TOK, FILLER, 64, [0.0, 1.0], seed=1)
    perfect = ex.ids[:, -ex.answer:]
    assert retrieval.correct(perfect, ex).all()
    one_off = perfect.copy()
    one_off[1, -1] += 1
    assert retrieval.correct(one_off, ex).tolist() == [True, False]


def test_training_rows_weigh_the_answer_and_skip_the_bos():
    rows = retrieval.training_rows(TOK, FILLER, 64, 10, seed=0, answer_weight=3.0)
    assert rows.tokens.shape == (10, 65) and rows.real.all()
    assert (rows.weights[:, 0] == 0).all() and (rows.weights[:, -5:] == 3).all()
    assert (rows.weights[:, 1:-5] == 1).all()


def _stat(mean, sd, n=3):
    return R.Stat(mean, sd, n)


def test_a_difference_within_the_seed_spread_is_no_difference():
    ref = _stat(2.00, 0.02)
    assert R.compare(_stat(2.03, 0.02), ref) == 0.0           # 0.03 < 0.02 + 0.02
    assert R.compare(_stat(2.10, 0.02), ref) == pytest.approx(0.10)
    assert R.compare(_stat(2.10, 0.0, n=1), ref) is None      # one seed: no spread to judge by
    assert R.stat([1.0, 2.0, None, math.nan]) == R.Stat(1.5, math.sqrt(0.5), 2)


def test_findings_say_better_worse_or_no_difference():
    a = ABLATIONS["qk_norm"]
    stats = {v.name: {m: _stat(2.0, 0.01) for m in a.metrics} for v in a.variants}
    stats["off"]["bpb"] = _stat(2.5, 0.01)                     # lower is better: worse
    stats["on_lr_x4"]["max_grad"] = _stat(1.0, 0.01)           # lower is better: better
    lines = R.findings(a, stats)
    assert lines[0].startswith("- **off** against llama4: held-out bpb +0.500 (worse)")
    assert "max grad norm -1.00 (better)" in lines[1]
    assert lines[2] == "- **off_lr_x4** against llama4: no difference beyond the seed spread"
    table = R.table(a, stats).splitlines()
    assert table[2].startswith("| llama4 (reference) | 2.000 ± 0.010 |")
    assert len(table) == 2 + len(a.variants)


def test_length_generalisation_holds_within_the_spread():
    a = ABLATIONS["irope"]
    stats = {v.name: {m: _stat(3.0, 0.01) for m in a.metrics} for v in a.variants}
    stats["llama4"]["rise_16x"] = _stat(0.01, 0.02)
    stats["all_rope"]["rise_16x"] = _stat(1.5, 0.2)
    lines = R.length_findings(a, stats)
    assert "llama4: bpb +0.010 ± 0.020 from 1x to 16x: holds its loss" in lines[0]
    assert "all_rope: bpb +1.500 ± 0.200 from 1x to 16x: does not hold its loss" in lines[1]


def test_stability_counts_spikes_after_warmup():
    history = [{"ce": 2.0, "grad_norm": 1.0} for _ in range(60)]
    history[5] = {"ce": 9.0, "grad_norm": 50.0}                # during warmup: not counted
    history[40] = {"ce": 2.0 * evals.SPIKE + 0.1, "grad_norm": 7.0}
    s = evals.stability(history, warmup=10)
    assert s == {"loss_spikes": 1, "max_grad_norm": 7.0}


def test_moe_health():
    uniform = evals.moe_health(np.full((2, 4), 0.25))
    assert uniform["balance_entropy"] == pytest.approx(1.0) and uniform["dead_experts"] == 0
    skewed = evals.moe_health(np.array([[0.97, 0.01, 0.01, 0.01]]))
    assert skewed["dead_experts"] == 3 and skewed["max_load"] == pytest.approx(3.88)
    assert skewed["balance_entropy"] < 0.2


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_variant_is_a_valid_config_with_equal_compute_where_promised(size):
    base = base_config(SIZES[size], TOK)
    for a in ABLATIONS.values():
        assert len({v.name for v in a.variants}) == len(a.variants)
        for v in a.variants:
            v.config(base)                                     # validated by TextConfig
            v.optim_config(SIZES[size].optim_config())
    from model.config import param_count
    active = {v.name: param_count(v.config(base))["text_active"]
              for v in ABLATIONS["moe"].variants}
    router = base.text.hidden_size * base.text.num_experts * base.text.num_layers
    # Equal FFN compute per token: the dense variant lacks only the routers' weights.
    assert active["llama4"] == active["top2_no_shared"] == active["dense"] + router
    assert active["4x_experts"] == active["llama4"] + 3 * router


def _windowed_oracle(window: int):
    """A 'model' that predicts every next token exactly where the needle lies within the last
    `window` tokens before the query, and nothing (all-zero logits) elsewhere."""
    def forward(ids):
        logits = np.zeros((*ids.shape, TOK.vocab_size), np.float32)
        for b, row in enumerate(ids):
            text = TOK.decode(row[1:])
            needle, query = text.find(retrieval.QUERY), text.rfind(retrieval.QUERY)
            if query - needle <= window:
                logits[b, np.arange(len(row) - 1), row[1:]] = 1.0
        return logits
    return forward


@pytest.mark.parametrize("one_length", [False, True])
def test_retrieval_score_by_length_and_depth(one_length):
    grid = retrieval.grid(TOK, FILLER, [64, 256], per_depth=2, depths=(0.0, 0.5, 1.0))
    pad = TOK.special["pad"]
    perfect = retrieval.score(_windowed_oracle(10 ** 6), grid, 4, pad, one_length)
    assert perfect == {"lengths": [64, 256], "depths": [0.0, 0.5, 1.0], "accuracy": [1.0, 1.0],
                       "by_depth": [[1.0] * 3, [1.0] * 3]}
    # With a context of 100 tokens the needle is found in every example of 64 tokens, and in
    # those of 256 only near the query (depth 1); batches of 4 split the 6 examples unevenly.
    near = retrieval.score(_windowed_oracle(100), grid, 4, pad, one_length)
    assert near["accuracy"] == [1.0, pytest.approx(1 / 3)]
    assert near["by_depth"] == [[1.0] * 3, [0.0, 0.0, 1.0]]


def _subword_tokenizer():
    """Bytes plus merges of the digit pairs "12" and "34": keys split into 3 to 5 tokens."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    from model.tokenizer import SPECIAL, Tokenizer
    from training.text import BYTE_SPECIALS, _bytes_to_unicode
    chars = _bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)} | {"12": 256, "34": 257}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[("1", "2"), ("3", "4")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(SPECIAL[n], special=True) for n in BYTE_SPECIALS])
    return Tokenizer(tk)


def test_passkey_keys_of_a_subword_tokenizer_have_one_token_count():
    tok = _subword_tokenizer()
    assert len(tok.encode("12345", bos=False)) == 3
    filler = np.asarray(tok.encode("def f(x):\n    return x + 1\n" * 100, bos=False), np.int32)
    ex = retrieval.examples(tok, filler, 120, np.repeat(retrieval.DEPTHS, 8), seed=0)
    assert ex.ids.shape == (40, 120) and (ex.ids[:, 0] == tok.special["bos"]).all()
    assert ex.answer == retrieval.answer_length(tok) == 5
    for row in ex.ids:
        key = tok.decode(row[-ex.answer:])
        assert key.isdigit() and len(key) == retrieval.DIGITS and "12" not in key
        assert "34" not in key and retrieval.NEEDLE.format(key=key) in tok.decode(row[1:-5])
