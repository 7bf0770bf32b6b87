"""Easy-data filtering: the rule (keep the hardest, drop floor(n * fraction), ties), and the
command on chat records, whose scores equal the judge's loss computed record by record."""
import json

import jax
import numpy as np
import pytest

import checkpoints
import model
from experiments.filter_easy import keep_hardest, main
from training import byte_tokenizer
from training.text import chat_document


def test_keep_hardest_rules():
    d = np.array([0.5, 2.0, 0.1, 2.0, 1.0])
    assert keep_hardest(d, 0.5).tolist() == [False, True, False, True, True]  # floor(2.5) = 2
    assert keep_hardest(d, 0.0).all()
    assert keep_hardest(d, 0.95).tolist() == [False, True, False, False, False]  # 4 of 5 dropped
    # Ties: the earlier of two equal scores stays.
    assert keep_hardest(np.array([1.0, 1.0, 1.0]), 0.5).tolist() == [True, True, False]
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="--drop-fraction must be in"):
            keep_hardest(d, bad)


def test_filter_chat_records_by_the_judges_loss(tmp_path):
    tok = byte_tokenizer()
    cfg = model.tiny(vocab_size=264, bos_token_id=tok.special["bos"],
                     eos_token_ids=tuple(tok.stop_ids), pad_token_id=tok.special["pad"],
                     num_layers=2, moe_layers=(), nope_layers=(1,))
    params = model.init_params(cfg, jax.random.key(0))
    checkpoints.save(tmp_path / "judge", cfg, params)
    tok.tk.save(str(tmp_path / "judge" / "tokenizer.json"))
    records = [[{"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": "ab" * (i % 4 + 1)}] for i in range(6)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in records))
    out = tmp_path / "hard.jsonl"
    main(["--judge", str(tmp_path / "judge"), "--data", str(data), "--out", str(out),
          "--drop-fraction", "0.5", "--seq", "48", "--batch", "4"])
    report = json.loads((tmp_path / "hard.jsonl.report.json").read_text())
    # The judge's loss on each record alone, unpadded, from model.forward.
    direct = []
    for m in records:
        doc = chat_document(tok, m)
        logits = model.forward(cfg, params, doc.ids[None, :-1])[0]
        logp = jax.nn.log_softmax(logits, -1)[np.arange(len(doc.ids) - 1), doc.ids[1:]]
        direct.append(float(-(logp * doc.weights[1:]).sum() / doc.weights[1:].sum()))
    np.testing.assert_allclose([x["judge_loss"] for x in report["lines"]], direct, rtol=1e-5)
    kept = keep_hardest(np.array(direct), 0.5)
    assert [x["kept"] for x in report["lines"]] == kept.tolist() and report["dropped"] == 3
    lines = data.read_text().splitlines(keepends=True)
    assert out.read_text() == "".join(ln for ln, k in zip(lines, kept) if k)


def test_bad_fraction_writes_nothing(tmp_path):
    with pytest.raises(SystemExit, match="--drop-fraction must be in"):
        main(["--judge", str(tmp_path), "--data", str(tmp_path / "x.jsonl"),
              "--out", str(tmp_path / "o.jsonl"), "--drop-fraction", "1.5"])
    assert list(tmp_path.iterdir()) == []
