"""A new user's whole path through the command lines, on a tiny checkpoint in the published
layout with every non-weight file (experiments.tiny_checkpoint): convert HF -> Orbax, chat with
it, fine-tune it on chat records, chat with the run, export the run to HF; transformers then
loads the export, its tokenizer encodes as ours, and its logits are ours (fp32, 1e-4 relative,
as tests/test_parity.py)."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import checkpoints
import model
from checkpoints.convert import main as convert
from experiments import generate, tiny_checkpoint, train
from model.tokenizer import Tokenizer

NON_WEIGHT = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "generation_config.json", "preprocessor_config.json"]


def chat(ckpt, capsys) -> str:
    generate.main(["--ckpt", str(ckpt), "--prompt", "What is 2 + 2?", "--chat",
                   "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    # the checkpoint's sampling defaults as HF reads the file (Meta's 0.6 and 0.9; top-k 50 where
    # it sets none) and its three stop tokens
    assert "from generation_config.json: temperature 0.6, top_k 50, top_p 0.9, stop_tokens [" \
        in err, err
    assert "decode: " in err
    return out


@pytest.mark.slow  # each step alone: tests/test_runs.py, tests/test_generate_cli.py
def test_convert_chat_finetune_chat_export(tmp_path, capsys):
    hf = tiny_checkpoint.build(tmp_path / "hf", files=2)
    orbax, run, export = tmp_path / "orbax", tmp_path / "runs" / "ft", tmp_path / "export"

    assert convert([str(hf), str(orbax)]) == 0
    for name in NON_WEIGHT:
        assert (orbax / name).read_bytes() == (hf / name).read_bytes(), name
    chat(orbax, capsys)

    records = tmp_path / "chat.jsonl"
    records.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": f"{2 * i}."}]}) + "\n" for i in range(16)))
    train.main(["--init", str(orbax), "--data", str(records), "--out", str(run), "--steps", "2",
                "--batch", "2", "--seq", "32", "--warmup", "1", "--save-every", "2",
                "--no-progress", "--no-async"])
    capsys.readouterr()
    chat(run, capsys)  # the run is a checkpoint, with its tokenizer

    assert convert([str(run), str(export), "--to", "hf"]) == 0
    for name in NON_WEIGHT:
        assert (export / name).read_bytes() == (hf / name).read_bytes(), name
    ours = Tokenizer.load(export)
    text = "def add(a, b):\n    return a + b\n"
    ids = ours.encode(text)
    assert AutoTokenizer.from_pretrained(export)(text)["input_ids"] == ids

    cfg, params = checkpoints.load(run)
    _, init = checkpoints.load(hf)
    assert not np.array_equal(params["embed"]["embedding"], init["embed"]["embedding"])  # trained
    hf_model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits.numpy()
    got = np.asarray(model.forward(cfg, params, [ids]))
    assert float(np.abs(got - ref).max() / np.abs(ref).max()) < 1e-4
