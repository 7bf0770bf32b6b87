"""Train from scratch or fine-tune the Llama 4 text decoder; resumable.

    python -m experiments.train --preset tiny --data FILE_OR_DIR ... --out runs/x [--steps N]
    python -m experiments.train --init CKPT --data chat.jsonl --out runs/ft     # fine-tune
    python -m experiments.train ... --resume          # continue runs/x from its latest checkpoint
    python -m experiments.train ... --mesh data=2,fsdp=4          # sharded over 8 devices
    python -m experiments.train ... --mesh data=2,fsdp=4 --devices 8     # on a CPU machine
    python -m experiments.train --objective dpo --init CKPT --data pairs.jsonl --out runs/dpo
    python -m experiments.train --objective distill --teacher CKPT --data FILES --out runs/kd
    python -m experiments.train --objective grpo --init CKPT --data tasks.jsonl --out runs/rl

Data: plain-text files (a directory stands for its *.py files), packed into rows; or .jsonl chat
records ({"messages": [{"role", "content"}, ...]}), scored on the assistant turns only.
--init reads an HF directory or an Orbax directory (`checkpoints.load`) or a run directory of
this script (or one step of it); its tokenizer.json is used when present (--tokenizer overrides),
else bytes (said in a note), and its other non-weight files (generation_config.json, the chat
template, ...) are copied into OUT, so that the run converts back to a complete checkpoint.
Only the text decoder is trained (a vision tower, if the checkpoint has one, is left out).
Metrics go to OUT/metrics.jsonl; checkpoints to OUT/<step>/. Progress is a bar on a terminal,
else a line every --log-every steps; the loss is in bits per byte with the byte tokenizer, else in
nats per token; max_load is the busiest expert's share of the routed tokens times the number of
experts (1.00: balanced). With --mesh the params and Adam's moments are split as the sharding
rules say and the batch over the data axes; a run can resume on another mesh. On a CPU machine,
--devices N simulates the N devices of a mesh.
--objective picks what is trained (training/objectives.py): sft (the default, above); dpo on
preference pairs ({"prompt", "chosen", "rejected"} per line); distill from a --teacher on SFT's
data; grpo on verifiable tasks ({"prompt", "answer"} per line, experiments/make_tasks.py). The
README gives each format with an example.
"""
from __future__ import annotations

import dataclasses
import sys

from experiments import cli

# JAX and the packages over it are imported once the arguments are parsed (experiments/cli.py).

from experiments import train_objectives


def parse_overrides(items: list[str]) -> dict:
    """--set hidden_size=64 --set nope_layers=3,7: text-config fields, values as Python literals."""
    import ast
    import model
    from model.config import ConfigError
    fields = {f.name: f for f in dataclasses.fields(model.TextConfig)}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields:
            raise ConfigError(f"--set {item!r}: no text-config field {key!r}; "
                              f"fields are {sorted(fields)}")
        try:
            v = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            v = value
        if "tuple" in str(fields[key].type) and isinstance(v, int):  # moe_layers=3, not num_layers
            v = (v,)
        out[key] = tuple(v) if isinstance(v, list) else v
    return out


def default_dtype() -> str:
    # bf16 matmuls are slow on CPUs; accelerators train with bf16 compute and fp32 master weights.
    import jax
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def load_init(path: str):
    """(cfg, params) of the text decoder of a checkpoint (`checkpoints.load`: an HF or Orbax
    directory, a run directory of this script or one step of it)."""
    import checkpoints
    from model.multimodal import DECODER_KEYS
    cfg, params = checkpoints.load(path)
    return cfg.replace(vision=None), {k: params[k] for k in DECODER_KEYS}


def init_tokenizer(args):
    """(tokenizer path or None for bytes, non-weight files of --init to copy into OUT): --init's
    own tokenizer and the files that go with it, unless --tokenizer names another."""
    if args.init is None:
        return args.tokenizer, ()
    from checkpoints import assets, sources
    where = sources.asset_dir(args.init)
    if args.tokenizer is not None:  # the init's tokenizer files describe another tokenizer
        return args.tokenizer, [(where, assets.OTHER_FILES)]
    if not (where / "tokenizer.json").is_file():
        print(f"note: {args.init} has no tokenizer.json, so the data are tokenized as bytes (ids "
              "0..262); pass --tokenizer FILE to use the model's own", file=sys.stderr)
        return None, [(where, assets.OTHER_FILES)]
    return str(where / "tokenizer.json"), [(where, assets.FILES)]


def build_parser():
    ap = cli.parser(__spec__.name, __doc__)
    ap.add_argument("--data", nargs="+", required=True, help="text/.jsonl files or directories")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--init", help="checkpoint to fine-tune (HF dir, Orbax dir, or a run dir)")
    src.add_argument("--preset", default="tiny", choices=cli.PRESETS,
                     help="model preset when training from scratch (default: tiny)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a text-config field (from scratch only)")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: --init's, else bytes)")
    ap.add_argument("--out", default="runs/train", help="run directory")
    ap.add_argument("--resume", action="store_true", help="continue from OUT's latest checkpoint")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--stop-at", type=int, help="stop after this step (resume later with --resume)")
    ap.add_argument("--batch", type=int, default=8, help="rows per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per row")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    ap.add_argument("--aux-coef", type=float, help="router_aux_loss_coef (default: the config's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    ap.add_argument("--no-async", action="store_true", help="save checkpoints synchronously")
    ap.add_argument("--dtype", help="compute dtype (default: float32 on CPU, bfloat16 on "
                                    "accelerators)")
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--log-every", type=int, metavar="N",
                    help="when stderr is not a terminal: a progress line every N steps "
                         "(default: about 20 lines a run)")
    ap.add_argument("--mesh", help='train sharded over devices, e.g. "data=2,fsdp=4" (sharding/)')
    ap.add_argument("--rules", default="combined", choices=cli.STRATEGIES,
                    help="with --mesh: the sharding strategy (default: combined)")
    cli.add_devices(ap)
    train_objectives.add_arguments(ap)
    return ap


def warmup_steps(args) -> int:
    """--warmup, or a tenth of the run where it would outlast --steps (the learning rate would
    never reach --lr), with a warning."""
    if args.warmup < args.steps or args.steps < 1:  # (steps < 1 is refused by OptimConfig)
        return args.warmup
    scaled = args.steps // 10
    print(f"warning: --warmup {args.warmup} is not below --steps {args.steps}, so the learning "
          f"rate would never reach --lr; warming up for {scaled} steps instead (a tenth of the "
          "run)", file=sys.stderr)
    return scaled


def run(args):
    import jax
    import model
    import training
    from model.config import ConfigError, preset
    from training import OptimConfig, RunConfig
    from training.text import DataError, expand_paths, load_tokenizer
    # Settings first: nothing is read (a checkpoint or data may be large) before they are sound.
    optim = OptimConfig(lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=warmup_steps(args),
                        steps=args.steps, weight_decay=args.weight_decay, clip=args.clip)
    run_cfg = RunConfig(out=args.out, batch=args.batch, seq=args.seq, seed=args.seed,
                        save_every=args.save_every, keep=args.keep, resume=args.resume,
                        stop_at=args.stop_at, async_save=not args.no_async,
                        progress=not args.no_progress, log_every=args.log_every, mesh=args.mesh,
                        rules=args.rules)
    train_objectives.check(args)
    tok_path, init_files = init_tokenizer(args)
    if args.init is None and args.tokenizer is None and args.teacher:
        # a teacher's tokenizer serves a student from scratch
        from checkpoints import sources
        teacher_tok = sources.asset_dir(args.teacher) / "tokenizer.json"
        tok_path = str(teacher_tok) if teacher_tok.is_file() else None
    tok = load_tokenizer(tok_path)
    if args.init:
        if args.set:
            raise ConfigError("--set changes the architecture; it cannot apply to --init")
        cfg, params = load_init(args.init)
        make_params = lambda: params
    else:
        cfg = preset(args.preset).replace(vision=None).replace_text(
            vocab_size=tok.vocab_size, bos_token_id=tok.special["bos"],
            eos_token_ids=tuple(tok.stop_ids), pad_token_id=tok.special.get("pad"),
            **parse_overrides(args.set))
        key = jax.random.key(args.seed)
        make_params = lambda: model.init_params(cfg, key)
    dtype = args.dtype or default_dtype()
    cfg = cfg.replace(dtype=dtype, remat=args.remat, param_dtype="float32")
    if args.aux_coef is not None:
        cfg = cfg.replace_text(router_aux_loss_coef=args.aux_coef)
    if tok.vocab_size > cfg.text.vocab_size:
        raise DataError(f"the tokenizer has {tok.vocab_size} tokens, the model only "
                        f"{cfg.text.vocab_size}")
    training.check_run(cfg, run_cfg)
    objective = train_objectives.build(
        args, cfg, params if args.init else None, tok,
        lambda path: _frozen_model(load_init(path), dtype))

    data, kind, summary = objective.read_data(tok, expand_paths(args.data), args.seq,
                                              tok.special.get("pad", 0))
    print(f"data: {summary}; model: {model.config.param_count(cfg)['text'] / 1e6:.2f}M "
          f"parameters, {jax.default_backend()} {dtype}", file=sys.stderr)
    info = {"kind": kind, "tokenizer": tok_path or "bytes"}

    def copy_files(out: str):  # the init's generation defaults, chat template, ... beside the run
        from checkpoints import assets
        for where, names in init_files:
            assets.copy(where, out, names)
    state, history = training.train(cfg, make_params, data, run_cfg, optim, info, tokenizer=tok,
                                    on_start=copy_files, objective=objective)
    return tok, history


def _frozen_model(loaded, dtype: str):
    """A reference or teacher as the run computes: its config in this run's compute dtype."""
    cfg, params = loaded
    return cfg.replace(dtype=dtype), params


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.simulate_devices(args)
    import checkpoints
    import sharding
    import training
    from model.config import ConfigError
    from training.progress import loss_text
    errors = (training.DataError, ConfigError, training.ResumeError, training.MemoryLimitError,
              training.SettingsError, training.DivergedError, FileNotFoundError,
              sharding.ShardingError, checkpoints.CheckpointError)
    try:
        tok, history = run(args)
    except errors as e:
        sys.exit(f"error: {e}")
    if history:
        last = history[-1]
        loss = loss_text(last["ce"], tok) if "ce" in last else f"{last['loss']:.4f}"
        print(f"step {last['step']}: loss {loss}, {last['tokens_per_s']:,.0f} tokens/s; "
              f"checkpoints in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
