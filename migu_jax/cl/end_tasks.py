"""The DAS end-task protocol: after continual pre-training, fine-tune a copy of the model on each domain's
labeled end task and report accuracy and macro-F1 (Ke et al., ICLR 2023; MIGU's Table 3).

``Config.end_tasks`` maps a domain to a labeled task folder (the benchmark layout of
:mod:`migu_jax.cl.data`, e.g. ``{"news/agnews": "TC/agnews-end"}`` as written by
experiments/build_text_domains.py). After the last domain, for each entry, the runner fine-tunes a fresh copy
of the final model (the encoder without its MLM head, or the causal LM) with the labeled-task head of its
family (:mod:`migu_jax.cl.heads`), plain AdamW (no mask: the protocol measures what pre-training left in the
model), ``end_task_epochs`` epochs at ``end_task_lr``, then scores the task's test records. The data order
is a pure function of ``(seed, task)`` as in the runner, so the numbers are reproducible.

Example:
  >>> macro_f1([0, 0, 1, 2], [0, 1, 1, 2], 3)
  0.7777777777777777
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from migu_jax.cl import batching as batching_lib


def macro_f1(pred: Sequence[int], gold: Sequence[int], n_labels: int) -> float:
  """The unweighted mean over labels of F1 (a label never predicted nor present counts as 0, as sklearn's
  ``f1_score(average="macro", labels=range(n_labels), zero_division=0)``)."""
  pred, gold = np.asarray(pred), np.asarray(gold)
  scores = []
  for k in range(n_labels):
    tp = np.sum((pred == k) & (gold == k))
    denominator = np.sum(pred == k) + np.sum(gold == k)
    scores.append(2 * tp / denominator if denominator else 0.0)
  return float(np.mean(scores))


def encoder_params(model_params: dict) -> dict:
  """The model parameters an end task starts from: a masked LM's without its ``mlm_head``."""
  return {k: v for k, v in model_params.items() if k != "mlm_head"}


def fine_tune_and_score(head, step_fn, start_state: Callable[[dict], tuple], model_params: dict, task_index: int,
                        task, *, batch_size: int, epochs: int, seed: int, key) -> dict:
  """Fine-tunes ``model_params`` on ``task.train`` with ``step_fn`` and scores ``task.test``.

  Args:
    head: the labeled-task head built for the end tasks (``task_index`` is the task's index there).
    step_fn: the compiled train step ``(params, opt_state, batch) -> (params, opt_state, loss)``.
    start_state: ``params -> (placed params, optimizer state)``.
    key: the PRNG key of the head's parameters and the dropout of each step.

  Returns:
    ``{"task", "accuracy", "macro_f1", "train_examples", "test_examples", "steps", "final_loss"}``.
  """
  head_key, step_key = jax.random.split(key)
  params, opt_state = start_state({"model": model_params, "head": head.init(head_key)})
  examples = [(task_index, r) for r in task.train]
  steps = batching_lib.steps_per_epoch(len(examples), batch_size) * epochs
  loss = float("nan")
  for k in range(steps):
    idx = batching_lib.batch_indices(len(examples), batch_size, seed, 1000 + task_index, k)
    batch = head.train_batch([examples[i] for i in idx])
    rng = jax.random.key_data(jax.random.fold_in(step_key, k))
    batch["rng"] = np.broadcast_to(np.asarray(rng), (batch_size, *rng.shape))
    params, opt_state, loss = step_fn(params, opt_state, batch)
    loss = float(loss)
    if not np.isfinite(loss):
      raise FloatingPointError(f"end task {task.name}, step {k}: the loss is {loss}; lower end_task_lr.")
  plain = {"model": params["model"], "head": params["head"]}
  pred = head.predict(plain, task_index, task.test)
  gold = [task.labels.index(r.label) for r in task.test]
  return {"task": task.name, "accuracy": float(np.mean(np.asarray(pred) == np.asarray(gold))),
          "macro_f1": macro_f1(pred, gold, len(task.labels)), "train_examples": len(task.train),
          "test_examples": len(task.test), "steps": steps, "final_loss": loss}


__all__ = ["encoder_params", "fine_tune_and_score", "macro_f1"]
