"""Training and fine-tuning of the Llama 4 text decoder: data, objective, step, checkpoints, loop.

    from training import OptimConfig, RunConfig, train
    state, history = train(cfg, lambda: model.init_params(cfg, key), rows, RunConfig(out=...), OptimConfig(...))

`experiments/train.py` is the command line over this package; `experiments/quickstart.py` the demo.
"""
from .checkpoint import Checkpointer, ResumeError, load_params
from .data import Batches, Rows, pack
from .loop import DivergedError, RunConfig, check_run, read_metrics, train
from .memory import MemoryLimitError
from .objective import load_balancing, loss_fn, router_logits
from .settings import SettingsError
from .step import OptimConfig, init_state, make_optimizer, make_train_step
from .text import byte_tokenizer, DataError, load_tokenizer, read_documents

__all__ = ["Batches", "byte_tokenizer", "check_run", "Checkpointer", "DataError", "DivergedError",
           "MemoryLimitError", "OptimConfig", "ResumeError", "Rows", "RunConfig", "init_state", "load_tokenizer",
           "load_balancing", "load_params", "loss_fn", "make_optimizer", "make_train_step", "pack",
           "read_documents", "read_metrics", "router_logits", "SettingsError", "train"]
