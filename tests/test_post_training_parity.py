"""The post-training losses against references computed apart from them: DPO's loss and
gradients against the published formula in PyTorch autograd, the distillation KL against
torch.nn.functional.kl_div (and the gradient norms of its weight rule against autodiff), GRPO's
advantages and clipped objective against a small case worked by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from training.distill import soft_targets_kl, soft_weight
from training.dpo import dpo_loss
from training.grpo import ADV_EPS, clipped_objective, group_advantages
from training.objective import token_logprobs


def test_dpo_loss_and_gradients_match_the_published_formula_in_torch():
    r = np.random.default_rng(0)
    pc, pr, rc, rr = (r.normal(-20, 5, 16).astype(np.float32) for _ in range(4))
    beta = 0.3

    def ours(pc, pr):
        return jnp.mean(dpo_loss(pc, pr, rc, rr, beta)[0])
    loss, (g_pc, g_pr) = jax.value_and_grad(ours, argnums=(0, 1))(pc, pr)

    # Rafailov et al. (2023), eq. 7, written out: -log sigma(beta log(pi_w/ref_w) - beta log(pi_l/ref_l)).
    tc, tr = torch.tensor(pc, requires_grad=True), torch.tensor(pr, requires_grad=True)
    ref_loss = -torch.nn.functional.logsigmoid(
        beta * (tc - torch.tensor(rc)) - beta * (tr - torch.tensor(rr))).mean()
    ref_loss.backward()
    np.testing.assert_allclose(loss, ref_loss.item(), rtol=1e-6)
    np.testing.assert_allclose(g_pc, tc.grad.numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g_pr, tr.grad.numpy(), rtol=1e-5, atol=1e-8)
    _, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    np.testing.assert_allclose(chosen, beta * (pc - rc), rtol=1e-6)
    np.testing.assert_allclose(rejected, beta * (pr - rr), rtol=1e-6)


def test_distillation_kl_matches_torch_kl_div():
    r = np.random.default_rng(1)
    s, t = (r.normal(0, 3, (2, 5, 50)).astype(np.float32) for _ in range(2))
    for tau in (1.0, 2.0, 0.5):
        ours = soft_targets_kl(jnp.asarray(s), jnp.asarray(t), tau)
        ref = torch.nn.functional.kl_div(
            torch.log_softmax(torch.tensor(s) / tau, -1), torch.log_softmax(torch.tensor(t) / tau, -1),
            reduction="none", log_target=True).sum(-1)
        np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_gradnorm_weight_uses_the_true_gradients_at_the_logits():
    """The closed forms behind the gradnorm rule equal autodiff of the two per-token losses."""
    r = np.random.default_rng(2)
    s, t = (jnp.asarray(r.normal(0, 2, (2, 3, 20)).astype(np.float32)) for _ in range(2))
    y = jnp.asarray(r.integers(0, 20, (2, 3)))
    m = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    tau = 1.5
    g_hard = jax.grad(lambda z: -jnp.sum(token_logprobs(z, y) * m))(s)
    g_soft = jax.grad(lambda z: jnp.sum(tau ** 2 * soft_targets_kl(z, t, tau) * m))(s)
    n_hard, n_soft = float(jnp.linalg.norm(g_hard)), float(jnp.linalg.norm(g_soft))
    w = soft_weight("gradnorm", 0.5, s, t, y, m, tau)
    np.testing.assert_allclose(w, n_hard / (n_hard + n_soft), rtol=1e-5)
    np.testing.assert_allclose(soft_weight("confidence", 0.5, s, t, y, m, tau),
                               jnp.exp(token_logprobs(t, y)), rtol=1e-6)
    assert float(soft_weight("fixed", 0.25, s, t, y, m, tau)) == 0.25


def test_grpo_advantages_and_clipped_objective_by_hand():
    # Two groups of four samples: rewards 1, 0, 0, 1 (mean 1/2, std 1/2) and all 1 (no signal).
    adv = group_advantages(np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    a = 0.5 / (0.5 + ADV_EPS)
    np.testing.assert_allclose(adv, [[a, -a, -a, a], [0, 0, 0, 0]], rtol=1e-12)

    # Two samples of two completion tokens (the second sample's last token is padding).
    # Sample 0, A = +1: ratios e^0.5 = 1.6487 (clipped to 1.2: the smaller) and e^-0.5 = 0.6065
    #   (kept: below the clip, min(0.6065, 0.8) = 0.6065).
    # Sample 1, A = -1: ratio e^0.3 = 1.3499 -> min(-1.3499, -1.2) = -1.3499 (unclipped, the
    #   pessimistic side).
    logp = jnp.array([[-1.0, -2.0], [-0.7, -5.0]])
    old = jnp.array([[-1.5, -1.5], [-1.0, -9.0]])
    ref = jnp.array([[-1.0, -1.0], [-1.0, -9.0]])
    A = jnp.array([1.0, -1.0])
    mask = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    beta, eps = 0.1, 0.2
    loss, kl, clipped = clipped_objective(logp, old, ref, A, mask, jnp.ones(2), eps, beta)
    # k3 KL: e^(ref - logp) - (ref - logp) - 1 per token.
    k3 = lambda d: np.exp(d) - d - 1  # noqa: E731
    J0 = ((1.2 - beta * k3(0.0)) + (np.exp(-0.5) - beta * k3(1.0))) / 2
    J1 = (-np.exp(0.3) - beta * k3(-0.3)) / 1
    np.testing.assert_allclose(loss, -(J0 + J1) / 2, rtol=1e-6)
    np.testing.assert_allclose(kl[0], [k3(0.0), k3(1.0)], rtol=1e-6)
    assert clipped.tolist() == [[True, False], [False, False]]
    # A masked-out sample (a group dropped for having no signal) does not count.
    loss0, _, _ = clipped_objective(logp, old, ref, A, mask, jnp.array([1.0, 0.0]), eps, beta)
    np.testing.assert_allclose(loss0, -J0, rtol=1e-6)
