"""Generate text from a checkpoint, streaming it, then print prefill and decode speed.

    python -m experiments.generate --ckpt PATH --prompt "def fib(n):" [--chat] [--image FILE]
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
    python -m experiments.generate --ckpt PATH --prompt-ids 1,2,3      # no tokenizer needed
    python -m experiments.generate --ckpt PATH ... --mesh tensor=8     # sharded, read into shards
    python -m experiments.generate --ckpt PATH ... --mesh tensor=2 --devices 2   # on a CPU machine

PATH is an HF directory, an Orbax directory, or a training run of experiments.train (its latest
step) or one step of it, OUT/<step> (checkpoints.load). The tokenizer is the tokenizer.json beside
the weights (a run's own, OUT/tokenizer.json), or --tokenizer FILE. Where the checkpoint carries a
generation_config.json, its stop tokens and, if it sets do_sample, its temperature, top-k and
top-p are the defaults (HF's reading of the file); the flags override them, and without the
file decoding is greedy. Compiles are announced; the decode speed printed excludes its compile.
"""
from __future__ import annotations

import sys
import time

from experiments import cli

# JAX and the packages over it are imported once the arguments are parsed (experiments/cli.py).


def parse_args(argv=None):
    ap = cli.parser(__spec__.name, __doc__)
    ap.add_argument("--ckpt", required=True, help="HF, Orbax or training-run directory")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn")
    ap.add_argument("--image", help="an image file, placed before the prompt text")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="(default: %(default)s)")
    ap.add_argument("--temperature", type=float,
                    help="0: greedy (default: generation_config.json's, else 0)")
    ap.add_argument("--top-k", type=int, help="(default: generation_config.json's, else none)")
    ap.add_argument("--top-p", type=float, help="(default: generation_config.json's, else none)")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--stream-every", type=int, default=8,
                    help="tokens per decode call (default: %(default)s)")
    ap.add_argument("--no-verify", action="store_true",
                    help="load an Orbax --ckpt without checking its integrity record (faster)")
    ap.add_argument("--mesh", help='run sharded over devices, e.g. "tensor=8" (sharding/); the '
                                   "weights are read straight into their shards")
    ap.add_argument("--rules", default="combined", choices=cli.STRATEGIES,
                    help="with --mesh: the sharding strategy (default: combined)")
    cli.add_devices(ap)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cli.simulate_devices(args)
    import checkpoints
    import sharding
    try:
        run(args)
    except (ValueError, FileNotFoundError, checkpoints.CheckpointError, sharding.ShardingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def chat_with_image(cfg, tok, image, text: str):
    """(ids [T], pixel_values) of one user turn holding the image, then `text`, then the
    generation prompt: the image at the start of the user's message, after its header."""
    from model import image_processing
    ids = tok.encode_chat([{"role": "user", "content": text}])
    head = tok.encode_chat([], add_generation_prompt=False) + tok.encode_header("user")
    return image_processing.build_inputs([head, image, ids[len(head):]], cfg,
                                         tokens=image_processing.ImageTokens.from_tokenizer(tok))


def image_prompt(cfg, tok, args, text_ids):
    """(ids, pixel_values) with the image's token layout before the prompt text (inside the user
    turn with --chat). The layout's ids come from the tokenizer when there is one."""
    from PIL import Image
    from model import image_processing
    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, ValueError) as e:
        raise ValueError(f"--image {args.image}: cannot read the image ({e})") from None
    tokens = None if tok is None else image_processing.ImageTokens.from_tokenizer(tok)
    if tok is None or args.prompt is None:
        return image_processing.build_inputs([text_ids[:0], image, text_ids], cfg, tokens=tokens)
    if args.chat:  # the image goes at the start of the user's message
        return chat_with_image(cfg, tok, image, args.prompt)
    return image_processing.build_inputs([text_ids[:1], image, text_ids[1:]], cfg,  # after BOS
                                         tokens=tokens)


def load_tokenizer(args, asset_dir):
    """The tokenizer of --tokenizer, else the checkpoint's; None when neither is needed."""
    from model.tokenizer import Tokenizer
    if args.prompt is None and not args.tokenizer:
        return None
    try:
        return Tokenizer.load(args.tokenizer or asset_dir)
    except FileNotFoundError:
        if args.tokenizer:
            raise
        raise ValueError(f"{args.ckpt} carries no tokenizer.json (looked in {asset_dir}); pass "
                         "--tokenizer FILE, or token ids with --prompt-ids") from None


def sampling_settings(args, cfg, asset_dir) -> tuple[dict, str | None]:
    """(temperature, top_k, top_p and stop tokens: the flags, else generation_config.json's,
    else greedy and the tokenizer's stops; a line saying what the file set, if it set any)."""
    from checkpoints import assets
    file = assets.generation_defaults(asset_dir, cfg.text.vocab_size)
    out = {"temperature": 0.0, "top_k": None, "top_p": None, "stop_tokens": None}
    taken = {}
    for k in out:
        flag = getattr(args, k, None)  # (no flag sets the stop tokens)
        if flag is not None:
            out[k] = flag
        elif k in file:
            out[k] = taken[k] = file[k]
    if out["temperature"] == 0:  # greedy: top-k and top-p filter nothing that matters
        taken = {k: v for k, v in taken.items() if k not in ("top_k", "top_p")}
    said = ", ".join(f"{k} {v}" for k, v in taken.items())
    return out, f"from {assets.GENERATION}: {said}" if taken else None


def run(args):
    if args.chat and args.prompt is None:
        raise ValueError("--chat wraps --prompt text in a user turn; with --prompt-ids, write "
                         "the turn's ids yourself")
    import jax
    import checkpoints
    import sharding
    from checkpoints import sources
    from model import inputs, sampling
    asset_dir = sources.asset_dir(args.ckpt)
    mesh = None
    if args.mesh:
        mesh = sharding.make_mesh(args.mesh)
        cfg, params = sharding.load(args.ckpt, mesh, args.rules, verify=not args.no_verify)
    else:
        cfg, params = checkpoints.load(args.ckpt, verify=not args.no_verify)
    s, note = sampling_settings(args, cfg, asset_dir)
    inputs.check_decoding(cfg.text.vocab_size, args.max_new_tokens, s["temperature"], s["top_k"],
                          s["top_p"], args.stream_every)
    tok = load_tokenizer(args, asset_dir)
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}")
    elif args.chat:
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        ids = tok.encode(args.prompt)
    pixel_values = None
    if args.image is not None:
        ids, pixel_values = image_prompt(cfg, tok, args, ids)
    inputs.check_token_ids([ids], cfg.text.vocab_size)  # bad input is one line, before any other
    stop = s["stop_tokens"] or (tok.stop_ids if tok is not None else None)
    shared = dict(mesh=mesh, rules=args.rules)

    if note:
        print(note, file=sys.stderr)
    print(f"prefill: compiling and running {len(ids)} prompt tokens...", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    prompt, state = sampling.prefill(cfg, params, [ids], max_new_tokens=args.max_new_tokens,
                                     seed=args.seed, pixel_values=pixel_values, **shared)
    jax.block_until_ready(state)
    t_prefill = time.perf_counter() - t0
    decoding = dict(max_new_tokens=args.max_new_tokens, temperature=s["temperature"],
                    top_k=s["top_k"], top_p=s["top_p"], stop_tokens=stop,
                    stream_every=args.stream_every, **shared)
    steps = min(args.stream_every, args.max_new_tokens)
    print(f"compiling decode for {steps} steps a call...", file=sys.stderr, flush=True)
    t_compile = sampling.compile_decode(cfg, params, state, **decoding)
    if args.prompt is not None and not args.chat:
        print(args.prompt, end="", flush=True)
    stop_set = set(stop or cfg.text.eos_token_ids)
    produced = []

    def new_tokens():  # row 0's tokens as they arrive, up to its stop token
        for new in sampling.decode_stream(cfg, params, state, **decoding):
            for t in map(int, new[0]):
                if t in stop_set:
                    return
                produced.append(t)
                yield t

    t1 = time.perf_counter()
    pieces = tok.stream(new_tokens()) if tok is not None else (f"{t} " for t in new_tokens())
    for piece in pieces:
        print(piece, end="", flush=True)
    t_decode = time.perf_counter() - t1
    print(f"\n\nprefill: {len(prompt[0])} tokens in {t_prefill:.2f}s "
          f"({len(prompt[0]) / t_prefill:.1f} tok/s, compile included); "
          f"decode: {len(produced)} tokens in {t_decode:.2f}s "
          f"({len(produced) / max(t_decode, 1e-9):.1f} tok/s; compiled in {t_compile:.2f}s "
          "before)", file=sys.stderr)


if __name__ == "__main__":
    main()
