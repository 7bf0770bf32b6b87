"""The generate command end to end: a tiny HF checkpoint with a tokenizer, streamed text out."""
import pytest

from experiments import generate
from tests.hf_models import make_hf_text_model
from tests.test_tokenizer import tok  # noqa: F401  (the small BPE tokenizer fixture)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):  # noqa: F811
    path, _ = make_hf_text_model(tmp_path_factory.mktemp("cli"), vocab_size=512)
    tok.tk.save(str(path / "tokenizer.json"))
    return path


def test_prompt_streams_text_and_speeds(ckpt, capsys):
    generate.main(["--ckpt", str(ckpt), "--prompt", "def fib(n):", "--max-new-tokens", "12"])
    out, err = capsys.readouterr()
    assert out.startswith("def fib(n):") and len(out) > len("def fib(n):\n")
    assert "prefill:" in err and "decode:" in err


def test_chat_and_sampling_flags(ckpt, capsys):
    generate.main(["--ckpt", str(ckpt), "--prompt", "hello", "--chat", "--max-new-tokens", "6",
                   "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--seed", "3"])
    assert "decode:" in capsys.readouterr().err


def test_prompt_ids_without_tokenizer(ckpt, capsys):
    generate.main(["--ckpt", str(ckpt), "--prompt-ids", "5,6,7", "--max-new-tokens", "5"])
    out = capsys.readouterr().out.split()
    assert 0 < len(out) <= 5 and all(t.isdigit() for t in out)


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
    return path


@pytest.mark.parametrize("chat", [False, True])
def test_image_prompt(mm_ckpt, tmp_path, capsys, chat):
    from PIL import Image
    import numpy as np
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 40, 3), np.uint8)).save(image)
    generate.main(["--ckpt", str(mm_ckpt), "--prompt", "what is this?", "--image", str(image),
                   "--max-new-tokens", "4", *(["--chat"] if chat else [])])
    err = capsys.readouterr().err
    assert "decode:" in err
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit):
        generate.main(["--ckpt", str(mm_ckpt), "--prompt", "x", "--image", str(tmp_path / "bad.png")])
    assert "cannot read the image" in capsys.readouterr().err
