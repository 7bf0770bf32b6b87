"""Checkpoint conversion: HF <-> Orbax round trips, the key table against HF, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import AutoModel, Llama4ForConditionalGeneration

import checkpoints
import model
from checkpoints import conversion, keys
from checkpoints.convert import main
from tests.hf_models import make_hf_multimodal_model, make_hf_text_model, multimodal_config

REPO = Path(__file__).resolve().parents[1]


def tensors(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def leaves(params) -> dict[str, np.ndarray]:
    return {"/".join(p): np.asarray(x) for p, x in traverse_util.flatten_dict(params).items()}


CASES = {  # name: (builder, overrides)
    "scout_like": (make_hf_text_model, dict(num_hidden_layers=8)),          # 2 blocks of 4
    "maverick_like": (make_hf_text_model, dict(num_hidden_layers=8, interleave_moe_layer_step=2)),
    "six_layers": (make_hf_text_model, dict(num_hidden_layers=6, interleave_moe_layer_step=2)),
    "five_layers": (make_hf_text_model, dict(num_hidden_layers=5)),
    "multimodal": (make_hf_multimodal_model, dict(interleave_moe_layer_step=2)),
    "multimodal_sharded": (make_hf_multimodal_model, dict(max_shard_size="40KB")),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: build(root, name=name, **kw) for name, (build, kw) in CASES.items()}


@pytest.mark.parametrize("name", CASES)
def test_round_trip_is_byte_identical(name, hf_dirs, tmp_path):
    src, torch_model = hf_dirs[name]
    assert main([str(src), str(tmp_path / "orbax")]) == 0
    assert main([str(tmp_path / "orbax"), str(tmp_path / "back"), "--to", "hf"]) == 0
    before, after = tensors(src), tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for k in before:
        assert before[k].dtype == after[k].dtype and before[k].tobytes() == after[k].tobytes(), k
    # What we write back is what transformers reads: same class, config and weights.
    back = type(torch_model).from_pretrained(tmp_path / "back")
    for k, v in torch_model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)


def test_slabs_and_sharded_output(hf_dirs, tmp_path):
    """Tensors moved in many small slabs, written back as several shards with an index."""
    src, torch_model = hf_dirs["multimodal_sharded"]
    assert (src / "model.safetensors.index.json").exists()
    conversion.hf_to_orbax(src, tmp_path / "orbax", slab_bytes=4096, progress=False)
    meta = ocp.PyTreeCheckpointHandler().metadata(tmp_path / "orbax" / "params").tree
    assert meta["embed"]["embedding"].storage.chunk_shape == (32, 32)  # a slab is a chunk
    assert meta["lm_head"]["kernel"].storage.chunk_shape == (32, 32)
    conversion.orbax_to_hf(tmp_path / "orbax", tmp_path / "back", slab_bytes=4096,
                           max_shard_bytes=30_000, progress=False)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    before, after = tensors(src), tensors(tmp_path / "back")
    assert sorted(before) == sorted(index["weight_map"]) == sorted(after)
    assert all(before[k].tobytes() == after[k].tobytes() for k in before)
    back = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "back")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in torch_model.state_dict().items())


@pytest.mark.parametrize("cfg", [multimodal_config(model.tiny(moe_layers=(1, 3))),
                                 model.preset("scout"), model.preset("maverick")],
                         ids=["tiny_multimodal", "scout", "maverick"])
def test_key_table_covers_the_declared_tree(cfg):
    """Every slice of every leaf the modules declare is the target of exactly one HF tensor of
    the key table, with its shape (abstract: nothing is allocated)."""
    shapes = keys.param_shapes(cfg)
    seen = {}
    for key in keys.hf_keys(cfg, "conditional_generation"):
        for path in key.ours:
            assert shapes[path][len(key.index):] == key.shape, (key.hf, path)
            seen.setdefault(path, []).append(key.index)
    assert seen.keys() == shapes.keys()
    for path, indices in seen.items():
        stacked = shapes[path][:len(indices[0])]
        assert sorted(indices) == sorted(np.ndindex(*stacked)), path


def test_tree_follows_the_hf_definitions(hf_dirs):
    """The key table against HF's module definitions, leaf by leaf (a round trip alone would
    pass a mapping that is wrong but invertible, e.g. swapped gate/up or blocks/slots)."""
    src, m = hf_dirs["multimodal"]
    cfg, p = checkpoints.load(src)
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    t, period = cfg.text, cfg.text.period
    D, N, H, F = t.hidden_size, t.num_heads, t.head_dim, t.intermediate_size
    assert period == 4 and t.num_blocks == 1 and t.moe_layers == (1, 3)
    lm = "language_model.model.layers"
    eq = np.testing.assert_array_equal
    eq(p["embed"]["embedding"], sd["language_model.model.embed_tokens.weight"])
    eq(p["lm_head"]["kernel"], sd["language_model.lm_head.weight"].T)
    eq(p["final_norm"]["scale"], sd["language_model.model.norm.weight"])
    dense, moe = p["blocks"]["layer_2"], p["blocks"]["layer_3"]  # layer 2 dense, 3 MoE
    eq(dense["attn"]["q"][0], sd[f"{lm}.2.self_attn.q_proj.weight"].T.reshape(D, N, H))
    eq(dense["attn"]["o"][0], sd[f"{lm}.2.self_attn.o_proj.weight"].T.reshape(N, H, D))
    eq(dense["mlp"]["wi_up"][0], sd[f"{lm}.2.feed_forward.up_proj.weight"].T)
    eq(dense["ffn_norm"]["scale"][0], sd[f"{lm}.2.post_attention_layernorm.weight"])
    gate_up = sd[f"{lm}.3.feed_forward.experts.gate_up_proj"]
    eq(moe["moe"]["wi_gate"][0], gate_up[..., :F])
    eq(moe["moe"]["wi_up"][0], gate_up[..., F:])
    eq(moe["moe"]["wo"][0], sd[f"{lm}.3.feed_forward.experts.down_proj"])
    eq(moe["moe"]["router"][0], sd[f"{lm}.3.feed_forward.router.weight"].T)
    eq(moe["moe"]["shared"]["wo"][0], sd[f"{lm}.3.feed_forward.shared_expert.down_proj.weight"].T)
    v, vl = cfg.vision, p["vision"]["layers"]
    Dv, Nv = v.hidden_size, v.num_heads
    eq(vl["attn"]["k"][1], sd["vision_model.model.layers.1.self_attn.k_proj.weight"].T
       .reshape(Dv, Nv, Dv // Nv))
    eq(vl["attn"]["k_bias"][1], sd["vision_model.model.layers.1.self_attn.k_proj.bias"]
       .reshape(Nv, Dv // Nv))
    eq(vl["mlp"]["fc2"][1], sd["vision_model.model.layers.1.mlp.fc2.weight"].T)
    eq(p["vision"]["patch_embed"]["kernel"], sd["vision_model.patch_embedding.linear.weight"].T)
    eq(p["vision"]["adapter"]["fc1"], sd["vision_model.vision_adapter.mlp.fc1.weight"].T)
    eq(p["projector"]["kernel"], sd["multi_modal_projector.linear_1.weight"].T)


def test_stacked_layers_go_to_block_and_slot(hf_dirs):
    src, m = hf_dirs["scout_like"]  # 8 layers = 2 blocks of period 4
    _, p = checkpoints.load(src)
    w = m.state_dict()["model.layers.6.input_layernorm.weight"].numpy()
    np.testing.assert_array_equal(p["blocks"]["layer_2"]["attn_norm"]["scale"][1], w)


def test_hf_and_orbax_loads_agree(hf_dirs, tmp_path):
    src, _ = hf_dirs["multimodal"]
    conversion.hf_to_orbax(src, tmp_path / "orbax", progress=False)
    cfg_hf, from_hf = checkpoints.load(src)
    cfg_ob, from_ob = checkpoints.load(tmp_path / "orbax")
    assert cfg_hf == cfg_ob and cfg_ob.param_dtype == "float32"
    a, b = leaves(from_hf), leaves(from_ob)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(from_ob))
    # Sharded loading, through our API and through a stock Orbax restore (no handlers of ours).
    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    rows, whole = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s))
                   for s in (("x",), ()))
    shardings = jax.tree.map(lambda x: rows if x.shape[0] % n == 0 else whole, from_hf)
    _, sharded = checkpoints.load(tmp_path / "orbax", shardings=shardings)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          from_hf, shardings)
    stock = ocp.StandardCheckpointer().restore(tmp_path / "orbax" / "params", target)
    for tree in (sharded, stock):
        c = leaves(tree)
        assert all(np.array_equal(a[k], c[k]) for k in a)
        assert tree["embed"]["embedding"].sharding == rows


def test_bfloat16_conversion(hf_dirs, tmp_path):
    src, _ = hf_dirs["maverick_like"]
    assert main([str(src), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    cfg, params = checkpoints.load(tmp_path / "bf16")
    assert cfg.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
    _, f32 = checkpoints.load(src)
    a, b = leaves(f32), leaves(params)
    assert all(np.array_equal(a[k].astype(ml_dtypes.bfloat16), b[k]) for k in a)
    assert main([str(tmp_path / "bf16"), str(tmp_path / "back"), "--to", "hf"]) == 0
    with safe_open(tmp_path / "back" / "model.safetensors", framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModel.from_pretrained(tmp_path / "back").dtype == torch.bfloat16


def test_save_and_save_hf_from_memory(hf_dirs, tmp_path):
    src, _ = hf_dirs["six_layers"]
    cfg, params = checkpoints.load(src)
    checkpoints.save(tmp_path / "orbax", cfg, params)
    checkpoints.save_hf(tmp_path / "hf", cfg, params)
    _, again = checkpoints.load(tmp_path / "orbax")
    a, b = leaves(params), leaves(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    before, after = tensors(src), tensors(tmp_path / "hf")
    assert sorted(before) == sorted(after)
    assert all(np.array_equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------
# Bad input: one line on stderr naming the culprit, exit status 1, nothing left at DST.

def copy_hf(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite(path: Path, edit):
    t = tensors(path)
    edit(t)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})


def fails(capsys, args, *culprits):
    assert main([str(a) for a in args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for c in culprits:
        assert str(c) in err, err
    dst = Path(args[1])
    assert not any(p.name.startswith(f".{dst.name}.tmp-") for p in dst.parent.iterdir())
    return err


Q1 = "model.layers.1.self_attn.q_proj.weight"
EXTRA = "model.layers.0.self_attn.bogus.weight"


@pytest.mark.parametrize("edit, culprit", [
    (lambda t: t.pop(Q1), f"1 missing: {Q1}"),
    (lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}),
     "model.norm.weight [31] (expected [32])"),
    (lambda t: t.update({EXTRA: np.ones(3, np.float32)}), f"1 unexpected: {EXTRA}"),
], ids=["missing", "wrong_shape", "extra"])
def test_mismatched_tensor(edit, culprit, hf_dirs, tmp_path, capsys):
    src = copy_hf(hf_dirs["five_layers"][0], tmp_path / "src")
    rewrite(src, edit)
    fails(capsys, [src, tmp_path / "out"], culprit)
    assert not (tmp_path / "out").exists()


def test_every_mismatch_is_reported_at_once(hf_dirs, tmp_path, capsys):
    src = copy_hf(hf_dirs["five_layers"][0], tmp_path / "src")
    rewrite(src, lambda t: (t.pop(Q1), t.pop("lm_head.weight"),
                            t.update({EXTRA: np.ones(3, np.float32),
                                      "model.norm.weight": np.ones(31, np.float32)})))
    fails(capsys, [src, tmp_path / "out"], "2 missing", Q1, "lm_head.weight", EXTRA,
          "model.norm.weight [31]")


@pytest.mark.parametrize("damage, culprit", [
    (lambda b: b[:-100], "incomplete metadata"),
    (lambda b: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b[24:], "invalid JSON"),
], ids=["truncated", "corrupt_header"])
def test_damaged_safetensors(damage, culprit, hf_dirs, tmp_path, capsys):
    src = copy_hf(hf_dirs["five_layers"][0], tmp_path / "src")
    f = src / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    fails(capsys, [src, tmp_path / "out"], f, culprit)
    assert not (tmp_path / "out").exists()


def test_missing_shard(hf_dirs, tmp_path, capsys):
    src = copy_hf(hf_dirs["multimodal_sharded"][0], tmp_path / "src")
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    fails(capsys, [src, tmp_path / "out"], victim.name)
    assert not (tmp_path / "out").exists()


def test_unknown_config_field(hf_dirs, tmp_path, capsys):
    src = copy_hf(hf_dirs["five_layers"][0], tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "frobnication": 3}))
    fails(capsys, [src, tmp_path / "out"], "frobnication", src / "config.json")
    assert not (tmp_path / "out").exists()


def test_source_does_not_exist(tmp_path, capsys):
    fails(capsys, [tmp_path / "nowhere", tmp_path / "out"], tmp_path / "nowhere", "does not exist")
    fails(capsys, [tmp_path / "nowhere", tmp_path / "out", "--to", "hf"], tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()


def test_destination_exists(hf_dirs, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    fails(capsys, [hf_dirs["five_layers"][0], tmp_path / "out"], tmp_path / "out", "already exists")
    assert list((tmp_path / "out").iterdir()) == []


def test_damaged_orbax_data(hf_dirs, tmp_path):
    src = tmp_path / "orbax"
    conversion.hf_to_orbax(hf_dirs["five_layers"][0], src, progress=False)
    chunks = sorted((src / "params").rglob("d/*"), key=lambda f: f.stat().st_size)
    chunks[-1].write_bytes(chunks[-1].read_bytes()[:100])  # the largest data file, truncated
    with pytest.raises(checkpoints.CheckpointError, match=f"{src}: cannot read the parameters"):
        checkpoints.load(src)
    with pytest.raises(checkpoints.CheckpointError, match=f"{src}: cannot read "):
        conversion.orbax_to_hf(src, tmp_path / "hf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orbax"]  # no output, no staging dir


def test_failure_mid_write_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
    src = hf_dirs["maverick_like"][0]
    calls = []

    def flaky_read(self, name, rows, real=checkpoints.hf.HFCheckpoint.read):
        calls.append(name)
        if len(calls) == 20:
            raise OSError("disk on fire")
        return real(self, name, rows)

    monkeypatch.setattr(checkpoints.hf.HFCheckpoint, "read", flaky_read)
    with pytest.raises(Exception, match="disk on fire"):
        conversion.hf_to_orbax(src, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_one_line_without_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "checkpoints.convert", str(tmp_path / "nowhere"),
                          str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 1
    assert run.stderr == f"error: {tmp_path / 'nowhere'} does not exist\n"
