"""The post-training recipe end to end at --size smoke from a tiny base: every stage runs its
command and records its figures, the results file has every stage's table, a second call
reads the records back instead of training again. The recipe runs in a subprocess: it sets a
compilation cache of its own, which must not outlive it in the test process."""
import json
import subprocess
import sys

import jax
import pytest

import checkpoints
import model
from experiments import post_train
from tests.runs import cached_env
from training import byte_tokenizer, read_metrics


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tok = byte_tokenizer()
    cfg = model.tiny(vocab_size=tok.vocab_size, bos_token_id=tok.special["bos"],
                     eos_token_ids=tuple(tok.stop_ids), pad_token_id=tok.special["pad"],
                     num_layers=2, moe_layers=(1,), nope_layers=(1,))
    path = tmp_path_factory.mktemp("base") / "model"
    checkpoints.save(path, cfg, model.init_params(cfg, jax.random.key(0)))
    tok.tk.save(str(path / "tokenizer.json"))
    return str(path)


def test_smoke_recipe_runs_every_stage(tmp_path, base):
    out = tmp_path / "pt"
    cmd = [sys.executable, "-m", "experiments.post_train", "--size", "smoke", "--seeds", "1",
           "--base", base, "--out", str(out)]
    env = cached_env(tmp_path)
    _run(cmd, env)
    records = json.loads((out / "records.json").read_text())
    stages = ("data", "base_eval", "filter", "sft/0", "grpo/0", "dpo/0", "teacher",
              "student_hard/0", "student_distill/0")
    assert set(records) == set(stages)  # no quickstart: --base was given
    steps = post_train.SIZES["smoke"].stage
    for run, stage in (("sft0", "sft"), ("grpo0", "grpo"), ("dpo0", "dpo"),
                       ("student_hard0", "distill"), ("student_distill0", "distill")):
        assert [m["step"] for m in read_metrics(str(out / run))] == \
            list(range(1, steps[stage]["steps"] + 1)), run
    filt = records["filter"]
    assert filt["kept"] + filt["dropped"] == records["data"]["train_tasks"]
    assert len(records["grpo/0"]["pass_rate"]) == steps["grpo"]["steps"]
    for key in ("sft/0", "grpo/0", "dpo/0", "base_eval"):
        assert 0 <= records[key]["pass_greedy"] <= 1 and 0 <= records[key]["pass_sampled"] <= 1
    assert 0 <= records["dpo/0"]["held_reward_accuracy"] <= 1
    assert records["student_distill/0"]["held_bits"] > 0
    text = (out / "results" / "post_training.md").read_text()
    assert text.startswith("# Post-training, end to end\n\n    python -m experiments.post_train "
                           f"--size smoke --seeds 1 --base {base}\n")
    for heading in ("Easy-data filtering", "Held-out pass rate", "### GRPO", "### DPO",
                    "### Distillation", "## Findings"):
        assert heading in text
    assert (out / "results" / "post_training.png").stat().st_size > 0
    # Run again: every stage is read back from records.json, nothing retrained.
    stamp = (out / "sft0" / "metrics.jsonl").stat().st_mtime_ns
    _run(cmd, env)
    assert (out / "sft0" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert json.loads((out / "records.json").read_text()) == records


def _run(cmd, env):
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


def test_bad_base_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit, match="--base .* is not a directory"):
        post_train.main(["--size", "smoke", "--base", str(tmp_path / "none"),
                         "--out", str(tmp_path / "pt")])
    assert not (tmp_path / "pt").exists()
