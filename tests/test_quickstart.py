"""The README's main job, `python -m experiments.quickstart`, through its real code path for a few
steps: data from the stdlib, training, the checkpoint reloaded and exported, a completion."""
import json

import pytest

import checkpoints
from experiments import quickstart


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    quickstart.main(["--out", str(out), "--steps", "8", "--max-new-tokens", "16"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == list(range(1, 9))
    assert history[-1]["ce"] < history[0]["ce"]                      # it learned something
    assert summary["completion"].startswith(quickstart.PROMPT)
    assert len(summary["completion"]) > len(quickstart.PROMPT)
    assert (out / "loss.png").stat().st_size > 0
    cfg, _ = checkpoints.load(out / "model")                           # the exported checkpoint
    assert cfg == quickstart.quickstart_config(quickstart.training.byte_tokenizer()).replace(
        param_dtype=cfg.param_dtype)
    assert "wall time" in capsys.readouterr().out
