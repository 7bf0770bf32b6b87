"""The generate command end to end: a tiny HF checkpoint with a tokenizer, streamed text out,
held equal to what model.generate gives for the same prompt and sampling settings."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import checkpoints
import model
from experiments import generate
from tests.hf_models import make_hf_text_model
from tests.test_tokenizer import tok  # noqa: F401  (the small BPE tokenizer fixture)


def expected_new_tokens(ckpt, ids, stop, pixel_values=None, **sampling):
    """The tokens model.generate gives after the prompt `ids`, up to the first stop token."""
    cfg, params = checkpoints.load(ckpt)
    out = model.generate(cfg, params, [ids], pixel_values=pixel_values, stop_tokens=stop,
                         **sampling)[0, len(ids):].tolist()
    return next((out[:i] for i, t in enumerate(out) if t in stop), out)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):  # noqa: F811
    path, _ = make_hf_text_model(tmp_path_factory.mktemp("cli"), vocab_size=512)
    tok.tk.save(str(path / "tokenizer.json"))
    # The tokenizer's stops, as a published generation_config.json lists them (save_pretrained
    # wrote the tiny config's eos_token_id, 2)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.stop_ids}))
    return path


def test_prompt_streams_text_and_speeds(ckpt, tok, capsys):  # noqa: F811
    generate.main(["--ckpt", str(ckpt), "--prompt", "def fib(n):", "--max-new-tokens", "12",
                   "--stream-every", "5"])
    out, err = capsys.readouterr()
    ids = tok.encode("def fib(n):")
    new = expected_new_tokens(ckpt, ids, tok.stop_ids, max_new_tokens=12)
    assert new and out == "def fib(n):" + "".join(tok.stream(new))  # text as it streams
    # the compiles are announced; decode's is timed apart from decoding
    assert f"prefill: compiling and running {len(ids)} prompt tokens...\n" \
           "compiling decode for 5 steps a call...\n" in err
    assert f"decode: {len(new)} tokens in " in err and "s before)" in err and "prefill:" in err


def test_generation_config_sets_the_defaults_and_flags_override_it(ckpt, tok, tmp_path,  # noqa: F811
                                                                     capsys):
    sampled = tmp_path / "sampled"
    shutil.copytree(ckpt, sampled)
    stop = tok.stop_ids[-1:]
    (sampled / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9, "eos_token_id": stop}))
    ids = tok.encode("def fib(n):")
    generate.main(["--ckpt", str(sampled), "--prompt", "def fib(n):", "--max-new-tokens", "8"])
    out, err = capsys.readouterr()
    new = expected_new_tokens(sampled, ids, stop, max_new_tokens=8, temperature=0.8, top_k=20,
                              top_p=0.9)
    assert out == "def fib(n):" + "".join(tok.stream(new))
    assert (f"from generation_config.json: temperature 0.8, top_k 20, top_p 0.9, stop_tokens "
            f"{stop}\n") in err
    generate.main(["--ckpt", str(sampled), "--prompt", "def fib(n):", "--max-new-tokens", "8",
                   "--temperature", "0"])
    out, err = capsys.readouterr()
    assert out == "def fib(n):" + "".join(tok.stream(expected_new_tokens(
        sampled, ids, stop, max_new_tokens=8)))
    assert f"from generation_config.json: stop_tokens {stop}\n" in err


def test_a_checkpoint_without_a_tokenizer_names_the_flag(ckpt, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(SystemExit):
        generate.main(["--ckpt", str(bare), "--prompt", "hi"])
    assert capsys.readouterr().err == (f"error: {bare} carries no tokenizer.json (looked in "
                                       f"{bare}); pass --tokenizer FILE, or token ids with "
                                       "--prompt-ids\n")
    generate.main(["--ckpt", str(bare), "--tokenizer", str(ckpt / "tokenizer.json"), "--prompt",
                   "hi", "--max-new-tokens", "2"])
    assert capsys.readouterr().out.startswith("hi")


@pytest.mark.slow
def test_a_mesh_on_simulated_devices(ckpt, tok):  # noqa: F811
    """--mesh with --devices N in a fresh process (one CPU device by default): the same tokens
    as on one device."""
    run = subprocess.run([sys.executable, "-m", "experiments.generate", "--ckpt", str(ckpt),
                          "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--mesh", "tensor=2",
                          "--devices", "2"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(t) for t in expected_new_tokens(
        ckpt, [5, 6, 7], tok.stop_ids, max_new_tokens=6)]


def test_chat_and_sampling_flags(ckpt, tok, capsys):  # noqa: F811
    generate.main(["--ckpt", str(ckpt), "--prompt", "hello", "--chat", "--max-new-tokens", "6",
                   "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--seed", "3"])
    out = capsys.readouterr().out
    ids = tok.encode_chat([{"role": "user", "content": "hello"}])
    new = expected_new_tokens(ckpt, ids, tok.stop_ids, max_new_tokens=6, temperature=0.8,
                              top_p=0.9, top_k=20, seed=3)
    assert out == "".join(tok.stream(new))


def test_prompt_ids_without_tokenizer(ckpt, tok, capsys):  # noqa: F811
    generate.main(["--ckpt", str(ckpt), "--prompt-ids", "5,6,7", "--max-new-tokens", "5"])
    out = capsys.readouterr().out.split()
    new = expected_new_tokens(ckpt, [5, 6, 7], tok.stop_ids, max_new_tokens=5)  # the file's
    assert out == [str(t) for t in new]


@pytest.mark.parametrize("argv, message", [
    (["--prompt-ids", "5,x"], "comma-separated integers"),
    (["--prompt-ids", "5,100000"], "outside the vocabulary"),
    (["--prompt-ids", "5", "--max-new-tokens", "0"], "max_new_tokens"),
    (["--prompt-ids", "5", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--prompt-ids", "5", "--temperature", "nan"], "temperature must be a finite number >= 0"),
    (["--prompt-ids", "5", "--top-k", "0"], "top_k must be an integer in 1..512"),
    (["--prompt-ids", "5", "--top-p", "1.5"], "top_p must be a number in (0, 1]"),
    (["--prompt-ids", "5", "--top-p", "0"], "top_p must be a number in (0, 1]"),
    (["--prompt-ids", "5", "--stream-every", "-1"], "stream_every must be an integer of at least 1"),
    (["--prompt-ids", "5", "--chat"], "--chat wraps --prompt text in a user turn"),
])
def test_bad_input_is_one_line(ckpt, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        generate.main(["--ckpt", str(ckpt), *argv])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err


def test_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate.main(["--ckpt", str(tmp_path / "nope"), "--prompt-ids", "1"])
    assert "error:" in capsys.readouterr().err


@pytest.fixture(scope="module")
def mm_ckpt(tmp_path_factory, tok):  # noqa: F811
    from tests.hf_models import make_hf_multimodal_model
    path, _ = make_hf_multimodal_model(
        tmp_path_factory.mktemp("cli_mm"), vocab_size=512,
        top=dict(image_token_index=tok.special["patch"], boi_token_index=tok.special["image_start"],
                 eoi_token_index=tok.special["image_end"]))
    tok.tk.save(str(path / "tokenizer.json"))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.stop_ids}))
    return path


@pytest.mark.parametrize("chat", [False, True])
def test_image_prompt(mm_ckpt, tok, tmp_path, capsys, chat):  # noqa: F811
    from PIL import Image
    import numpy as np
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 40, 3), np.uint8)).save(image)
    argv = ["--ckpt", str(mm_ckpt), "--prompt", "what is this?", "--image", str(image),
            "--max-new-tokens", "4", *(["--chat"] if chat else [])]
    generate.main(argv)
    out = capsys.readouterr().out
    # The same prompt through the Python API: the image's tiles and token layout, then generate.
    args = generate.parse_args(argv)
    cfg, _ = checkpoints.load(mm_ckpt)
    text_ids = (tok.encode_chat([{"role": "user", "content": args.prompt}]) if chat
                else tok.encode(args.prompt))
    ids, pixels = generate.image_prompt(cfg, tok, args, text_ids)
    assert int(np.sum(np.asarray(ids) == cfg.image_token_id)) == len(pixels) * 16
    new = expected_new_tokens(mm_ckpt, list(ids), tok.stop_ids, pixel_values=pixels,
                              max_new_tokens=4)
    assert out == ("" if chat else args.prompt) + "".join(tok.stream(new))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit):
        generate.main(["--ckpt", str(mm_ckpt), "--prompt", "x", "--image", str(tmp_path / "bad.png")])
    assert "cannot read the image" in capsys.readouterr().err
