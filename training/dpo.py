"""DPO (Rafailov et al. 2023, "Direct Preference Optimization"): preference pairs, a frozen
reference, one loss.

Per pair (prompt x, chosen y_w, rejected y_l), the published loss:

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

log pi(y|x) is the sum of the policy's log-probs of the response tokens (the prompt is context);
beta * (log pi - log ref) is the response's implicit reward. The reference model is frozen, so
its log-probs are computed ONCE, before the first step (training.scoring, the training runtime,
on the run's mesh), and travel with the pairs: a step runs only the policy, on the chosen and
rejected rows together. Logged per step: `dpo` (the loss above), `reward_accuracy` (share of
pairs whose chosen reward exceeds the rejected), `reward_margin` (mean reward difference),
`chosen_logp` / `rejected_logp` (the policy's mean log-probs), and the router's `aux`
(`loss` = dpo + router_aux_loss_coef * aux, as in SFT).

Data: JSONL, one pair a line, the common layout: {"prompt": ..., "chosen": ..., "rejected": ...}
- plain text: three strings. A row is BOS + prompt + response + EOS, scored on response + EOS.
- chat: "prompt" a list of messages, "chosen" and "rejected" lists of messages that follow it
  (usually one assistant message). Rows are Meta's chat format (training.text.chat_document),
  scored on the response's assistant turns.
Other fields are ignored. A missing field, a chosen equal to its rejected, a response with
nothing to score or a pair longer than a row is a DataError naming the file and line.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .data import Batches, fingerprint, pad_rows
from .objective import add_router_loss, decode, token_logprobs
from .scoring import score_tokens
from .settings import require_number
from .text import DataError, Document, chat_document, jsonl_records

FIELDS = ("prompt", "chosen", "rejected")
SIDES = ("chosen", "rejected")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """The published loss per pair, from sequence log-probs [B] -> (loss [B], chosen reward [B],
    rejected reward [B])."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -jax.nn.log_sigmoid(chosen - rejected), chosen, rejected


@dataclass
class Pairs:
    """Preference pairs as rows of seq + 1 tokens: for each side, tokens, weights (1 on the
    response's targets) and real (False on padding) [R, T + 1]; and, once scored, the
    reference's sequence log-probs [R] (`ref_chosen`, `ref_rejected`)."""
    rows: dict[str, np.ndarray]

    def __len__(self):
        return len(self.rows["chosen_tokens"])

    def arrays(self) -> dict[str, np.ndarray]:
        return self.rows

    def fingerprint(self) -> str:
        return fingerprint(self.rows[k] for k in sorted(self.rows) if not k.startswith("ref_"))


def _text_pair_side(tok, prompt: str, response: str) -> Document:
    context = tok.encode(prompt, bos=True)
    answer = tok.encode(response, bos=False) + [tok.special["eos"]]
    w = np.r_[np.zeros(len(context)), np.ones(len(answer))].astype(np.float32)
    return Document(np.asarray(context + answer, np.int32), w)


def _encode(tok, rec, where: str) -> dict[str, Document]:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with {list(FIELDS)}")
    missing = [f for f in FIELDS if f not in rec]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; a preference pair has "
                        f"{list(FIELDS)}")
    if rec["chosen"] == rec["rejected"]:
        raise DataError(f"{where}: 'chosen' equals 'rejected': the pair prefers nothing")
    if all(isinstance(rec[f], str) for f in FIELDS):
        return {s: _text_pair_side(tok, rec["prompt"], rec[s]) for s in SIDES}
    if all(isinstance(rec[f], list) for f in FIELDS):
        docs = {}
        for s in SIDES:
            docs[s] = chat_document(tok, rec["prompt"] + rec[s], f"{where}: {s}",
                                    context=len(rec["prompt"]))
            if docs[s].weights.sum() == 0:
                raise DataError(f"{where}: '{s}' has no assistant message, so nothing to score")
        return docs
    kinds = {f: type(rec[f]).__name__ for f in FIELDS}
    raise DataError(f"{where}: 'prompt', 'chosen' and 'rejected' must be three strings (plain "
                    f"text) or three lists of messages (chat), got {kinds}")


def read_pairs(tok, path: str, seq: int, pad_id: int) -> Pairs:
    """The pairs of a JSONL file as rows of seq + 1 tokens (see the module docstring)."""
    sides: dict[str, list[Document]] = {s: [] for s in SIDES}
    for where, rec in jsonl_records(path):
        for s, doc in _encode(tok, rec, where).items():
            if len(doc.ids) > seq + 1:
                raise DataError(f"{where}: '{s}' is {len(doc.ids)} tokens with its prompt, more "
                                f"than a row of {seq + 1}; raise --seq")
            sides[s].append(doc)
    if not sides["chosen"]:
        raise DataError(f"preference file {path!r} has no pairs")
    rows = {}
    for s, docs in sides.items():
        tokens, weights, real = pad_rows(docs, seq, pad_id)
        rows |= {f"{s}_tokens": tokens, f"{s}_weights": weights, f"{s}_real": real}
    return Pairs(rows)


def sequence_logprobs(cfg, params, pairs: Pairs, batch: int, mesh=None, rules="combined"):
    """{side: sum of log p over the response tokens [R]} under (cfg, params)."""
    out = {}
    for s in SIDES:
        logp = score_tokens(cfg, params, pairs.rows[f"{s}_tokens"], batch, mesh, rules)
        out[s] = (logp * pairs.rows[f"{s}_weights"][:, 1:]).sum(-1)
    return out


def reward_accuracy(policy: dict, ref: dict) -> float:
    """Share of pairs whose implicit reward ranks chosen over rejected (beta > 0 scales both)."""
    return float(np.mean(policy["chosen"] - ref["chosen"] > policy["rejected"] - ref["rejected"]))


@dataclass(frozen=True)
class DPO:
    """`reference`: (cfg, params) of the frozen reference (usually the initial policy)."""
    reference: tuple
    beta: float = 0.1
    reference_path: str = ""   # recorded with the checkpoints (a resume refuses another)
    name = "dpo"
    rows_per_item = 2

    @staticmethod
    def read_data(tok, paths, seq: int, pad_id: int) -> tuple[Pairs, str, str]:
        parts = [read_pairs(tok, p, seq, pad_id) for p in paths]
        pairs = Pairs({k: np.concatenate([p.rows[k] for p in parts]) for k in parts[0].rows})
        return pairs, "pairs", f"{len(pairs)} preference pairs in rows of {seq + 1} tokens"

    def __post_init__(self):
        require_number(self, "beta", 0, open_low=True)

    def record(self) -> dict:
        return {"name": self.name, "beta": self.beta, "reference": self.reference_path}

    def frozen(self) -> dict:
        return {}

    def source(self, cfg, pairs: Pairs, run, plan):
        ref_cfg, ref_params = self.reference
        ref = sequence_logprobs(ref_cfg, ref_params, pairs, run.batch,
                                None if plan is None else plan.mesh, run.rules)
        return Batches(Pairs(pairs.rows | {"ref_chosen": ref["chosen"],
                                           "ref_rejected": ref["rejected"]}),
                       run.batch, run.seed)

    def loss(self, cfg, rt, plan):
        def f(params, batch, frozen):
            both = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
                    for k in ("tokens", "weights", "real")}                    # [2B, T + 1]
            logits, intermediates = decode(cfg, rt, params, both["tokens"][:, :-1])
            logp = jnp.sum(token_logprobs(logits, both["tokens"][:, 1:])
                           * both["weights"][:, 1:], axis=-1)                  # [2B]
            chosen, rejected = jnp.split(logp, 2)
            losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, batch["ref_chosen"],
                                                    batch["ref_rejected"], self.beta)
            loss = jnp.mean(losses)
            metrics = {"dpo": loss, "reward_accuracy": jnp.mean(r_chosen > r_rejected),
                       "reward_margin": jnp.mean(r_chosen - r_rejected),
                       "chosen_logp": jnp.mean(chosen), "rejected_logp": jnp.mean(rejected)}
            return add_router_loss(cfg, loss, metrics, intermediates, both["real"][:, :-1])
        return f
