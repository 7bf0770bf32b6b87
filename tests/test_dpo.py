"""DPO end to end on the train loop: it learns a real preference (held-out reward accuracy above
chance), resumes exactly, runs sharded as on one device, and refuses bad preference files."""
import dataclasses
import json

import jax
import numpy as np
import pytest

import model
import training
from training import DataError, byte_tokenizer, read_metrics
from training.dpo import DPO, read_pairs, reward_accuracy, sequence_logprobs

SEQ = 24


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def policy(tok):
    cfg = model.tiny(vocab_size=264, bos_token_id=tok.special["bos"],
                     eos_token_ids=tuple(tok.stop_ids), pad_token_id=tok.special["pad"],
                     num_layers=2, moe_layers=(1,), nope_layers=(1,))
    return cfg, model.init_params(cfg, jax.random.key(0))


def _pairs_file(path, n, seed):
    """Pairs with a real signal: the chosen answer is the prompt's letters in lower case, the
    rejected the same letters in upper case (every pair's strings are new)."""
    r = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            word = "".join(r.choice(list("abcdefghij"), 4))
            f.write(json.dumps({"prompt": f"say {word}:", "chosen": word,
                                "rejected": word.upper()}) + "\n")
    return path


def _train(policy, pairs, out, steps, save_every=2, **run):
    cfg, params = policy
    return training.train(cfg, lambda: params, pairs,
                          training.RunConfig(out=str(out), batch=4, seq=SEQ, save_every=save_every,
                                             progress=False, async_save=False, **run),
                          training.OptimConfig(lr=3e-3, warmup=1, steps=steps),
                          objective=DPO(reference=policy, beta=0.5))


def test_dpo_learns_a_preference_that_holds_out(tmp_path, tok, policy):
    pad = tok.special["pad"]
    train = read_pairs(tok, _pairs_file(tmp_path / "train.jsonl", 64, 0), SEQ, pad)
    held = read_pairs(tok, _pairs_file(tmp_path / "held.jsonl", 32, 1), SEQ, pad)
    state, history = _train(policy, train, tmp_path / "run", 12, save_every=100)
    cfg, params = policy
    before = reward_accuracy(*[sequence_logprobs(cfg, params, held, 8)] * 2)
    after = reward_accuracy(sequence_logprobs(cfg, state["params"], held, 8),
                            sequence_logprobs(cfg, params, held, 8))
    assert before == 0.0  # policy = reference: no pair has a positive margin yet
    assert after >= 0.9, after  # 32 held-out pairs: chance is 0.5
    first, last = history[0], history[-1]
    assert first["dpo"] == pytest.approx(np.log(2), rel=1e-5)  # policy = reference at step 1
    assert last["dpo"] < 0.5 * first["dpo"] and last["reward_margin"] > 0
    assert {"reward_accuracy", "chosen_logp", "rejected_logp", "aux"} <= set(last)


@pytest.mark.slow
def test_dpo_resumes_exactly_and_sharded_equals_one_device(tmp_path, tok, policy):
    pairs = read_pairs(tok, _pairs_file(tmp_path / "p.jsonl", 16, 0), SEQ, tok.special["pad"])
    one, _ = _train(policy, pairs, tmp_path / "one", 4)
    _train(policy, pairs, tmp_path / "mesh", 4, mesh="data=2,fsdp=2,tensor=2", stop_at=2)
    split, _ = _train(policy, pairs, tmp_path / "mesh", 4, mesh="data=2,fsdp=2,tensor=2",
                      resume=True)
    h_one, h_split = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "mesh"))
    assert [m["step"] for m in h_split] == [1, 2, 3, 4]
    for key in ("loss", "dpo", "chosen_logp", "rejected_logp"):
        np.testing.assert_allclose([m[key] for m in h_split], [m[key] for m in h_one],
                                   rtol=1e-5)
    # The margin is a difference of log-probs near -60 (fp32 spacing ~4e-6) that starts at 0.
    np.testing.assert_allclose([m["reward_margin"] for m in h_split],
                               [m["reward_margin"] for m in h_one], rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(split["params"]), jax.tree.leaves(one["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_resume_with_another_beta_is_refused(tmp_path, tok, policy):
    pairs = read_pairs(tok, _pairs_file(tmp_path / "p.jsonl", 8, 0), SEQ, tok.special["pad"])
    cfg, params = policy
    run = training.RunConfig(out=str(tmp_path / "r"), batch=4, seq=SEQ, save_every=1,
                             progress=False, async_save=False)
    optim = training.OptimConfig(lr=1e-3, warmup=1, steps=2)
    training.train(cfg, lambda: params, pairs, dataclasses.replace(run, stop_at=1), optim,
                   objective=DPO(reference=policy, beta=0.5))
    with pytest.raises(training.ResumeError, match="objective"):
        training.train(cfg, lambda: params, pairs, dataclasses.replace(run, resume=True), optim,
                       objective=DPO(reference=policy, beta=0.1))


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a", "chosen": "b"}, r"p.jsonl:2: missing field\(s\) \['rejected'\]"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "p.jsonl:2: 'chosen' equals 'rejected'"),
    ({"prompt": "a", "chosen": "b", "rejected": ["c"]}, "p.jsonl:2: .*three strings"),
    ({"prompt": "a", "chosen": "b" * 40, "rejected": "c"}, "p.jsonl:2: 'chosen' is .* raise --seq"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "x"}],
      "rejected": [{"role": "assistant", "content": "y"}]},
     "p.jsonl:2: 'chosen' has no assistant message"),
])
def test_bad_preference_files_are_one_clear_error(tmp_path, tok, record, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                    + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message):
        read_pairs(tok, str(path), SEQ, 0)


def test_chat_pairs_score_only_the_response(tmp_path, tok):
    path = tmp_path / "p.jsonl"
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "bye?"}]
    path.write_text(json.dumps({"prompt": prompt,
                                "chosen": [{"role": "assistant", "content": "ok"}],
                                "rejected": [{"role": "assistant", "content": "no!"}]}) + "\n")
    pairs = read_pairs(tok, str(path), 96, 0)
    for side, text in (("chosen", "ok"), ("rejected", "no!")):
        tokens, w = pairs.rows[f"{side}_tokens"][0], pairs.rows[f"{side}_weights"][0]
        # The response and its end-of-turn token, not the earlier assistant turn "hello".
        assert tok.decode(tokens[w > 0].tolist(), skip_special=False) == text + "<|eot|>"
