"""Orbax directories cannot be damaged in silence: the integrity record names what changed, and
checkpoint.json fields that are missing or malformed are one clear error each."""
import json
import re
import shutil

import numpy as np
import pytest
from flax import traverse_util

import checkpoints
from checkpoints import conversion
from checkpoints.convert import main
from tests.hf_models import make_hf_text_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(a pristine Orbax directory, its params as loaded)."""
    root = tmp_path_factory.mktemp("integrity")
    src, _ = make_hf_text_model(root, name="hf", num_hidden_layers=5)
    conversion.hf_to_orbax(src, root / "orbax", progress=False)
    return root / "orbax", checkpoints.load(root / "orbax")[1]


@pytest.fixture
def copy(converted, tmp_path):
    dst = tmp_path / "orbax"
    shutil.copytree(converted[0], dst)
    return dst


def flat(params) -> dict[str, np.ndarray]:
    return {"/".join(p): np.asarray(x) for p, x in traverse_util.flatten_dict(params).items()}


def test_flipped_bytes_name_the_damaged_arrays(converted, copy):
    data = max(copy.glob("params/**/d/*"), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 8):
        raw[i] ^= 0xFF
    data.write_bytes(bytes(raw))
    # Unchecked, the damage loads in silence: these arrays changed.
    _, unchecked = checkpoints.load(copy, verify=False)
    before, after = flat(converted[1]), flat(unchecked)
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k], equal_nan=True))
    assert changed
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.load(copy)
    msg = str(e.value)
    assert f"{len(changed)} damaged array(s): " in msg and "\n" not in msg, msg
    named = re.findall(r"([\w/]+) \(its bytes differ from those written\)", msg)
    assert sorted(named) == changed, msg
    assert "verify=False (--no-verify)" in msg
    # Loading into another dtype, and converting back to HF, hash the stored bytes instead.
    for read in (lambda: checkpoints.load(copy, dtype="bfloat16"),
                 lambda: conversion.orbax_to_hf(copy, copy.parent / "hf", progress=False)):
        with pytest.raises(checkpoints.CheckpointError) as e:
            read()
        assert str(e.value) == msg
    assert not (copy.parent / "hf").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_an_edited_stored_dtype_is_refused(copy, dtype):
    meta = json.loads((copy / "checkpoint.json").read_text())
    (copy / "checkpoint.json").write_text(json.dumps({**meta, "param_dtype": dtype}))
    with pytest.raises(checkpoints.CheckpointError,
                       match=f"checkpoint.json field 'param_dtype' is '{dtype}', written as "
                             "'float32'"):
        checkpoints.load(copy)


def test_an_edited_config_is_refused(copy):
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "rope_theta": 1000.0}))
    with pytest.raises(checkpoints.CheckpointError,
                       match="config.json differs from the one written with the weights"):
        checkpoints.load(copy)


def test_conversion_back_checks_too_unless_told_not_to(copy, tmp_path, capsys):
    (copy / "integrity.json").unlink()
    assert main([str(copy), str(tmp_path / "hf"), "--to", "hf"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no integrity.json" in err and "--no-verify" in err
    assert not (tmp_path / "hf").exists()
    assert main([str(copy), str(tmp_path / "hf"), "--to", "hf", "--no-verify"]) == 0


def test_a_damaged_record_is_one_error(copy):
    (copy / "integrity.json").write_text("[1, 2")
    with pytest.raises(checkpoints.CheckpointError, match="integrity.json is damaged"):
        checkpoints.load(copy)


def test_save_writes_a_record_that_load_checks(converted, tmp_path):
    cfg, params = checkpoints.load(converted[0])
    checkpoints.save(tmp_path / "saved", cfg, params)
    record = json.loads((tmp_path / "saved" / "integrity.json").read_text())
    assert sorted(record["arrays"]) == sorted(flat(params))
    _, again = checkpoints.load(tmp_path / "saved")
    assert all(np.array_equal(a, b) for a, b in zip(flat(params).values(), flat(again).values()))


@pytest.mark.parametrize("edit, message", [
    (lambda m: [m], "checkpoint.json must hold a JSON object, got list"),
    (lambda m: {k: v for k, v in m.items() if k != "param_dtype"}, "has no 'param_dtype' field"),
    (lambda m: {k: v for k, v in m.items() if k != "hf_layout"}, "has no 'hf_layout' field"),
    (lambda m: {**m, "param_dtype": "int8"},
     "param_dtype 'int8' is not one of ['float32', 'bfloat16', 'float16']"),
    (lambda m: {**m, "param_dtype": ["float32"]}, "param_dtype ['float32'] is not one of"),
    (lambda m: {**m, "hf_layout": "mystery"},
     "hf_layout 'mystery' is not one of ['causal_lm', 'conditional_generation']"),
])
def test_malformed_metadata_is_one_clear_error(copy, edit, message):
    meta = json.loads((copy / "checkpoint.json").read_text())
    (copy / "checkpoint.json").write_text(json.dumps(edit(meta)))
    for verify in (True, False):
        with pytest.raises(checkpoints.CheckpointError, match=re.escape(message)):
            checkpoints.load(copy, verify=verify)


def test_a_load_hashes_what_it_read_instead_of_reading_again(converted, monkeypatch):
    """What makes the default check cheap (experiments/bench_integrity.py): in one process, in
    the stored dtype, the stores are not read a second time."""
    from checkpoints import integrity

    def read_again(store, *a):
        raise AssertionError("read the stored bytes again")
    monkeypatch.setattr(integrity, "digest", read_again)
    checkpoints.load(converted[0])
    with pytest.raises(AssertionError, match="read the stored bytes again"):
        checkpoints.load(converted[0], dtype="bfloat16")
