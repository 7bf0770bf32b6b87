"""Quantized checkpoints (checkpoints/, model/quantization.py): convert --quantize streamed into
Orbax and loaded back as the recipe says, placed on a mesh with the scales split as their
weights; Meta's FP8 layout (checkpoints/fp8.py) written here tensor by tensor and loaded as it
is stored, with logits equal to HF's dequantized model run with fp8 expert inputs; bad input."""
import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
import model
import sharding
from checkpoints.convert import main
from model import quantization as Q
from tests.hf_models import make_hf_multimodal_model
from tests.test_checkpoints import fails

IDS = np.array([[1, 17, 33, 9, 100, 5, 71, 12, 40, 3, 8, 64], [1, 90, 4, 4, 23, 120, 7, 2, 11,
                                                               56, 19, 6]])
TEXT = "language_model.model."
# compressed-tensors' FP8_DYNAMIC scheme, as Meta's FP8 Maverick config.json states it
QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors", "format": "float-quantized",
    "quantization_status": "compressed", "kv_cache_scheme": None,
    "config_groups": {"group_0": {
        "targets": ["Linear"], "output_activations": None,
        "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                    "dynamic": False, "group_size": None, "observer": "minmax"},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                              "strategy": "token", "dynamic": True, "observer": None}}},
    "ignore": ["re:.*self_attn.*", "re:.*router.*", "re:.*shared_expert.*", "re:.*vision.*",
               "re:.*multi_modal_projector.*", "language_model.lm_head"],
}


def fp8_rows_torch(x):
    """fbgemm's quantize_fp8_per_row with Meta's activation bound 1200, and back (torch)."""
    m = x.abs().amax(-1, keepdim=True).clamp(1e-12, 1200.0)
    q = (x * (448.0 / m)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.float() * (m / 448.0)


def write_meta_fp8(src: Path, dst: Path, bf16_layers=()) -> dict:
    """The HF checkpoint `src` rewritten in Meta's FP8 layout at `dst`: each routed expert as
    gate/up/down_proj.weight float8_e4m3fn [out, in] with weight_scale [out, 1] bf16 (absmax
    / 448 per output row), but in `bf16_layers` (named in `ignore`) unquantized per expert.
    Returns {layer: (gate_up, down)} dequantized as HF's compressed-tensors loader does it
    (weight.float() * weight_scale.float()), in the fused [E, D, 2F], [E, F, D] layout."""
    dst.mkdir()
    state, out, dequantized = load_file(src / "model.safetensors"), {}, {}
    for name, w in state.items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name] = w
            continue
        i = int(name.split(".layers.")[1].split(".")[0])
        prefix = name.rsplit(".", 1)[0]
        F = state[prefix + ".down_proj"].shape[1]
        per_expert = ({"gate_proj": w[:, :, :F], "up_proj": w[:, :, F:]} if "gate_up" in name
                      else {"down_proj": w})
        for proj, stacked in per_expert.items():
            deq = []
            for e, we in enumerate(stacked):
                we = we.T.contiguous()                                          # [out, in]
                key = f"{prefix}.{e}.{proj}"
                if i in bf16_layers:
                    out[key + ".weight"] = we
                    continue
                scale = (we.abs().amax(1, keepdim=True) / 448.0).to(torch.bfloat16)
                out[key + ".weight"] = (we / scale.float()).clamp(-448, 448).to(
                    torch.float8_e4m3fn)
                out[key + ".weight_scale"] = scale
                deq.append((out[key + ".weight"].float() * scale.float()).T)
            if deq:
                dequantized.setdefault(i, {})[proj] = torch.stack(deq)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    ignore = [f"{TEXT}layers.{i}.feed_forward.experts" for i in bf16_layers]
    config["quantization_config"] = {**QUANTIZATION_CONFIG,
                                     "ignore": QUANTIZATION_CONFIG["ignore"] + ignore}
    (dst / "config.json").write_text(json.dumps(config))
    return {i: (torch.cat([d["gate_proj"], d["up_proj"]], -1), d["down_proj"])
            for i, d in dequantized.items()}


def hf_fp8_reference(hf, dequantized):
    """HF's model with the experts' weights dequantized and their inputs quantized per row to
    fp8 (the checkpoint's dynamic per-token input activations), in PyTorch."""
    for i, (gate_up, down) in dequantized.items():
        experts = hf.language_model.model.layers[i].feed_forward.experts
        experts.gate_up_proj.data.copy_(gate_up)
        experts.down_proj.data.copy_(down)

        def forward(h, ex=experts):  # Llama4TextExperts.forward, fp8 inputs to both products
            h = h.view(ex.gate_up_proj.shape[0], -1, ex.hidden_size)
            gate, up = torch.bmm(fp8_rows_torch(h), ex.gate_up_proj).chunk(2, dim=-1)
            out = torch.bmm(fp8_rows_torch(up * ex.act_fn(gate)), ex.down_proj)
            return out.view(-1, ex.hidden_size)
        experts.forward = forward
    with torch.no_grad():
        return hf.language_model(input_ids=torch.tensor(IDS)).logits.numpy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_multimodal_model(tmp_path_factory.mktemp("q"), vision={"num_hidden_layers": 1},
                                    interleave_moe_layer_step=2)


def test_meta_fp8_checkpoint_loads_as_stored(hf_dir, tmp_path):
    src, hf = hf_dir
    dequantized = write_meta_fp8(src, tmp_path / "fp8")
    cfg, params = checkpoints.load(tmp_path / "fp8")
    assert Q.recipe_of(cfg, params) == "fp8_mixed"
    stored = load_file(tmp_path / "fp8" / "model.safetensors")
    wo = params["blocks"]["layer_1"]["moe"]["wo"]        # layer 1: block 0, slot 1; expert 2
    assert wo.qvalue.dtype == ml_dtypes.float8_e4m3fn and wo.scale.dtype == np.float32
    np.testing.assert_array_equal(  # the fp8 bytes and the scales as stored, not requantized
        np.asarray(wo.qvalue[0, 2]).view(np.uint8),
        stored[f"{TEXT}layers.1.feed_forward.experts.2.down_proj.weight"].T.view(
            torch.uint8).numpy())
    np.testing.assert_array_equal(np.asarray(wo.scale[0, 2]), stored[
        f"{TEXT}layers.1.feed_forward.experts.2.down_proj.weight_scale"].float().T.numpy())
    ref = hf_fp8_reference(hf, dequantized)
    np.testing.assert_allclose(model.forward(cfg, params, IDS), ref, rtol=1e-4, atol=1e-4)
    # into Orbax as it is (fp8_mixed), and back the same
    assert main([str(tmp_path / "fp8"), str(tmp_path / "orbax")]) == 0
    cfg2, params2 = checkpoints.load(tmp_path / "orbax")
    assert json.loads((tmp_path / "orbax" / "checkpoint.json").read_text())[
        "quantization"] == "fp8_mixed"
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    out = model.generate(cfg2, params2, IDS[:, :5], max_new_tokens=3, stop_tokens=[])
    assert out.shape == (2, 8)


def test_fp8_layers_left_in_bf16_are_quantized_on_load(hf_dir, tmp_path):
    """A MoE layer that the checkpoint's `ignore` list leaves in bf16 loads as fp8_mixed
    quantizes it (one dtype per stacked leaf), with a warning naming it."""
    src, _ = hf_dir
    write_meta_fp8(src, tmp_path / "fp8", bf16_layers=(3,))
    with pytest.warns(UserWarning, match=r"layers \[3\] are bf16"):
        cfg, params = checkpoints.load(tmp_path / "fp8")
    _, plain = checkpoints.load(src)
    want = Q.quantize_params(cfg, plain, "fp8_mixed")
    assert cfg.text.period == 4 and cfg.text.layer_specs[3].moe   # layer 3: block 0, slot 3
    for name in ("wi_gate", "wi_up", "wo"):
        got, exp = params["blocks"]["layer_3"]["moe"][name], want["blocks"]["layer_3"]["moe"][name]
        np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(exp.scale))
        np.testing.assert_array_equal(np.asarray(got.qvalue).view(np.uint8),
                                      np.asarray(exp.qvalue).view(np.uint8))


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    """{recipe: Orbax directory}: convert --quantize, slab by slab (slabs of 1 KB: many per
    tensor)."""
    from checkpoints.conversion import hf_to_orbax
    root = tmp_path_factory.mktemp("converted")
    for recipe in Q.RECIPES:
        hf_to_orbax(hf_dir[0], root / recipe, quantize=recipe, slab_bytes=1024, progress=False)
    return {r: root / r for r in Q.RECIPES}


@pytest.mark.parametrize("recipe", Q.RECIPES)
def test_convert_quantize_writes_what_the_recipe_makes(hf_dir, converted, recipe):
    """Streamed, the conversion stores exactly what quantize_params makes of the whole tree."""
    cfg, params = checkpoints.load(converted[recipe])
    _, plain = checkpoints.load(hf_dir[0])
    want = Q.quantize_params(cfg, plain, recipe)
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


@pytest.mark.parametrize("recipe", ["int4_mixed", "fp8_mixed"])
def test_quantized_params_on_a_mesh(converted, recipe):
    """Loaded straight into shards (each scale split as its weight, unsplit where it reduces),
    and sharded == single device, through the expert-parallel map."""
    cfg, params = checkpoints.load(converted[recipe])
    mesh = sharding.make_mesh("data=2,expert=2,tensor=2")
    _, placed = sharding.load(converted[recipe], mesh)
    wg, wo = (placed["blocks"]["layer_1"]["moe"][n] for n in ("wi_gate", "wo"))
    assert wg.qvalue.sharding.spec[1:] == wg.scale.sharding.spec[1:] == ("expert", None, "tensor")
    assert wo.qvalue.sharding.spec[1:3] == ("expert", "tensor")  # [nb, E, F, D]
    assert wo.scale.shape[2] == 1 and wo.scale.sharding.spec[2] is None
    again = sharding.shard_params(cfg, params, mesh)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(placed)):
        assert a.sharding == b.sharding
    np.testing.assert_allclose(model.forward(cfg, placed, IDS, mesh=mesh),
                               model.forward(cfg, params, IDS), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# Bad input: one error line naming the culprit, nothing left at DST.

def _edit(path: Path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


SCALE = f"{TEXT}layers.1.feed_forward.experts.0.up_proj.weight_scale"


@pytest.mark.parametrize("edit, culprit", [
    (lambda s: s.pop(SCALE), f"1 missing: {SCALE}"),
    (lambda s: s.update({SCALE: s[SCALE][:, 0]}), f"{SCALE} [16] (expected [16, 1])"),
])
def test_bad_fp8_scales(hf_dir, tmp_path, capsys, edit, culprit):
    write_meta_fp8(hf_dir[0], tmp_path / "fp8")
    _edit(tmp_path / "fp8", edit)
    fails(capsys, [tmp_path / "fp8", tmp_path / "out"], culprit)
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.load(tmp_path / "fp8")
    assert culprit in str(e.value)


def test_quantize_refusals(hf_dir, tmp_path, capsys):
    src, _ = hf_dir
    fails(capsys, [src, tmp_path / "out", "--quantize", "int3"],
          "unknown quantization recipe 'int3'")
    write_meta_fp8(src, tmp_path / "fp8")
    fails(capsys, [tmp_path / "fp8", tmp_path / "out", "--quantize", "int8"],
          "quantized already", "Meta's FP8")
    assert main([str(src), str(tmp_path / "q"), "--quantize", "int8"]) == 0
    capsys.readouterr()  # its progress bar
    fails(capsys, [tmp_path / "q", tmp_path / "out", "--quantize", "int4_mixed"],
          "quantized already (int8)")
    fails(capsys, [tmp_path / "q", tmp_path / "out", "--to", "hf"], "is quantized (int8)")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    fails(capsys, [tmp_path / "fp8", tmp_path / "out"], "strategy='tensor'")

