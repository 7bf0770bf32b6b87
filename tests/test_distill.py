"""Distillation end to end on the train loop: a student taught by a deeper, wider teacher ends
below the same student trained on the data's tokens alone, resumes exactly, runs sharded as on
one device; a teacher with another vocabulary is refused."""
import jax
import numpy as np
import pytest

import model
import training
from experiments.train_objectives import check_vocabulary
from model.config import ConfigError
from training import byte_tokenizer, pack, read_metrics
from training.data import Rows
from training.distill import Distill
from training.scoring import score_tokens
from training.text import text_document

SEQ = 32


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _cfg(tok, layers, width, moe=True):
    return model.tiny(vocab_size=264, bos_token_id=tok.special["bos"],
                      eos_token_ids=tuple(tok.stop_ids), pad_token_id=tok.special["pad"],
                      num_layers=layers, moe_layers=(layers - 1,) if moe else (),
                      nope_layers=(layers - 1,), hidden_size=width)


@pytest.fixture(scope="module")
def rows(tok):
    """Text with structure to learn: words drawn at random, each followed by "=" and a digit."""
    r = np.random.default_rng(0)
    words = r.choice(["alpha", "beta", "gamma", "delta", "eps"], 3000)
    text = " ".join(f"{w}={i % 7}" for i, w in enumerate(words))
    return pack([text_document(tok, text)], "text", SEQ, tok.special["pad"])


def _part(rows, lo, hi):
    return Rows(rows.tokens[lo:hi], rows.weights[lo:hi], rows.real[lo:hi])


def _train(cfg, params, rows, out, steps, objective=None, **run):
    state, history = training.train(
        cfg, lambda: params, rows,
        training.RunConfig(out=str(out), batch=8, seq=SEQ, progress=False, async_save=False,
                           **{"save_every": 1000, **run}),
        training.OptimConfig(lr=1e-2, warmup=2, steps=steps), objective=objective)
    return state["params"], history


def _held_out_ce(cfg, params, held):
    logp = score_tokens(cfg, params, held.tokens, 16)
    w = held.weights[:, 1:]
    return float(-(logp * w).sum() / w.sum())


def test_distilled_student_beats_the_same_student_on_hard_targets(tmp_path, tok, rows):
    """The teacher (4 dense layers, width 64) learns from 500 rows; the student (2 layers, one
    MoE, width 32) sees 16 of them for 40 steps, with the teacher or without."""
    teacher_cfg, student_cfg = _cfg(tok, 4, 64, moe=False), _cfg(tok, 2, 32)
    train, held, few = _part(rows, 0, 500), _part(rows, 500, len(rows)), _part(rows, 0, 16)
    teacher, _ = _train(teacher_cfg, model.init_params(teacher_cfg, jax.random.key(1)), train,
                        tmp_path / "teacher", 60)
    start = model.init_params(student_cfg, jax.random.key(0))
    hard, _ = _train(student_cfg, start, few, tmp_path / "hard", 40)
    taught, history = _train(student_cfg, start, few, tmp_path / "kd", 40,
                             Distill(teacher=(teacher_cfg, teacher), distill_rule="gradnorm",
                                     distill_temperature=1.0))
    ce = {name: _held_out_ce(student_cfg, p, held) for name, p in (("hard", hard),
                                                                   ("taught", taught))}
    assert _held_out_ce(teacher_cfg, teacher, held) < ce["taught"] < ce["hard"], ce
    # The gradnorm rule moves the soft weight as the student closes on the teacher.
    w = [m["soft_weight"] for m in history]
    assert w[-1] > w[0] + 0.05 and all(0 < x < 1 for x in w), w
    assert history[-1]["teacher_ce"] < history[-1]["ce"] and history[-1]["kl"] > 0


@pytest.mark.slow
def test_distill_resumes_exactly_and_sharded_equals_one_device(tmp_path, tok, rows):
    teacher_cfg, student_cfg = _cfg(tok, 4, 64), _cfg(tok, 2, 32)
    obj = Distill(teacher=(teacher_cfg, model.init_params(teacher_cfg, jax.random.key(1))),
                  distill_rule="confidence")
    start = model.init_params(student_cfg, jax.random.key(0))
    data = _part(rows, 0, 32)
    one, _ = _train(student_cfg, start, data, tmp_path / "one", 4, obj)
    mesh = "data=2,fsdp=2,tensor=2"
    _train(student_cfg, start, data, tmp_path / "mesh", 4, obj, mesh=mesh, stop_at=2,
           save_every=2)
    split, _ = _train(student_cfg, start, data, tmp_path / "mesh", 4, obj, mesh=mesh,
                      resume=True, save_every=2)
    h_one, h_split = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "mesh"))
    assert [m["step"] for m in h_split] == [1, 2, 3, 4]
    for key in ("loss", "ce", "kl", "soft_weight", "teacher_ce"):
        np.testing.assert_allclose([m[key] for m in h_split], [m[key] for m in h_one],
                                   rtol=1e-5)
    for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(one)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, tok):
    student = _cfg(tok, 2, 32)
    with pytest.raises(ConfigError, match="teacher .* vocabulary of 512 tokens, the model "
                                          "trained 264"):
        check_vocabulary(student, tok, student.replace_text(vocab_size=512), str(tmp_path),
                         "teacher")
    # The same size, another tokenizer: the same ids would mean other tokens.
    other = byte_tokenizer()
    other.tk.add_tokens(["zzz"])
    other.tk.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="teacher's tokenizer .* differs"):
        check_vocabulary(student, tok, student, str(tmp_path), "teacher")


def test_bad_distillation_settings(tok):
    teacher = (_cfg(tok, 2, 32), None)
    with pytest.raises(training.SettingsError, match="distill_rule .* got 'soft'"):
        Distill(teacher=teacher, distill_rule="soft")
    with pytest.raises(training.SettingsError, match="soft_weight"):
        Distill(teacher=teacher, distill_rule="fixed", soft_weight=1.5)
