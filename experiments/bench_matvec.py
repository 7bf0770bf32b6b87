"""What a decode-shaped product reads per second here: chains of dependent matrix-vector products
x [1, K] @ w [K, K], each over weights of its own (as a decode step's layers run them: each
product's input the last one's output, each weight read once a step), by XLA and by torch, beside
the machine's streaming read probes (bench_roofline's) and one core's (torch's dot on one thread),
in one timing loop.

    python -m experiments.bench_matvec [--sizes 0.5,2,8] [--weights 160] [--repeats 5]

Per size (MB of one weight matrix), over --weights MB of weights in all:
- XLA, one chain (x @ w), and the same with each weight stored transposed (x @ w.T, w [K, K]
  laid out the other way);
- XLA, two chains side by side (each over half the weights): faster than one chain only if
  XLA:CPU runs independent products at the same time;
- torch, one chain on its default threads.
The fraction is of the best read probe: the bandwidth bench_roofline's decode roofline divides by.
A product that reads at no more than one core's rate ran on one core.
"""
from __future__ import annotations

from experiments import cli
from experiments.bench_roofline import GB, READ_FLOATS, machine_probes


def one_core_probe():
    """(fn, GB read): torch's dot over the read probes' 256 MB on one thread."""
    import torch

    a = torch.ones(READ_FLOATS)

    def dot():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return a.dot(a)
        finally:
            torch.set_num_threads(threads)

    return dot, 4 * a.numel() / GB


def chains(sizes, weights_mb: float):
    """{(size MB, how): (fn, GB read)}: one call of fn reads each of its weights once."""
    import numpy as np

    rng = np.random.default_rng(0)
    return {(mb, how): job for mb in sizes for how, job in _chains(mb, weights_mb, rng).items()}


def _chains(mb: float, weights_mb: float, rng):
    """{how: (fn, GB read)} for weights of `mb` MB each, --weights MB in all."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    K = int((mb * 1e6 / 4) ** 0.5)
    n = max(2, int(weights_mb // mb) // 2 * 2)
    ws = [(rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32) for _ in range(n)]
    ws_x, ws_t = [jnp.asarray(w) for w in ws], [jnp.asarray(w.T.copy()) for w in ws]
    ws_torch = [torch.from_numpy(w) for w in ws]
    x, xt = jnp.ones((1, K), jnp.float32), torch.ones(1, K)

    def one(x, ws, product):
        for w in ws:
            x = product(x, w)
        return x

    def two(x, ws):  # chains a and b side by side, independent until the sum
        a, b = x, x
        for wa, wb in zip(ws[0::2], ws[1::2]):
            a, b = a @ wa, b @ wb
        return a + b

    plain = jax.jit(lambda x, ws: one(x, ws, jnp.matmul))
    flipped = jax.jit(lambda x, ws: one(x, ws, lambda a, w: jnp.einsum("MK,NK->MN", a, w)))
    side = jax.jit(two)
    read = n * K * K * 4 / GB
    return {"XLA, one chain": (lambda: plain(x, ws_x).block_until_ready(), read),
            "XLA, weights transposed": (lambda: flipped(x, ws_t).block_until_ready(), read),
            "XLA, two chains side by side": (lambda: side(x, ws_x).block_until_ready(), read),
            "torch, one chain": (lambda: one(xt, ws_torch, torch.matmul), read)}


def main():
    ap = cli.parser(__spec__.name, __doc__)
    ap.add_argument("--sizes", default="0.5,2,8", help="MB of one weight matrix, comma-separated")
    ap.add_argument("--weights", type=float, default=160, help="MB of weights per chain run")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    import jax
    import torch

    from experiments.timing import timed

    probes = {k: v for k, v in machine_probes().items() if k[0] == "read GB/s"}
    runs = chains(sizes, args.weights)
    jobs = {**probes, "one core": one_core_probe(), **runs}
    seconds = dict(zip(jobs, timed(*(fn for fn, _ in jobs.values()), repeats=args.repeats)))
    rate = {k: amount / seconds[k] for k, (_, amount) in jobs.items()}
    limit = max(rate[k] for k in probes)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"(threads {torch.get_num_threads()})")
    print("read probes: " + ", ".join(f"{lib} {rate[what, lib]:.1f} GB/s" for what, lib in probes)
          + f"; limit {limit:.1f} GB/s")
    print(f"one core (torch dot, one thread): {rate['one core']:.1f} GB/s, "
          f"{100 * rate['one core'] / limit:.1f}% of the read limit")
    for mb in sizes:
        print(f"weights of {mb:g} MB a product:")
        for how in (how for size, how in runs if size == mb):
            r = rate[mb, how]
            print(f"  {how:30s} {r:5.1f} GB/s  {100 * r / limit:5.1f}% of the read limit")


if __name__ == "__main__":
    main()
