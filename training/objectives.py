"""The objectives `python -m experiments.train --objective NAME` trains with, and what the train
step and loop ask of one (each lives in its own file; this is the registry they are read from).

An objective is a small frozen value holding its settings (and the frozen models it needs):

- `loss(cfg, rt, plan)` -> f(params, batch, frozen) -> (loss, metrics): what the train step
  differentiates; `rt` is the policy's training runtime, `plan` the sharding plan or None.
- `frozen()` -> {name: (cfg, params)}: models the step reads but does not train (the
  distillation teacher). The loop places them like the policy and passes them to every step.
- `source(cfg, data, run, plan)`: where batch `step` comes from. A fixed order over the data
  (training.data.Batches: SFT, DPO, distillation) or rollouts sampled from the current params
  (GRPO). It also says what a checkpoint records of its position and restores it on resume.
- `rows_per_item`: model rows per batch item (a DPO pair is 2, a GRPO prompt its group):
  what the memory estimate and the tokens/s figure count.
- `record()`: the settings a checkpoint records (a resume with others is refused, naming the
  field), or None (SFT, whose checkpoints predate objectives).
- `read_data(tok, paths, seq, pad_id)` (a static method) -> (data, kind, summary): the
  objective's data files as `source` takes them, what they are (recorded with the
  checkpoints), and a line saying what they hold.
"""
from __future__ import annotations

from dataclasses import dataclass

from .data import Batches, read_token_data
from .distill import Distill
from .dpo import DPO
from .grpo import GRPO
from .objective import loss_fn


@dataclass(frozen=True)
class SFT:
    """Next-token cross-entropy on the data's targets (training.objective.loss_fn)."""
    name = "sft"
    rows_per_item = 1

    def loss(self, cfg, rt, plan):
        return lambda params, batch, frozen: loss_fn(cfg, rt, params, batch)

    def frozen(self) -> dict:
        return {}

    def source(self, cfg, rows, run, plan):
        return Batches(rows, run.batch, run.seed)

    def record(self) -> dict | None:
        return None

    read_data = staticmethod(read_token_data)


OBJECTIVES = {"sft": SFT, "dpo": DPO, "distill": Distill, "grpo": GRPO}
NAMES = tuple(OBJECTIVES)
