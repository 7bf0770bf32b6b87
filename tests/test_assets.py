"""generation_config.json read as HF reads it: stop tokens always, sampling settings only with
do_sample (HF decodes greedily otherwise, whatever temperature the file holds)."""
import json

import pytest

from checkpoints import CheckpointError
from checkpoints.assets import generation_defaults


def defaults(tmp_path, content, vocab=1000):
    (tmp_path / "generation_config.json").write_text(
        content if isinstance(content, str) else json.dumps(content))
    return generation_defaults(tmp_path, vocab)


def test_without_do_sample_only_the_stop_tokens(tmp_path):
    assert generation_defaults(tmp_path, 1000) == {}  # no file
    assert defaults(tmp_path, {"eos_token_id": [1, 7, 8], "temperature": 0.6, "top_p": 0.9}) == \
        {"stop_tokens": [1, 7, 8]}
    assert defaults(tmp_path, {"eos_token_id": 2, "do_sample": False}) == {"stop_tokens": [2]}


def test_do_sample_takes_hf_defaults_for_what_is_left_out(tmp_path):
    # Meta's published Instruct settings, and HF's defaults for top_k (50) and top_p (1: none)
    assert defaults(tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.9}) == \
        {"temperature": 0.6, "top_k": 50, "top_p": 0.9}
    assert defaults(tmp_path, {"do_sample": True}) == {"temperature": 1.0, "top_k": 50,
                                                       "top_p": None}
    assert defaults(tmp_path, {"do_sample": True, "top_k": 0}) == {"temperature": 1.0,
                                                                   "top_k": None, "top_p": None}
    assert defaults(tmp_path, {"do_sample": True}, vocab=20)["top_k"] == 20  # HF clamps it


@pytest.mark.parametrize("content, message", [
    ("{oops", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ({"eos_token_id": 5000}, r"eos_token_id 5000 is not a token id .* vocabulary 0\.\.999"),
    ({"eos_token_id": [1, "x"]}, r"eos_token_id \[1, 'x'\] is not a token id"),
])
def test_bad_file_is_one_error_naming_it(tmp_path, content, message):
    with pytest.raises(CheckpointError, match=f"generation_config.json.*{message}"):
        defaults(tmp_path, content)
