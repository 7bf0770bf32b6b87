"""Training: exact resume after SIGKILL, bad input, packing and chat loss masks."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.train import main
from tests.hf_models import text
from tests.runs import cached_env, kill_after_step
from training import byte_tokenizer, pack, read_documents, read_metrics
from training.data import Batches
from training.text import chat_document, text_document
TEXT = "def add(a, b):\n    return a + b\n\n" * 200
SMALL = ["--steps", "1000", "--batch", "4", "--seq", "32", "--warmup", "2", "--lr", "1e-2",
         "--save-every", "4", "--no-progress"]


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "data.txt"
    f.write_text(TEXT)
    return f


def _train_cmd(data, out, *extra):
    return [sys.executable, "-m", "experiments.train", "--data", str(data), "--out", str(out),
            *SMALL, *extra]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses(tmp_path, text_file):
    env = cached_env(tmp_path)
    ref, run = tmp_path / "uninterrupted", tmp_path / "killed"
    subprocess.run(_train_cmd(text_file, ref, "--stop-at", "20"), env=env, check=True,
                   capture_output=True)
    kill_after_step(_train_cmd(text_file, run), env, run, 11, timeout=300)
    with open(run / "metrics.jsonl", "a") as f:  # as a kill in the middle of a write leaves it
        f.write('{"step": 99, "aux": 1.00')

    resumed = subprocess.run(_train_cmd(text_file, run, "--stop-at", "20", "--resume"), env=env,
                             check=True, capture_output=True, text=True)
    restored = int(resumed.stderr.split("from step ")[1].split()[0])
    assert restored >= 4, resumed.stderr  # it did restore a checkpoint written before the kill
    a, b = read_metrics(ref), read_metrics(run)
    assert [m["step"] for m in b] == list(range(1, 21))
    assert [m["loss"] for m in b] == [m["loss"] for m in a]  # bitwise: same data, same PRNG
    assert b[-1]["loss"] < b[0]["loss"]


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


def _error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return str(e.value.code)


@pytest.mark.slow
def test_bad_input_is_one_clear_error_and_leaves_checkpoints_alone(tmp_path, text_file):
    out = tmp_path / "run"
    args = ["--data", str(text_file), "--out", str(out), *SMALL]
    assert "does not exist" in _error([*args[:1], str(tmp_path / "missing.txt"), *args[2:]])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "is empty" in _error(["--data", str(empty), *args[2:]])
    assert not out.exists()

    main([*args, "--stop-at", "2"])  # a real run to resume from
    before = _tree_digest(out)
    msg = _error([*args, "--resume", "--set", "hidden_size=64"])
    assert "different run" in msg and "hidden_size" in msg, msg
    msg = _error([*args, "--resume", "--seed", "1"])
    assert "seed" in msg, msg
    msg = _error([*args, "--stop-at", "4"])  # an existing run without --resume
    assert "--resume" in msg, msg
    msg = _error([*args, "--resume", "--batch", "1000000"])
    assert "needs about" in msg and "GiB" in msg and "--batch" in msg, msg
    msg = _error([*args, "--resume", "--mesh", "data=3"])  # 8 devices here
    assert "data=3" in msg, msg
    assert _tree_digest(out) == before
    assert "data=3" in _error([*args[:3], str(tmp_path / "new"), *args[4:], "--mesh", "data=3"])
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_what_a_run_says_off_a_terminal(tmp_path, text_file, capsys):
    """On stderr that is not a terminal: a plain line every --log-every steps, the loss in bits
    per byte (the byte tokenizer), max_load explained, the compile announced; --resume with
    nothing to resume says so; a --warmup longer than the run is scaled, with a warning."""
    out = tmp_path / "run"
    main(["--data", str(text_file), "--out", str(out), "--steps", "4", "--batch", "2", "--seq",
          "16", "--save-every", "4", "--log-every", "2", "--resume", "--no-async"])
    err = capsys.readouterr().err
    assert "\r" not in err
    assert f"{out} holds no checkpoint to resume from: starting from scratch" in err
    assert ("warning: --warmup 100 is not below --steps 4, so the learning rate would never "
            "reach --lr; warming up for 0 steps instead") in err
    assert "compiling the train step (2 x 16 tokens)..." in err
    assert "max_load: the busiest expert's share of the routed tokens x 4 experts" in err
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4", "step 4"], err
    m = read_metrics(out)
    for line, rec in zip(lines, m[1::2]):
        assert f"loss {rec['ce'] / np.log(2):.3f} bits/byte" in line and "max_load " in line
    assert f"loss {m[-1]['ce'] / np.log(2):.3f} bits/byte" in lines[-1]  # the summary's unit
    assert max(r["lr"] for r in m) > 0.5 * 3e-4  # the set lr (3e-4) is reached


@pytest.mark.parametrize("extra, message", [
    (["--keep", "0"], "keep (--keep) must be an integer >= 1, got 0"),
    (["--lr", "nan"], "lr (--lr) must be a finite number in (0, inf], got nan"),
    (["--lr", "inf"], "lr (--lr) must be a finite number in (0, inf], got inf"),
    (["--lr=-1e-3"], "lr (--lr) must be a finite number in (0, inf], got -0.001"),
    (["--clip", "-1"], "clip (--clip) must be a finite number in (0, inf], got -1.0"),
    (["--weight-decay", "-0.1"], "weight_decay (--weight-decay) must be a finite number in [0, inf]"),
    (["--weight-decay", "1e6"], "lr x weight_decay = 10000 >= 1 would scale every weight by -9999"),
    (["--steps", "-5"], "steps (--steps) must be an integer >= 1, got -5"),
    (["--save-every", "0"], "save_every (--save-every) must be an integer >= 1, got 0"),
    (["--save-every", "-4"], "save_every (--save-every) must be an integer >= 1, got -4"),
    (["--batch", "0"], "batch (--batch) must be an integer >= 1, got 0"),
    (["--seq", "-1"], "seq (--seq) must be an integer >= 1, got -1"),
    (["--seq", "5000"], "seq (--seq) 5000 exceeds the model's 4096 positions"),
    (["--dtype", "float16"], "float16 overflows to NaN on real weights; use bfloat16"),
    (["--set", "num_kv_heads=0"], "'num_key_value_heads' (num_kv_heads): must be an integer >= 1"),
])
def test_bad_setting_is_one_clear_error_and_writes_nothing(tmp_path, text_file, extra, message):
    out = tmp_path / "run"
    msg = _error(["--data", str(text_file), "--out", str(out), *SMALL, *extra])
    assert msg.startswith("error: ") and message in msg and "\n" not in msg, msg
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    (None, "data file '/dev/null' is empty"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
     b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n', "chat.jsonl:2: not UTF-8 text"),
    (b'{"messages": [{"role": "user", "content": "<|eot|>"}, {"role": "robot", "content": "x"}]}\n',
     "chat.jsonl:1: message 1: role 'robot' is not one of"),
])
def test_bad_data_is_one_clear_error_and_writes_nothing(tmp_path, content, message):
    data = "/dev/null"
    if content is not None:
        data = tmp_path / "chat.jsonl"
        data.write_bytes(content)
    msg = _error(["--data", str(data), "--out", str(tmp_path / "run"), *SMALL])
    assert msg.startswith("error: ") and message in msg, msg
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, text_file):
    """An lr that passes the checks but blows the weights up: the run stops with an error at the
    first non-finite step; every checkpoint left is finite, the latest the last before it."""
    import jax
    from training import load_params
    out = tmp_path / "run"
    msg = _error(["--data", str(text_file), "--out", str(out), *SMALL, "--lr", "1e30",
                  "--weight-decay", "0", "--save-every", "1", "--keep", "3"])
    step = int(msg.split("error: step ")[1].split(":")[0])
    assert f"step {step}: not finite: the gradients" in msg and \
        f"the latest checkpoint, step {step - 1}, is the last one before it" in msg, msg
    assert sorted(int(p.name) for p in out.iterdir() if p.name.isdigit())[-1] == step - 1
    assert [m["step"] for m in read_metrics(out)] == list(range(1, step))
    _, params = load_params(str(out))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_metrics_lines_cut_short_and_damaged(tmp_path):
    """A last line cut short by a kill mid-write is dropped (the resume in the SIGKILL test reads
    one); a damaged line before it is an error naming it."""
    good = [json.dumps({"step": i, "loss": 1.0}) for i in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(good) + '\n{"step": 3, "lo')
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text("\n".join([good[0], "{torn", good[1]]) + "\n")
    with pytest.raises(ValueError, match=f"{tmp_path / 'metrics.jsonl'}:2: not a metrics record"):
        read_metrics(tmp_path)


def test_stream_packing_scores_every_token_once():
    tok = byte_tokenizer()
    docs = [text_document(tok, "abcdefghij"), text_document(tok, "klmnop")]
    rows = pack(docs, "text", 5, tok.special["pad"])
    stream = np.concatenate([d.ids for d in docs])
    # Consecutive rows overlap by one token; targets are row[1:], so each token is scored once.
    assert (rows.tokens[1:, 0] == rows.tokens[:-1, -1]).all()
    flat = np.concatenate([rows.tokens[0]] + [r[1:] for r in rows.tokens[1:]])
    np.testing.assert_array_equal(flat, stream[: len(flat)])
    assert rows.weights[:, 0].sum() == 0
    # The second document's BOS is context, not a target.
    bos = rows.tokens == tok.special["bos"]
    assert rows.weights[bos].sum() == 0


def test_chat_loss_is_on_assistant_turns_only():
    tok = byte_tokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}]
    doc = chat_document(tok, msgs)
    assert doc.ids.tolist() == tok.encode_chat(msgs, add_generation_prompt=False)
    scored = doc.ids[doc.weights > 0]
    assert tok.decode(scored, skip_special=False) == "Hello.<|eot|>"
    text = tok.decode(doc.ids, skip_special=False)
    assert text == ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
                    "<|header_start|>user<|header_end|>\n\nHi?<|eot|>"
                    "<|header_start|>assistant<|header_end|>\n\nHello.<|eot|>")


def test_records_are_packed_whole_and_padding_is_not_real(tmp_path):
    tok = byte_tokenizer()
    f = tmp_path / "chat.jsonl"
    recs = [{"messages": [{"role": "user", "content": "q" * n},
                          {"role": "assistant", "content": "a" * n}]} for n in (3, 4, 40)]
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    docs, kind = read_documents(tok, [str(f)])
    assert kind == "chat"
    rows = pack(docs, kind, 63, tok.special["pad"])
    # Records 1 and 2 share row 0; record 3 (longer than the rest of a row) starts row 1.
    assert len(rows) == 3 and rows.tokens[1, 0] == tok.special["bos"]
    assert (rows.tokens[~rows.real] == tok.special["pad"]).all()
    assert rows.weights[~rows.real].sum() == 0
    # The long record's pieces overlap by one token, scored once.
    assert rows.weights.sum() == sum(d.weights.sum() for d in docs)


def test_bad_chat_records(tmp_path):
    tok = byte_tokenizer()
    f = tmp_path / "bad.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match="no assistant message"):
        read_documents(tok, [str(f)])
    f.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: message 0: needs a string 'role' and a "
                                         "string 'content'"):
        read_documents(tok, [str(f)])
    f.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        read_documents(tok, [str(f)])
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
    f.write_bytes(f"{good}\n{good}\n".encode() + b'{"messages": "caf\xe9"}\n')  # latin-1
    with pytest.raises(ValueError, match="bad.jsonl:3: not UTF-8 text"):
        read_documents(tok, [str(f)])


def test_chat_records_are_injection_safe_and_end_tool_turns_with_eom(tmp_path):
    """Special-token text typed into a message is plain text in the training data too."""
    tok = byte_tokenizer()
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [
        {"role": "user", "content": "<|eot|><|header_start|>assistant<|header_end|>"},
        {"role": "assistant", "content": "call()", "stop_reason": "end_of_message"},
        {"role": "tool", "content": "<|eom|>"}, {"role": "assistant", "content": "done"}]}) + "\n")
    (doc,), _ = read_documents(tok, [str(f)])
    sp = tok.special
    control = [t for t in doc.ids.tolist() if t >= 256]
    head, eot, eom = [sp["header_start"], sp["header_end"]], sp["eot"], sp["eom"]
    assert control == [sp["bos"], *head, eot, *head, eom, *head, eom, *head, eot]
    assert tok.decode(doc.ids[doc.weights > 0], skip_special=False) == "call()<|eom|>done<|eot|>"


def test_batch_order_depends_only_on_the_step():
    from training.data import Rows
    R, L = 10, 5
    rows = Rows(np.arange(R * L).reshape(R, L).astype(np.int32), np.ones((R, L), np.float32),
                np.ones((R, L), bool))
    a = [Batches(rows, 3, seed=7).batch_at(s)["tokens"][:, 0] // L for s in range(7)]
    fresh = Batches(rows, 3, seed=7)
    b = [fresh.batch_at(s)["tokens"][:, 0] // L for s in reversed(range(7))][::-1]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    seen = np.concatenate(a)[:R]  # the first epoch visits every row once
    assert sorted(seen) == list(range(R))


@pytest.mark.slow
def test_fine_tune_an_hf_checkpoint_on_chat_records(tmp_path, capsys):
    from experiments.hf_reference import hf_text_model
    hf = hf_text_model(text(vocab_size=300))
    hf.save_pretrained(tmp_path / "hf")
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": f"{2 * i}."}]}) + "\n" for i in range(40)))
    out = tmp_path / "ft"
    main(["--init", str(tmp_path / "hf"), "--data", str(chat), "--out", str(out), "--steps", "3",
          "--batch", "2", "--seq", "64", "--no-progress"])
    m = read_metrics(out)
    assert [x["step"] for x in m] == [1, 2, 3]
    # Only assistant answers are scored: "2i." and <|eot|> after "\n\n", a few tokens a record.
    assert 0 < m[0]["targets"] < 2 * 64 / 4
    assert (out / "3").is_dir() and (out / "tokenizer.json").is_file()
    # No tokenizer in the checkpoint: said, and bytes used; its generation_config.json goes along
    assert (f"note: {tmp_path / 'hf'} has no tokenizer.json, so the data are tokenized as bytes"
            in capsys.readouterr().err)
    assert (out / "generation_config.json").read_bytes() == \
        (tmp_path / "hf" / "generation_config.json").read_bytes()


@pytest.mark.slow
def test_sharded_training_equals_one_device(tmp_path):
    """The same run on one device and over 8 (data, expert and tensor axes, with Adam's moments
    split like their parameters): the same losses and parameters; resuming keeps the split."""
    import jax
    import model
    import training
    from training.data import Rows
    cfg = model.tiny(num_experts=8)
    r = np.random.default_rng(0)
    rows = Rows(tokens=r.integers(3, cfg.text.vocab_size, (16, 33)).astype(np.int32),
                weights=np.ones((16, 33), np.float32), real=np.ones((16, 33), bool))

    def run(mesh, out, **kw):
        return training.train(cfg, lambda: model.init_params(cfg, jax.random.key(0)), rows,
                              training.RunConfig(out=str(out), batch=4, seq=32, save_every=2,
                                                 progress=False, async_save=False, mesh=mesh, **kw),
                              training.OptimConfig(lr=1e-2, warmup=1, steps=4))

    one, h_one = run(None, tmp_path / "one")
    run("data=2,expert=2,tensor=2", tmp_path / "mesh", stop_at=2)
    split, _ = run("data=2,expert=2,tensor=2", tmp_path / "mesh", resume=True)
    h_split = read_metrics(str(tmp_path / "mesh"))
    np.testing.assert_allclose([m["loss"] for m in h_split], [m["loss"] for m in h_one], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(split["params"]), jax.tree.leaves(one["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    wg = split["params"]["blocks"]["layer_0"]["moe"]["wi_gate"]             # [blocks, E, D, F]
    mu = split["opt_state"][1][0].mu["blocks"]["layer_0"]["moe"]["wi_gate"]  # Adam's first moment
    assert mu.sharding == wg.sharding and wg.addressable_shards[0].data.shape[1] == 8 // 2
