"""A training run's progress on stderr: a tqdm bar on a terminal; elsewhere (a log file, a pipe)
one plain line every N steps, since a bar redrawn with carriage returns makes a log one line of
hundreds of KB.

The loss is shown in the unit the run's summary uses: bits per byte when the tokens are bytes
(the byte tokenizer), else nats per token. `max_load` is the busiest expert's share of the routed
tokens, in the busiest MoE layer, times the number of experts: 1.00 when every expert gets its
share, E when one expert gets them all.
"""
from __future__ import annotations

import math
import sys

from tqdm.auto import tqdm

LINES_PER_RUN = 20  # the default spacing of the plain lines


def loss_text(ce: float, tokenizer=None) -> str:
    """A cross-entropy in nats per token, written in the run's unit."""
    from .text import is_byte_tokenizer
    if tokenizer is not None and is_byte_tokenizer(tokenizer):
        return f"{ce / math.log(2):.3f} bits/byte"
    return f"{ce:.3f} nats/token"


class Progress:
    def __init__(self, total: int, start: int, enabled: bool, every: int | None, num_experts: int,
                 tokenizer=None, stream=None):
        self.stream = stream or sys.stderr
        self.tokenizer, self.num_experts, self.total = tokenizer, num_experts, total
        self.enabled = enabled
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                            file=self.stream)
        self.every = every or max(1, total // LINES_PER_RUN)
        if enabled and num_experts:
            print(f"max_load: the busiest expert's share of the routed tokens x {num_experts} "
                  f"experts (1.00: balanced, {num_experts}: all on one)", file=self.stream)

    def _fields(self, rec: dict, load) -> dict[str, str]:
        # the data's loss where the objective has one (sft, distill), else the objective's own
        out = {"loss": loss_text(rec["ce"], self.tokenizer) if "ce" in rec else
                       f"{rec['loss']:.4f}",
               "tok/s": f"{rec['tokens_per_s']:,.0f}"}
        if load is not None:
            out["max_load"] = f"{float(load.max()) * self.num_experts:.2f}"
        return out

    def update(self, rec: dict, load=None):
        """After step rec["step"]; `load`: the step's [MoE layers, E] share per expert, if any."""
        if not self.enabled:
            return
        fields = self._fields(rec, load)
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(1)
        elif rec["step"] % self.every == 0 or rec["step"] == self.total:
            print(f"step {rec['step']}/{self.total}: "
                  + ", ".join(f"{k} {v}" for k, v in fields.items()), file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
