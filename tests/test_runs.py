"""Training runs as checkpoints: a run directory (its latest step) or one step of it loads and
converts to Orbax and to HF like any checkpoint, carrying the files it was trained with."""
import json

import numpy as np
import pytest
from flax import traverse_util

import checkpoints
from checkpoints import conversion
from checkpoints.convert import main as convert
from experiments.train import main as train
from tests.hf_models import make_hf_text_model
from training import byte_tokenizer

# Non-weight files of the checkpoint fine-tuned (generation_config.json: save_pretrained's own)
FILES = {"tokenizer_config.json": '{"tokenizer_class": "X"}\n', "chat_template.jinja": "{{ x }}\n",
         "preprocessor_config.json": '{"size": {"height": 32, "width": 32}}\n'}


def leaves(params) -> dict[str, np.ndarray]:
    return {"/".join(p): np.asarray(x) for p, x in traverse_util.flatten_dict(params).items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An HF checkpoint with a tokenizer and its other files, fine-tuned for 2 steps (a
    checkpoint at each): OUT holds steps 1 and 2."""
    root = tmp_path_factory.mktemp("runs")
    hf, _ = make_hf_text_model(root, vocab_size=300)
    byte_tokenizer().tk.save(str(hf / "tokenizer.json"))
    for name, text in FILES.items():
        (hf / name).write_text(text)
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": f"{2 * i}."}]}) + "\n" for i in range(20)))
    out = root / "ft"
    train(["--init", str(hf), "--data", str(chat), "--out", str(out), "--steps", "2", "--batch",
           "2", "--seq", "32", "--save-every", "1", "--warmup", "1", "--lr", "1e-2",
           "--no-progress", "--no-async"])
    return hf, out


def test_a_run_and_its_steps_load_like_checkpoints(run):
    hf, out = run
    cfg, latest = checkpoints.load(out)
    cfg2, step2 = checkpoints.load(out / "2")
    _, step1 = checkpoints.load(out / "1")
    _, init = checkpoints.load(hf)
    assert cfg == cfg2 and cfg.param_dtype == "float32" and cfg.vision is None
    a, b, c, d = map(leaves, (latest, step2, step1, init))
    assert a.keys() == b.keys() == c.keys() == d.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)        # the run is its latest step
    assert any(not np.array_equal(b[k], c[k]) for k in b)    # a step is that step
    assert any(not np.array_equal(a[k], d[k]) for k in a)    # and training changed the weights


@pytest.mark.parametrize("to", ["orbax", "hf"])
@pytest.mark.parametrize("step", [None, "1"])
def test_a_run_converts_with_its_files(run, tmp_path, to, step):
    hf, out = run
    src = out if step is None else out / step
    dst = tmp_path / "converted"
    assert convert([str(src), str(dst), "--to", to]) == 0
    _, want = checkpoints.load(src)
    _, got = checkpoints.load(dst)
    want, got = leaves(want), leaves(got)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    for name in [*FILES, "tokenizer.json", "generation_config.json"]:  # the init's, via the run
        assert (dst / name).read_bytes() == (hf / name).read_bytes(), name


def test_hf_to_orbax_to_hf_carries_the_files_both_ways(run, tmp_path):
    hf, _ = run
    conversion.hf_to_orbax(hf, tmp_path / "orbax", progress=False)
    conversion.orbax_to_hf(tmp_path / "orbax", tmp_path / "back", progress=False)
    for name in [*FILES, "tokenizer.json", "generation_config.json"]:
        assert (tmp_path / "orbax" / name).read_bytes() == (hf / name).read_bytes(), name
        assert (tmp_path / "back" / name).read_bytes() == (hf / name).read_bytes(), name


def test_wrong_direction_names_the_right_one(run, tmp_path, capsys):
    hf, out = run
    conversion.hf_to_orbax(hf, tmp_path / "orbax", progress=False)
    for args, message in [([hf, tmp_path / "x", "--to", "hf"],
                           f"error: {hf} is an HF checkpoint already; it converts to Orbax "
                           "without --to hf"),
                          ([tmp_path / "orbax", tmp_path / "x"],
                           f"error: {tmp_path / 'orbax'} is an Orbax checkpoint already; to "
                           "convert it to HF, pass --to hf"),
                          ([tmp_path, tmp_path / "x"],
                           f"error: {tmp_path} is not a checkpoint: an HF directory holds "
                           "config.json and model.safetensors")]:
        assert convert([str(a) for a in args]) == 1
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_a_damaged_step_record_is_one_error(run, tmp_path):
    import shutil
    _, out = run
    copy = tmp_path / "ft"
    shutil.copytree(out, copy)
    (copy / "2" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(checkpoints.CheckpointError, match=f"{copy / '2' / 'meta'}: not a "
                                                          "training run's record"):
        checkpoints.load(copy)
    _, step1 = checkpoints.load(copy / "1")  # the other step is unharmed
    assert leaves(step1)
