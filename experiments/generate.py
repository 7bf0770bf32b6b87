"""Generate text from a checkpoint, streaming it, then print prefill and decode speed.

    python -m experiments.generate --ckpt PATH --prompt "def fib(n):" [--chat] [--image FILE]
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
    python -m experiments.generate --ckpt PATH --prompt-ids 1,2,3      # no tokenizer needed

PATH is an HF directory or an Orbax directory (checkpoints.load); the tokenizer is the
tokenizer.json inside it, or --tokenizer FILE.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
from PIL import Image

import checkpoints
from model import image_processing, inputs, sampling
from model.tokenizer import Tokenizer


# ImageTokens field -> tokenizer special-token name
LAYOUT_TOKENS = {"image_start": "image_start", "image_end": "image_end", "tile_x": "tile_x_separator",
                 "tile_y": "tile_y_separator", "image": "image", "patch": "patch"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="HF or Orbax checkpoint directory")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn")
    ap.add_argument("--image", help="an image file, placed before the prompt text")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the one in --ckpt)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stream-every", type=int, default=8, help="tokens per decode call")
    ap.add_argument("--no-verify", action="store_true",
                    help="load an Orbax --ckpt without checking its integrity record (faster)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, checkpoints.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def image_tokens(tok):
    """The image layout's special ids from the tokenizer; None (Llama 4's ids) when it lacks one."""
    if tok is None or not all(n in tok.special for n in LAYOUT_TOKENS.values()):
        return None
    return image_processing.ImageTokens(**{f: tok.special[n] for f, n in LAYOUT_TOKENS.items()})


def chat_with_image(cfg, tok, image, text: str):
    """(ids [T], pixel_values) of one user turn holding the image, then `text`, then the
    generation prompt: the image at the start of the user's message, after its header."""
    ids = tok.encode_chat([{"role": "user", "content": text}])
    head = tok.encode_chat([], add_generation_prompt=False) + tok.encode_header("user")
    return image_processing.build_inputs([head, image, ids[len(head):]], cfg,
                                         tokens=image_tokens(tok))


def image_prompt(cfg, tok, args, text_ids):
    """(ids, pixel_values) with the image's token layout before the prompt text (inside the user
    turn with --chat). Layout ids come from the tokenizer when it has them."""
    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, ValueError) as e:
        raise ValueError(f"--image {args.image}: cannot read the image ({e})") from None
    tokens = image_tokens(tok)
    if tok is None or args.prompt is None:
        return image_processing.build_inputs([text_ids[:0], image, text_ids], cfg, tokens=tokens)
    if args.chat:  # the image goes at the start of the user's message
        return chat_with_image(cfg, tok, image, args.prompt)
    return image_processing.build_inputs([text_ids[:1], image, text_ids[1:]], cfg,  # after BOS
                                         tokens=tokens)


def run(args):
    if args.chat and args.prompt is None:
        raise ValueError("--chat wraps --prompt text in a user turn; with --prompt-ids, write "
                         "the turn's ids yourself")
    cfg, params = checkpoints.load(args.ckpt, verify=not args.no_verify)
    inputs.check_decoding(cfg.text.vocab_size, args.max_new_tokens, args.temperature, args.top_k,
                          args.top_p, args.stream_every)
    tok = None
    if args.prompt is not None or args.tokenizer:
        tok = Tokenizer.load(args.tokenizer or args.ckpt)
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
    stop = tok.stop_ids if tok is not None else None

    t0 = time.perf_counter()
    prompt, state = sampling.prefill(cfg, params, [ids], max_new_tokens=args.max_new_tokens,
                                     seed=args.seed, pixel_values=pixel_values)
    jax.block_until_ready(state)
    t_prefill = time.perf_counter() - t0
    if args.prompt is not None and not args.chat:
        print(args.prompt, end="", flush=True)
    stop_set = set(stop or cfg.text.eos_token_ids)
    produced = []

    def new_tokens():  # row 0's tokens as they arrive, up to its stop token
        for new in sampling.decode_stream(cfg, params, state, max_new_tokens=args.max_new_tokens,
                                          temperature=args.temperature, top_k=args.top_k,
                                          top_p=args.top_p, stop_tokens=stop,
                                          stream_every=args.stream_every):
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
          f"decode: {len(produced)} tokens in {t_decode:.2f}s ({len(produced) / max(t_decode, 1e-9):.1f} tok/s)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
