"""The matvec benchmark's chains (experiments/bench_matvec.py) compute what they say, against
numpy on the same weights (drawn as the benchmark draws them), and count the bytes they read."""
import numpy as np

from experiments.bench_matvec import chains


def test_chains_compute_their_products_and_count_their_weights():
    jobs = chains([0.01], 0.1)                  # K = 50: 10 weights of 10 kB
    outs = {how: np.asarray(fn()) for (_, how), (fn, _) in jobs.items()}
    rng = np.random.default_rng(0)
    ws = [(rng.standard_normal((50, 50)) / np.sqrt(50)).astype(np.float32) for _ in range(10)]
    one = a = b = np.ones((1, 50), np.float32)
    for w in ws:
        one = one @ w
    for wa, wb in zip(ws[0::2], ws[1::2]):
        a, b = a @ wa, b @ wb
    assert np.abs(one).max() > 1  # (measured 1.7: the products do not vanish)
    for how in ("XLA, one chain", "XLA, weights transposed", "torch, one chain"):
        np.testing.assert_allclose(outs[how], one, rtol=1e-5, atol=1e-5, err_msg=how)
    np.testing.assert_allclose(outs["XLA, two chains side by side"], a + b, rtol=1e-5, atol=1e-5)
    assert {read for _, read in jobs.values()} == {10 * 50 * 50 * 4 / 1e9}


def test_one_core_probe_reads_on_one_thread_and_restores_the_threads():
    import torch

    from experiments.bench_matvec import one_core_probe

    dot, read = one_core_probe()
    threads = torch.get_num_threads()
    seen = []
    torch_dot = torch.Tensor.dot
    try:  # the dot runs while torch is on one thread
        torch.Tensor.dot = lambda a, b: seen.append(torch.get_num_threads()) or torch_dot(a, b)
        assert float(dot()) == 1 << 26
    finally:
        torch.Tensor.dot = torch_dot
    assert seen == [1] and torch.get_num_threads() == threads
    assert read == 4 * (1 << 26) / 1e9
