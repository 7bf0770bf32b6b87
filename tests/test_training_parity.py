"""The training objective and its gradients against PyTorch autograd through HF Llama4ForCausalLM.

HF's loss with labels (-100 where our loss weight is 0) plus the load-balancing loss written out
in torch (HF computes none for Llama 4) must equal ours, and so must the gradient of every
parameter: HF's gradients are mapped into our layout by the checkpoint reader itself (the
conversion is linear: transposes, reshapes, stacking), then compared leaf by leaf.
"""
import copy

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

import model
from experiments.hf_reference import hf_text_model, params_from_hf
from tests.hf_models import text
from training import loss_fn

CASES = {
    # Scout-like: every layer MoE, top-1, QK norm, chunked RoPE layers + one NoPE layer.
    "scout_like": dict(num_hidden_layers=4),
    # Maverick-like: MoE every other layer (dense FFN between), no QK norm; top-2 routing.
    "maverick_like_top2": dict(num_hidden_layers=4, interleave_moe_layer_step=2,
                               use_qk_norm=False, num_experts_per_tok=2),
}
COEF = 0.1  # large enough that a wrong aux-loss gradient would show next to the CE's


def torch_aux(router_logits, B, T, k, mask):
    """The load-balancing loss of training/objective.py, in torch, over the first T positions."""
    m = torch.as_tensor(mask, dtype=torch.float32).reshape(-1)
    n = m.sum()
    per_layer = []
    for z in router_logits:
        E = z.shape[-1]
        z = z.reshape(B, T + 1, E)[:, :T].reshape(-1, E)
        counts = torch.nn.functional.one_hot(z.topk(k, dim=-1).indices, E).sum(-2).float()
        f = (counts * m[:, None]).sum(0) / (k * n)
        s = torch.sigmoid(z)
        P = (s / s.sum(-1, keepdim=True) * m[:, None]).sum(0) / n
        per_layer.append(E * (f * P).sum())
    return torch.stack(per_layer).mean()


def relative_error(ours, ref):
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_match_hf_autograd(case):
    hf = hf_text_model(text(**CASES[case]), seed=0)
    cfg, params = params_from_hf(hf)
    B, T = 2, 20  # longer than two chunks of 8, and past floor_scale so temperature tuning acts
    r = np.random.default_rng(0)
    # No pad token (id 0) in the inputs: HF's embedding has padding_idx, so torch never
    # gives that row a gradient; our padding never reaches the loss, which has the same effect.
    tokens = r.integers(1, 128, (B, T + 1)).astype(np.int32)
    weights = (r.random((B, T + 1)) > 0.3).astype(np.float32)
    weights[:, 0] = 0
    real = np.ones((B, T + 1), bool)
    real[1, -4:] = False  # padding: no loss, no router statistics
    weights[~real] = 0

    batch = {"tokens": tokens, "weights": weights, "real": real}
    cfg = cfg.replace_text(router_aux_loss_coef=COEF)
    rt = model.resolve(cfg, "train")
    (loss, metrics), grads = jax.jit(jax.value_and_grad(
        lambda p: loss_fn(cfg, rt, p, batch), has_aux=True))(params)

    labels = torch.tensor(np.where(weights > 0, tokens, -100), dtype=torch.long)
    out = hf(input_ids=torch.tensor(tokens, dtype=torch.long), labels=labels,
             output_router_logits=True)
    aux = torch_aux(out.router_logits, B, T, cfg.text.experts_per_token, real[:, :-1])
    total = out.loss + COEF * aux
    hf.zero_grad()
    total.backward()

    assert relative_error(np.asarray(metrics["ce"]), out.loss.item()) < 1e-5
    assert relative_error(np.asarray(metrics["aux"]), aux.item()) < 1e-5
    assert relative_error(np.asarray(loss), total.item()) < 1e-5

    grad_model = copy.deepcopy(hf)
    grad_model.load_state_dict({n: p.grad for n, p in hf.named_parameters()})
    _, hf_grads = params_from_hf(grad_model)
    ours = traverse_util.flatten_dict(grads, sep="/")
    theirs = traverse_util.flatten_dict(hf_grads, sep="/")
    assert ours.keys() == theirs.keys()
    errors = {k: relative_error(np.asarray(ours[k]), np.asarray(theirs[k])) for k in ours}
    bad = {k: e for k, e in errors.items() if not e < 1e-4}
    print(f"{case}: worst gradient relative error {max(errors.values()):.2e}")
    assert not bad, f"gradients differ from HF autograd (max-abs relative error): {bad}"
    if case == "scout_like":  # rematerialisation changes what is stored, not what is computed
        remat = cfg.replace(remat="full")
        remat_fn = jax.jit(jax.grad(lambda p: loss_fn(remat, rt, p, batch)[0]))
        for k, g in traverse_util.flatten_dict(remat_fn(params), sep="/").items():
            assert relative_error(np.asarray(g), np.asarray(ours[k])) < 1e-5, k
