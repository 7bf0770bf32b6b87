"""Tokenizer and chat layout, on a small BPE tokenizer built here (the real one cannot be
downloaded), checked against HF's own Llama 4 chat template."""
import json

import pytest

from experiments.tiny_checkpoint import train_tokenizer
from model.tokenizer import SPECIAL, Tokenizer

CORPUS = ["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
          "Hello, world! héllo wörld 世界 🙂", "The quick brown fox jumps over the lazy dog."] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(CORPUS, 400).save(str(path))
    return Tokenizer.load(path.parent)


def test_round_trip_and_single_bos(tok):
    text = "def fib(n): héllo 世界 🙂"
    ids = tok.encode(text)
    assert ids[0] == tok.special["bos"] and ids[1] != tok.special["bos"]
    assert tok.decode(ids) == text
    assert tok.encode(text, bos=False) == ids[1:]


def test_chat_layout(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "tool", "content": "42"}]
    ids = tok.encode_chat(msgs)
    assert ids.count(tok.special["bos"]) == 1 and ids[0] == tok.special["bos"]
    assert ids.count(tok.special["eot"]) == 4
    text = tok.decode(ids, skip_special=False)
    assert text.startswith("<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>")
    assert "<|header_start|>ipython<|header_end|>\n\n42<|eot|>" in text
    assert text.endswith("<|header_start|>assistant<|header_end|>\n\n")


def test_chat_matches_hf_template(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama4.processing_llama4 import chat_template
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tk, bos_token=SPECIAL["bos"])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "fib?"}]
    hf_ids = fast.apply_chat_template(msgs, chat_template=chat_template, tokenize=True,
                                      add_generation_prompt=True, return_dict=False)
    assert tok.encode_chat(msgs) == list(hf_ids)


def test_stream_holds_back_partial_characters(tok):
    text = "héllo 世界 🙂 fib"
    ids = tok.encode(text, bos=False)
    pieces = list(tok.stream(ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_ids(tok):
    assert set(tok.stop_ids) == {tok.special[n] for n in ("eos", "eom", "eot")}


def test_bad_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
