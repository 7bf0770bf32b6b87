"""What the command lines share. It imports nothing heavy: each CLI parses its arguments first
and imports JAX after, so that `--help` (and a bad flag) answers at once.

PRESETS and STRATEGIES repeat names that live in modules importing JAX (model.config.PRESETS,
sharding.RULES), for the flags' choices; tests/test_cli.py holds them equal.
"""
from __future__ import annotations

import argparse
import sys

PRESETS = ("behemoth", "maverick", "scout", "tiny")
STRATEGIES = ("combined", "context", "expert", "fsdp", "tensor")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other bad input; the usage is in --help
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser(module: str, doc: str) -> argparse.ArgumentParser:
    """A parser whose usage reads `python -m MODULE`, described by the module's docstring (its
    first line, then the rest after the flags); a bad flag is one `error:` line."""
    first, _, rest = doc.strip().partition("\n")
    return _Parser(prog=f"python -m {module}", description=first, epilog=rest.strip("\n") or None,
                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_devices(ap: argparse.ArgumentParser):
    ap.add_argument("--devices", type=int, metavar="N",
                    help="simulate N CPU devices, to try a --mesh on a machine without N "
                         "accelerators (runs on the CPU)")


def simulate_devices(args):
    """Apply --devices before anything starts JAX's backends; one `error:` line where it cannot
    apply."""
    if args.devices is None:
        return
    if args.mesh is None:
        sys.exit("error: --devices simulates the devices of a --mesh; pass a --mesh too")
    if args.devices < 1:
        sys.exit(f"error: --devices must be at least 1, got {args.devices}")
    import sharding
    try:
        sharding.simulate_cpu_devices(args.devices)
    except sharding.ShardingError as e:
        sys.exit(f"error: --devices: {e}")
