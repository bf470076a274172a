"""The continual-learning runner: one train loop, configured, with checkpoints and exact resume.

For each method and seed of a :class:`Config`, :func:`run_sequence` trains on the tasks of the order one
after the other and, before any training and after every task, evaluates on the test set of every task
(seen and unseen): the initial accuracies ``b`` and the accuracy matrix ``R[i][j]``. The data flows one
way::

    tasks -> examples (batching.training_examples) -> batches (head.train_batch)
          -> step(params, opt_state, batch) -> (loss, magnitudes) -> tx.update(..., magnitudes=) -> params
    params -> methods.eval_params -> head.correct (per task) -> a row of R

The runner orchestrates: the heads (:mod:`migu_jax.cl.heads`) compute losses and answers, the methods
(:mod:`migu_jax.cl.methods`) build optimizers and data mixes, :mod:`migu_jax.cl.checkpoint` saves,
:mod:`migu_jax.cl.report` writes results.

Checkpoints are written after the initial evaluation, every ``checkpoint_every`` steps, and after each
task's evaluation. The data order is a pure function of ``(seed, task, epoch)``, so a run killed at any
moment and started again with the same config continues from its last complete checkpoint and ends with
the same accuracy matrix as an uninterrupted run (bit-identical on CPU). Results (``result.json``) are
written only when a run is complete. Faults (:mod:`migu_jax.cl.faults`): a run holds its output folder's
lock; SIGTERM or SIGINT stops it after the current step with a checkpoint there (:class:`~migu_jax.cl.faults.Preempted`);
a damaged newest checkpoint is skipped for the newest readable one.

Example (a few minutes on CPU; the exact command of the main job is in experiments/configs/)::

    from migu_jax.cl import runner
    results = runner.run_experiment(runner.Config(order="dbpedia,agnews", train_per_class=8, max_test=50))
    print(results["comparison"])
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

import migu_jax as migu
from migu_jax.cl import atomic
from migu_jax.cl import batching as batching_lib
from migu_jax.cl import checkpoint as ckpt_lib
from migu_jax.cl import end_tasks as end_tasks_lib
from migu_jax.cl import faults
from migu_jax.cl import heads as heads_lib
from migu_jax.cl import methods as methods_lib
from migu_jax.cl import objectives as objectives_lib
from migu_jax.cl import optimizers as optimizers_lib
from migu_jax.cl import report as report_lib
from migu_jax.cl import text as text_lib
from migu_jax.cl import storage
from migu_jax.cl import tune as tune_lib
from migu_jax.cl.data import DataError, Task, load_task, resolve_order
from migu_jax.cl.locate import resolve_data_dir
from migu_jax.train_step import fetch_global


@dataclasses.dataclass
class Config:
  """Every setting of a continual-learning run. A config file's ``get_config()`` returns one (or a dict).

  Model and head: ``model`` (a preset such as ``"minilm"``, a local Hugging Face folder or a hub id);
  ``head`` (None: by model family, see :data:`migu_jax.cl.heads.DEFAULT_HEADS`); ``eval_mode``
  (language-model heads: ``"options"`` or ``"generate"``, the matrix and metrics of the run);
  ``also_eval`` (more evaluation modes, each with its own matrix and metrics under ``"also"`` in the
  results, e.g. ``("options",)`` beside ``eval_mode="generate"``); ``max_length``, ``length_buckets``,
  ``temperature``, ``learn_temperature``, ``eval_batch_size``, ``max_new_tokens`` (see
  :class:`migu_jax.cl.heads.HeadConfig`).

  Data: ``data_dir`` (None: ``$MIGU_DATA_DIR``, else the shared copy next to the repository);
  ``order`` (a built-in order "1".."6", or task names); ``train_per_class`` and ``max_test`` (None: all);
  ``eval_split`` (``"test"``, or ``"dev"``: evaluate on ``dev_per_class`` records per label carved out of
  each task's training records, for choosing the learning rate without the test set, see
  :mod:`migu_jax.cl.tune`; text domains: ``dev_per_class`` documents of the training file); ``copa_prompt`` (``"reference"``: COPA without instruction and options, as
  the reference; ``"instruction"``); ``padding`` (training batches: ``"longest"`` row rounded up to
  ``pad_multiple``, as the reference, or the fixed ``"buckets"``).

  Objective: ``objective`` (``"task"``: the labeled tasks and heads above; ``"lm"``: continual
  pre-training on text domains, :mod:`migu_jax.cl.text`, with the model's own objective,
  :mod:`migu_jax.cl.objectives`: masked LM for BERT/RoBERTa with ``mlm_probability``, causal LM for Llama,
  span corruption for T5;
  the matrix then holds held-out perplexities, lower is better, see :mod:`migu_jax.cl.perplexity`). With
  ``"lm"``, ``order`` names ``group/domain`` folders, ``max_length`` is the block size, ``train_per_class``
  and ``max_test`` cap the training and test documents per domain, and ``general`` (a folder with
  test.txt or test.jsonl) adds the perplexity of a general held-out corpus after every stage.
  ``end_tasks`` (``{"group/domain": "Category/task"}``) runs the DAS end-task protocol after the sequence
  (:mod:`migu_jax.cl.end_tasks`): a copy of the final model fine-tuned on each labeled task
  (``end_task_train_per_class`` records per label, ``end_task_max_test`` test records, ``end_task_epochs``
  epochs at ``end_task_lr``, default ``learning_rate``), with accuracy and macro-F1.

  Methods: ``methods`` (names from :data:`migu_jax.cl.methods.METHODS`, run side by side), ``seeds``,
  ``ratio`` (MIGU's T), ``exact_count``, ``threshold`` (a rule of :data:`migu_jax.THRESHOLDS`; None:
  ``"quantile"``, or ``"top_k"`` with ``exact_count``, which with another rule is an error; see
  :func:`migu_jax.masking.resolve_threshold`), ``padding_aware`` (padded positions do not count in the
  magnitudes), ``mask_targets`` (the layers masked: ``("attention",)``, ``("ffn",)`` or regular expressions
  searched in kernel paths, see :data:`migu_jax.cl.optimizers.LAYER_TYPES`; empty: all),
  ``mask_tied_embedding`` (a tied LM head's embedding is masked by vocabulary row, as the reference's
  shared ``lm_head`` weight; False leaves it unmasked), ``first_task_unmasked``, ``replay_fraction``, ``lora_rank``, ``lora_alpha``, ``lora_dropout``,
  ``lora_targets`` (substrings of module names; empty: every linear).

  A method may carry its own learning rate as ``"name@rate"`` (``"migu@3e-4"``): its runs, folders and
  report rows keep that name; plain names train at ``learning_rate``. With ``tune_rates`` (e.g.
  ``(3e-5, 1e-4, 3e-4)``), :func:`run_experiment` first chooses each method's rate on the dev split (one
  seed, ``tune_seed``; :mod:`migu_jax.cl.tune`), then runs each method at its chosen rate and, with
  ``tune_keep_fixed``, at ``learning_rate`` too (the paper's fixed rate beside the tuned one).

  Optimization: AdamW (``learning_rate``, ``schedule`` (a name of
  :data:`migu_jax.cl.optimizers.SCHEDULES`) with ``warmup_steps``, ``weight_decay``, ``adam_b1/b2/eps``),
  ``weight_decay`` is 0 by default, as the reference code (``run_uie_ft.py``); the paper's table lists
  0.01. ``clip_norm`` (after the mask; None: off), ``batch_size``, ``micro_batches``, ``epochs``,
  ``task_epochs`` (per-task epoch counts, ``{"wic": 2}``; None: the reference's, 2 epochs for WiC in order
  5 and MNLI in order 6, :data:`migu_jax.cl.methods.REFERENCE_EPOCHS`), ``dropout`` (train with the
  checkpoint's dropout rates, e.g. T5's 0.1; evaluation never drops),
  ``reset_optimizer`` (a fresh optimizer state at every task, as the reference; False carries the
  moments and step count over).

  Precision: ``dtype`` (the models' compute dtype: ``"float32"``, or ``"bfloat16"`` on TPUs),
  ``param_dtype`` (the stored parameters, hence gradients and AdamW moments: ``"float32"`` by default, also
  under bfloat16 compute), ``remat`` (recompute each layer in the backward pass: less activation memory,
  the same results), ``scan_layers`` (Llama only: the decoder layers as one ``nn.scan``, one compiled layer
  for any depth, parameters stacked per layer; the magnitudes are captured per layer and each layer keeps
  its own threshold, so the run computes what the unrolled one does; its checkpoints hold the stacked
  layout, so a run resumes with the value it started with). MIGU's statistics are float32 whatever the
  compute dtype (:func:`migu_jax.sum_abs`).

  Run: ``output_dir``, ``checkpoint_every`` (steps), ``keep_checkpoints``, ``magnitude_batches`` (batches
  per task whose magnitudes are kept for the plots), ``progress`` (tqdm bars).

  Devices: ``mode`` (the train step's, see :func:`migu_jax.make_train_step`: ``"jit"`` one device,
  ``"mesh"`` a global mesh of every device of every process, e.g. a TPU pod slice); ``mesh_shape`` (mesh
  mode: ``(data,)`` or ``(data, model)``, one entry may be -1 for "the rest"; None: every device on the
  data axis), ``data_axis`` and ``model_axis`` (the mesh's axis names). On a mesh the global batch of
  ``batch_size`` rows is split over the data axis, each process feeding rows ``process_index::process_count``
  of every batch; the state is replicated, or with a model axis split along each leaf's last axis that
  divides by its size (see :func:`shard_spec`). ``sharding``: ``"replicated"`` (as just said) or ``"fsdp"``
  (mesh mode: parameters, gradients, optimizer state and MIGU's statistics split by the model family's
  rules, ``embed`` over the data axis and ``vocab``/``mlp``/``heads`` over the model axis; see
  :mod:`migu_jax.sharding`). Evaluation runs on the same mesh (:func:`eval_placement`): the parameters stay
  where training placed them and each evaluation batch is split over the data axis. These settings change
  where the same computation runs, not what it computes: a run may resume on another mode, mesh or sharding.
  """

  model: str = "minilm"
  objective: str = "task"
  general: str | None = None
  mlm_probability: float = 0.15
  end_tasks: dict[str, str] | None = None
  end_task_epochs: int = 1
  end_task_lr: float | None = None
  end_task_train_per_class: int | None = 32
  end_task_max_test: int | None = 200
  head: str | None = None
  eval_mode: str = "options"
  also_eval: tuple[str, ...] = ()
  data_dir: str | None = None
  order: str | tuple[str, ...] = "1"
  train_per_class: int | None = 32
  max_test: int | None = 200
  eval_split: str = "test"
  dev_per_class: int = 16
  tune_rates: tuple[float, ...] = ()
  tune_seed: int | None = None
  tune_keep_fixed: bool = True
  copa_prompt: str = "reference"
  methods: tuple[str, ...] = ("seqft", "migu")
  seeds: tuple[int, ...] = (0,)
  ratio: float = 0.7
  exact_count: bool = False
  threshold: str | None = None
  padding_aware: bool = False
  mask_targets: tuple[str, ...] = ()
  mask_tied_embedding: bool = True
  first_task_unmasked: bool = True
  replay_fraction: float = 0.02
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ("query", "value")
  learning_rate: float = 5e-5
  schedule: str = "constant"
  warmup_steps: int = 0
  reset_optimizer: bool = True
  weight_decay: float = 0.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  clip_norm: float | None = 1.0
  batch_size: int = 16
  micro_batches: int = 1
  epochs: int = 1
  task_epochs: dict[str, int] | None = None
  dropout: bool = True
  max_length: int = 128
  padding: str = "longest"
  pad_multiple: int = 8
  length_buckets: tuple[int, ...] = heads_lib.LENGTH_BUCKETS
  temperature: float = 0.05
  learn_temperature: bool = True
  eval_batch_size: int = 32
  max_new_tokens: int | None = None
  output_dir: str = "runs/default"
  checkpoint_every: int = 50
  keep_checkpoints: int = 2
  magnitude_batches: int = 2
  progress: bool = True
  mode: str = "jit"
  mesh_shape: tuple[int, ...] | None = None
  data_axis: str = "data"
  model_axis: str = "model"
  sharding: str = "replicated"
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = False

  def __post_init__(self):
    self._normalize()
    self._check_training()
    self._check_objective()
    self._check_placement()

  def _normalize(self):
    """Comma-separated strings and single values as tuples; mappings with string keys."""
    for name in ("methods", "seeds", "length_buckets", "lora_targets", "mask_targets", "tune_rates", "also_eval"):
      value = getattr(self, name)
      if isinstance(value, (str, int, float)):
        value = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else [value]
      cast = {"seeds": int, "length_buckets": int, "tune_rates": float}.get(name)
      setattr(self, name, tuple(cast(v) for v in value) if cast else tuple(value))
    if self.task_epochs is not None:
      self.task_epochs = {str(k): int(v) for k, v in dict(self.task_epochs).items()}
      if any(v < 1 for v in self.task_epochs.values()):
        raise ValueError(f"Config.task_epochs={self.task_epochs!r}: every count must be >= 1.")
    if not isinstance(self.order, str):
      self.order = tuple(self.order)

  def _check_training(self):
    """Sizes, MIGU's ratio, methods, seeds, threshold, evaluation split and padding."""
    for name in ("batch_size", "micro_batches", "epochs", "max_length", "eval_batch_size", "checkpoint_every"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"Config.{name}={getattr(self, name)!r} must be >= 1.")
    if self.batch_size % self.micro_batches:
      raise ValueError(f"Config.batch_size={self.batch_size} is not divisible by micro_batches="
                       f"{self.micro_batches}; choose a batch size that is a multiple of it.")
    if not 0.0 <= self.ratio < 1.0:
      raise ValueError(f"Config.ratio={self.ratio} (MIGU's T) must be in [0, 1); 0.7 keeps 30% of each layer.")
    if self.eval_split not in ("test", "dev"):
      raise ValueError(f"Config.eval_split={self.eval_split!r}; expected 'test' or 'dev' (a split of the "
                       "training records, for tuning).")
    if self.padding not in heads_lib.PADDINGS:
      raise ValueError(f"Config.padding={self.padding!r}; choose one of {heads_lib.PADDINGS}.")
    if not self.methods:
      raise ValueError("Config.methods is empty; name at least one of " + ", ".join(methods_lib.METHODS) + ".")
    if not self.seeds:
      raise ValueError("Config.seeds is empty; give at least one seed, e.g. (0,).")
    for name in self.methods:
      methods_lib.get_method(name)
    migu.masking.resolve_threshold(self.exact_count, self.threshold)  # a contradiction fails here, not later

  def _check_objective(self):
    """The objective and the settings only one objective takes."""
    if self.objective not in objectives_lib.OBJECTIVES:
      raise ValueError(f"Config.objective={self.objective!r}; choose one of {objectives_lib.OBJECTIVES} ('task': "
                       "labeled tasks, 'lm': text domains with the model's own objective).")
    if self.objective == "lm" and self.also_eval:
      raise ValueError("Config.objective='lm' is evaluated by perplexity on each domain's documents: also_eval "
                       "does not apply; leave it at its default.")
    if self.general and self.objective != "lm":
      raise ValueError(f"Config.general={self.general!r} (a general corpus' perplexity) needs objective='lm' "
                       "(--objective lm).")
    if self.end_tasks:
      self.end_tasks = {str(k): str(v) for k, v in dict(self.end_tasks).items()}
      unknown = sorted(set(self.end_tasks) - set(resolve_order(self.order)))
      if self.objective != "lm" or unknown:
        raise ValueError(f"Config.end_tasks={self.end_tasks!r}: needs objective='lm' and keys among the domains of "
                         f"the order ({', '.join(resolve_order(self.order))}); not in it: {unknown}.")
    if not 0.0 < self.mlm_probability < 1.0:
      raise ValueError(f"Config.mlm_probability={self.mlm_probability} must be in (0, 1); BERT uses 0.15.")

  def _check_placement(self):
    """Mode, mesh shape, dtypes and sharding."""
    if self.mode not in ("jit", "mesh"):
      raise ValueError(f"Config.mode={self.mode!r}; expected 'jit' (one device) or 'mesh' (every device of "
                       "every process, data-parallel).")
    if self.mesh_shape is not None:
      if isinstance(self.mesh_shape, (int, str)):
        self.mesh_shape = (self.mesh_shape,) if isinstance(self.mesh_shape, int) else tuple(
            int(v) for v in self.mesh_shape.replace("x", ",").split(",") if v.strip())
      self.mesh_shape = tuple(int(v) for v in self.mesh_shape)
      if self.mode != "mesh" or not 1 <= len(self.mesh_shape) <= 2:
        raise ValueError(f"Config.mesh_shape={self.mesh_shape!r} needs mode='mesh' and one or two axes: "
                         f"(data,) or (data, model), e.g. (-1, 2).")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"Config.{name}={getattr(self, name)!r}; expected one of {sorted(DTYPES)}.")
    if self.sharding not in ("replicated", "fsdp"):
      raise ValueError(f"Config.sharding={self.sharding!r}; expected 'replicated' or 'fsdp'.")
    if self.sharding == "fsdp" and self.mode != "mesh":
      raise ValueError("Config.sharding='fsdp' shards the state over a mesh; set mode='mesh' too.")

  @classmethod
  def from_dict(cls, values: dict) -> "Config":
    """A Config from a dict; an unknown key is an error that lists the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"Unknown config key(s) {unknown}. Known keys: {', '.join(sorted(known))}.")
    return cls(**values)

  def replace(self, **changes) -> "Config":
    return self.from_dict({**self.to_dict(), **{k: v for k, v in changes.items()}})

  def to_dict(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def head_config(self) -> heads_lib.HeadConfig:
    return heads_lib.HeadConfig(max_length=self.max_length, length_buckets=self.length_buckets,
                                padding=self.padding, pad_multiple=self.pad_multiple,
                                copa_prompt=self.copa_prompt,
                                temperature=self.temperature, learn_temperature=self.learn_temperature,
                                eval_mode=self.eval_mode, eval_batch_size=self.eval_batch_size,
                                max_new_tokens=self.max_new_tokens)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
"""The names ``Config.dtype`` and ``Config.param_dtype`` take."""

# Settings that do not change what a run computes (bookkeeping, placement, the tuning protocol): left out
# of its identity, so a run resumes under other values of these.
_RUN_ONLY = ("output_dir", "progress", "methods", "seeds", "checkpoint_every", "keep_checkpoints",
             "magnitude_batches", "mode", "mesh_shape", "data_axis", "model_axis", "sharding", "remat", "tune_rates", "tune_seed",
             "tune_keep_fixed")


def _json_ready(value):
  if isinstance(value, tuple):
    return [_json_ready(v) for v in value]
  if isinstance(value, dict):
    return {k: _json_ready(v) for k, v in value.items()}
  return value


def _identity(cfg: Config, method: str, seed: int) -> dict:
  values = {k: v for k, v in cfg.to_dict().items() if k not in _RUN_ONLY}
  # Checkpoints written when the default threshold was "quantile" hold that value: None means it there.
  values["threshold"] = values["threshold"] or "quantile"
  return _json_ready({**values, "method": method, "seed": seed})


def _fingerprint(values: dict) -> str:
  return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def data_dir(cfg: Config) -> Path:
  """``cfg.data_dir``, else ``$MIGU_DATA_DIR``, else the shared copy next to the repository, else the
  hub (see :func:`migu_jax.cl.locate.resolve_data_dir`)."""
  return resolve_data_dir(cfg.data_dir, tasks=resolve_order(cfg.order), use_shared=True)


def load_tasks(cfg: Config, seed: int) -> list[Task]:
  """The tasks of ``cfg.order``, subsampled (train per class, max test) with ``seed``; with
  ``objective="lm"``, the text domains, packed into token blocks by the run's objective."""
  root = data_dir(cfg)
  dev = cfg.dev_per_class if cfg.eval_split == "dev" else None  # with objective="lm": documents per domain
  if cfg.objective == "lm":
    objective = _head(cfg, ())
    return [objective.pack(text_lib.load_domain(root, name, max_train=cfg.train_per_class, max_test=cfg.max_test,
                                                seed=seed, dev_docs=dev)) for name in resolve_order(cfg.order)]
  return [load_task(root, name, train_per_class=cfg.train_per_class, max_test=cfg.max_test, seed=seed,
                    dev_per_class=dev) for name in resolve_order(cfg.order)]


def load_general(cfg: Config, seed: int) -> text_lib.TextDomain | None:
  """The general held-out corpus of ``cfg.general`` packed by the run's objective, or None."""
  if not cfg.general:
    return None
  return _head(cfg, ()).pack(text_lib.load_corpus(cfg.general, max_docs=cfg.max_test, seed=seed))


@functools.lru_cache(maxsize=2)
def load_model(spec: str, objective: str = "task", dtype: str = "float32", remat: bool = False,
               scan_layers: bool = False):
  """``(model, params, tokenizer)`` of a preset, local folder or hub id (cached: runs share it); the model
  computes in ``dtype`` (a name of :data:`DTYPES`), with ``remat`` recomputing its layers in the backward
  pass and ``scan_layers`` (Llama) scanning them (:func:`scan_model`); the parameters are float32.
  ``objective="lm"``: with the LM head (:func:`migu_jax.cl.objectives.load_language_model`)."""
  if objective == "lm":
    model, params, tokenizer = objectives_lib.load_language_model(spec, DTYPES[dtype], remat)
  else:
    from migu_jax.models import from_pretrained
    model, params, tokenizer = from_pretrained(spec, dtype=DTYPES[dtype], remat=remat)
  return (*scan_model(spec, model, params), tokenizer) if scan_layers else (model, params, tokenizer)


def scan_model(spec: str, model, params):
  """``(model, params)`` of a loaded Llama with its decoder layers scanned (``Config.scan_layers``, the
  layers' parameters stacked); another family is an error naming the fix."""
  from migu_jax.models import llama
  if not isinstance(model, llama.LlamaForCausalLM):
    raise ValueError(f"Config.scan_layers scans the decoder layers of Llama models only; {spec!r} is a "
                     f"{model.config.model_type!r} model. Drop --scan-layers (scan_layers=False).")
  scanned = llama.LlamaForCausalLM(dataclasses.replace(model.config, scan_layers=True))
  return scanned, llama.params.stack_layers(params)


def run_model(cfg: Config):
  """:func:`load_model` with the run's objective and precision settings (``cfg.dtype``, ``cfg.remat``,
  ``cfg.scan_layers``)."""
  return load_model(cfg.model, cfg.objective, cfg.dtype, cfg.remat, cfg.scan_layers)


def cast_floats(tree, dtype: str):
  """The floating-point leaves of ``tree`` in ``dtype`` (a name of :data:`DTYPES`); other leaves as they are.

  Example:
    >>> cast_floats({"w": np.ones(2, np.float32), "step": np.int32(3)}, "bfloat16")["w"].dtype
    dtype(bfloat16)
  """
  target = DTYPES[dtype]
  return jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# --------------------------------------------------------------------------------------------------
# Evaluation (separate from training)
# --------------------------------------------------------------------------------------------------


def _bar(cfg: Config, **kwargs):
  from tqdm.auto import tqdm
  return tqdm(disable=not (cfg.progress and is_writer()), dynamic_ncols=True, leave=False, **kwargs)


def evaluate(head: heads_lib.Head, params, tasks: Sequence[Task], *, cfg: Config, desc: str = "eval",
             mode: str | None = None, speed: dict | None = None) -> list[float]:
  """Accuracy on the test set of every task, with plain ``{"model", "head"}`` parameters (by ``mode``,
  default the head's evaluation mode).

  ``speed``: if given, the test examples' tokens and the seconds taken are added to its ``eval_tokens``
  and ``eval_s``."""
  row, tokens, start = [], 0, time.perf_counter()
  with _bar(cfg, total=sum(len(t.test) for t in tasks), desc=desc, unit="ex") as bar:
    for j, task in enumerate(tasks):
      if getattr(head, "metric", "accuracy") == "perplexity":
        row.append(head.perplexity(params, j, task.test, progress=bar.update))
      else:
        row.append(head.correct(params, j, task.test, progress=bar.update, mode=mode) / len(task.test))
      tokens += example_tokens(head, [(j, r) for r in task.test])
      bar.set_postfix_str(" ".join(f"{a:.2f}" for a in row) + f" {tokens / (time.perf_counter() - start):.0f} tok/s")
  if speed is not None:
    speed["eval_tokens"] = speed.get("eval_tokens", 0) + tokens
    speed["eval_s"] = speed.get("eval_s", 0.0) + time.perf_counter() - start
  return row


def batch_tokens(batch: dict) -> int:
  """Real (unpadded) tokens of a head's batch: the input mask, plus the decoder's for T5."""
  return int(np.sum(batch["mask"])) + int(np.sum(batch.get("dec_mask", 0)))


def example_tokens(head: heads_lib.Head, examples, chunk: int = 256) -> int:
  """Real tokens of ``examples`` as training rows (prompt and answer): the unit of the reported tokens/s."""
  return sum(batch_tokens(head.train_batch(examples[i:i + chunk])) for i in range(0, len(examples), chunk))


_SEEN_SHAPES: set = set()


def _compiles(step_fn, batch: dict) -> bool:
  """Whether this call of ``step_fn`` is the first with these batch shapes in this process (it compiles)."""
  key = (id(step_fn), tuple(sorted((k, np.shape(v)) for k, v in batch.items())))
  new = key not in _SEEN_SHAPES
  _SEEN_SHAPES.add(key)
  return new


def capture_magnitudes(head: heads_lib.Head, params, examples, cfg: Config, seed: int, n_batches: int
                       ) -> dict[str, np.ndarray]:
  """Output magnitudes of every linear layer of the plain model, summed over ``n_batches`` batches of
  ``examples`` (drawn with ``seed``), as ``{"layer/path/kernel": vector}``. ``head`` is ``cfg``'s (the one
  the runner builds for it): the compiled capture is reused by ``cfg``'s head settings, and runs by its
  placement (on a mesh: every process takes part, each gets the result)."""
  def build():
    forward = methods_lib.make_forward(methods_lib.get_method("seqft"), cfg, head.model)
    return jax.jit(lambda p, b: head.loss(forward, p, b)[1]["model"])

  fn = _cached(("magnitudes",) + _head_key(cfg), build)
  total = None
  rng = np.random.default_rng([seed, 99])
  for _ in range(n_batches):
    idx = rng.choice(len(examples), min(cfg.batch_size, len(examples)), replace=False)
    mags = fn(params, head.placement.put(head.train_batch([examples[i] for i in idx])))
    total = mags if total is None else jax.tree.map(jnp.add, total, mags)
  total = head.placement.get(total)
  if cfg.scan_layers:  # one vector per layer, under the unrolled model's names
    from migu_jax.models import llama
    total = llama.params.unstack_layers(total)
  return {"/".join(p): np.asarray(v).reshape(-1) for p, v in traverse_util.flatten_dict(total).items()}


def is_writer() -> bool:
  """Whether this process writes results, logs and plots: process 0 (every process saves checkpoints)."""
  return jax.process_index() == 0


def _exists_everywhere(path: epath.Path) -> bool:
  """Whether ``path`` exists on every process: each then takes the same branch (on a mesh, evaluation is a
  computation of all processes together; a file one host does not see yet must not make it skip one)."""
  exists = path.exists()
  if jax.process_count() == 1:
    return exists
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(exists))))


def _save_npz(path: epath.Path, arrays: dict[str, np.ndarray]) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  atomic.write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------------
# The train loop
# --------------------------------------------------------------------------------------------------

Callback = Callable[[str, dict], None]
"""``callback(event, info)``: events ``"initial"`` (before the initial evaluation; ``info["params"]``: the
model's plain parameters, placed as evaluation takes them: on a mesh, sharded as in training), ``"step"``
(after each train step), ``"saved"`` (after each checkpoint), ``"trained"`` (after a task's last step, with
``"task"`` and ``"params"``), ``"task_done"`` (after each task's evaluation, with its ``"row"``). Every
process calls them."""


_HEAD_KEYS = ("model", "objective", "mlm_probability", "head", "eval_mode", "order", "max_length", "length_buckets",
              "temperature", "learn_temperature", "eval_batch_size", "max_new_tokens", "padding", "pad_multiple",
              "copa_prompt", "dtype", "remat", "scan_layers")

_REUSED: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
"""This process' heads and compiled train steps, keyed by the settings that make them (JSON), so later runs
of one process (seeds, resumed runs, the CLI's) reuse them."""

_REUSED_MAX = 4
"""How many settings :data:`_REUSED` keeps (least recently used out first). Each holds compiled programs, one
per padded batch shape (up to ``max_length / pad_multiple`` of them): a tuning process that kept 16 settings
of MiniLM grew to 9.7 GB and failed to allocate compiled code."""


def _cached(key: tuple, build: Callable[[], Any]):
  if key in _REUSED:
    _REUSED.move_to_end(key)
  else:
    _REUSED[key] = build()
    while len(_REUSED) > _REUSED_MAX:
      _REUSED.popitem(last=False)
  return _REUSED[key]


_PLACEMENT_KEYS = ("mode", "mesh_shape", "data_axis", "model_axis")
"""The settings of a head's :func:`eval_placement` (part of its key, not of a run's identity)."""


def _head_key(cfg: Config) -> tuple:
  return ("head",) + tuple(json.dumps(_json_ready(getattr(cfg, k))) for k in _HEAD_KEYS + _PLACEMENT_KEYS)


def _head(cfg: Config, tasks: Sequence[Task]) -> heads_lib.Head:
  """The run's head, evaluating by :func:`eval_placement`; it uses only the tasks' names, categories and
  labels, the same for every seed."""

  def build():
    model, _, tokenizer = run_model(cfg)
    if cfg.objective == "lm":
      return objectives_lib.make_objective(model, tokenizer, objectives_lib.ObjectiveConfig(
          max_length=cfg.max_length, eval_batch_size=cfg.eval_batch_size, mlm_probability=cfg.mlm_probability),
          eval_placement(cfg))
    return heads_lib.make_head(cfg.head, model, tokenizer, tasks, cfg.head_config(), eval_placement(cfg))

  return _cached(_head_key(cfg), build)


def make_mesh(cfg: Config) -> jax.sharding.Mesh:
  """The global mesh of ``cfg.mesh_shape`` over every device of every process (axes data[, model])."""
  shape = list(cfg.mesh_shape or (-1,))
  n = jax.device_count()
  if shape.count(-1) > 1:
    raise ValueError(f"Config.mesh_shape={cfg.mesh_shape}: at most one axis may be -1.")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = n // rest if rest and n % rest == 0 else 0
  if int(np.prod(shape)) != n:
    raise ValueError(f"Config.mesh_shape={cfg.mesh_shape} does not cover the {n} devices "
                     f"({jax.process_count()} process(es)); use e.g. ({n},) or (-1, 2).")
  names = (cfg.data_axis, cfg.model_axis)[:len(shape)]
  return jax.make_mesh(tuple(shape), names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def shard_spec(shape: tuple[int, ...], model_size: int, model_axis: str) -> jax.sharding.PartitionSpec:
  """The parameter sharding rule of the mesh mode: a leaf is split along its last axis that divides by the
  model axis' size (kernels' output features with their biases and norms, the embedding width, their AdamW
  moments); scalars and leaves with no such axis are replicated. It is the layout XLA's propagation gives
  the train step's outputs, so the state keeps its layout from step to step (one compilation)."""
  P = jax.sharding.PartitionSpec
  axes = [i for i, n in enumerate(shape) if model_size > 1 and n % model_size == 0]
  if not axes:
    return P()
  return P(*[model_axis if i == axes[-1] else None for i in range(axes[-1] + 1)])


def eval_placement(cfg: Config) -> heads_lib.EvalPlacement:
  """Where the run evaluates. One device (``mode="jit"``): as built. A mesh: the run's mesh
  (:func:`make_mesh`), the parameters left where training placed them (no gather: a model that trains
  sharded evaluates sharded), each batch padded to a multiple of the data axis' size and split over it
  (:func:`migu_jax.sharding.shard_rows`), results fetched to every process as the state is
  (:func:`migu_jax.train_step.fetch_global`). Every process evaluates the same records together."""
  if cfg.mode != "mesh":
    return heads_lib.EvalPlacement()
  mesh = make_mesh(cfg)
  return heads_lib.EvalPlacement(rows=dict(mesh.shape)[cfg.data_axis],
                                 put=functools.partial(migu.sharding.shard_rows, mesh=mesh, data_axis=cfg.data_axis),
                                 get=fetch_global)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the run's state lives: ``place`` puts a pytree there, ``fetch`` brings it back as host values
  (the same on every process; for checkpoints), ``local_rows`` picks this process' rows of a global host
  batch. Evaluation takes the state as placed (see :func:`eval_placement`)."""

  place: Callable[[Any], Any]
  fetch: Callable[[Any], Any]
  local_rows: Callable[[dict], dict]


def state_specs(cfg: Config, model, mesh: jax.sharding.Mesh) -> Callable[[Any], Any] | None:
  """``tree -> PartitionSpec per leaf`` of ``cfg.sharding="fsdp"``: the rules of ``model``'s family
  (:func:`migu_jax.models.param_axes`) on ``mesh``; None for ``"replicated"``."""
  if cfg.sharding != "fsdp":
    return None
  from migu_jax.models import param_axes
  return migu.sharding.specs_by_rules(param_axes(model.config.model_type), mesh, "fsdp",
                                      data_axis=cfg.data_axis, model_axis=cfg.model_axis)


def _placement(cfg: Config, step: migu.TrainStep) -> Placement:
  """The runner's view of where ``step`` keeps the state: ``step.place_state`` and ``step.fetch`` (on a mesh,
  by the ``state_specs`` the step was built with, see :func:`_mesh_specs`), and this process' rows of a
  batch."""
  if cfg.mode != "mesh":
    return Placement(step.place_state, step.fetch, lambda batch: batch)
  index, count = jax.process_index(), jax.process_count()

  def local_rows(batch):
    return batch if count == 1 else jax.tree.map(lambda x: x[index::count], batch)

  return Placement(step.place_state, step.fetch, local_rows)


def _mesh_specs(cfg: Config, model, mesh: jax.sharding.Mesh) -> Callable[[Any], Any]:
  """``tree -> PartitionSpec per leaf`` of the run's state on ``mesh``: the model family's rules for
  ``sharding="fsdp"`` (:func:`state_specs`), else :func:`shard_spec` of every leaf."""
  specs = state_specs(cfg, model, mesh)
  if specs is not None:
    return specs
  model_size = dict(zip(mesh.axis_names, mesh.devices.shape)).get(cfg.model_axis, 1)
  return lambda tree: jax.tree.map(lambda x: shard_spec(np.shape(x), model_size, cfg.model_axis), tree)


def _step_and_placement(cfg: Config, method: methods_lib.Method, seed: int, head: heads_lib.Head):
  """``(tx, step, placement)``, built once per setting (see :func:`_placement`)."""
  # The step depends on the seed only through the random mask's key (the rest comes in with each batch),
  # so the other methods' seeds share one compiled step.
  step_seed = seed if method.mask == "random" else None
  key = ("step", _head_key(cfg), json.dumps(_identity(cfg, method.name, step_seed), sort_keys=True, default=str),
         cfg.mode, cfg.mesh_shape, cfg.data_axis, cfg.model_axis, cfg.sharding)

  def build():
    tx = optimizers_lib.make_optimizer(method, cfg, seed)
    forward = methods_lib.make_forward(method, cfg, head.model)

    def loss_fn(p, batch):
      return head.loss(forward, p, batch, rng=jax.random.wrap_key_data(batch["rng"][0]))

    mesh = make_mesh(cfg) if cfg.mode == "mesh" else None
    if mesh is not None:
      data_size = dict(zip(mesh.axis_names, mesh.devices.shape))[cfg.data_axis]
      if cfg.batch_size % (data_size * cfg.micro_batches):
        raise ValueError(f"Config.batch_size={cfg.batch_size} does not split over the mesh's {data_size} data "
                         f"shards x micro_batches={cfg.micro_batches}; use a multiple of "
                         f"{data_size * cfg.micro_batches}.")
    specs = _mesh_specs(cfg, head.model, mesh) if mesh is not None else None
    step = migu.make_train_step(loss_fn, tx, micro_batches=cfg.micro_batches, mode=cfg.mode, mesh=mesh,
                                data_axis=cfg.data_axis, state_specs=specs)
    return tx, step, _placement(cfg, step)

  return _cached(key, build)


def params_digest(params) -> str:
  """SHA-256 of the parameters' bytes (in tree order): equal digests mean bit-identical parameters."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


def run_folder(cfg: Config, method: str, seed: int) -> epath.Path:
  """``<output_dir>/<method>/seed_<seed>``, local or remote (see :mod:`migu_jax.cl.storage`)."""
  return storage.output_path(cfg.output_dir) / method / f"seed_{seed}"


def run_sequence(cfg: Config, method_name: str, seed: int, *, callbacks: Sequence[Callback] = ()) -> dict:
  """Trains ``method_name`` on the task sequence with ``seed``, resuming from the run's checkpoints.

  The run holds the output folder's lock, and SIGTERM / SIGINT stop it after the current step with a
  checkpoint there (see :mod:`migu_jax.cl.faults`).

  Returns:
    The run's result (see :func:`migu_jax.cl.report.run_result`), also written to ``result.json`` in
    ``<output_dir>/<method>/seed_<seed>/``.

  Raises:
    migu_jax.cl.faults.Preempted: a stop signal arrived; the checkpoint at the step reached is saved.
    migu_jax.cl.faults.OutputLocked: another process writes to ``cfg.output_dir``.
  """
  with contextlib.ExitStack() as guards:
    guards.enter_context(faults.output_lock(cfg.output_dir))
    guards.enter_context(faults.stop_signals())
    checkpoints = guards.enter_context(ckpt_lib.RunCheckpoints(
        run_folder(cfg, method_name, seed) / "checkpoints", keep=cfg.keep_checkpoints))
    return _train_sequence(cfg, method_name, seed, checkpoints, callbacks)


@dataclasses.dataclass
class RunState:
  """Where a run stands and what it has measured: the JSON ``meta`` saved with each checkpoint's arrays.

  ``task``/``step`` name the next train step. ``rows[i]``: every task's accuracy (or perplexity) after
  task ``i``; ``initial``: the model's before any; ``also``: the same in other evaluation modes;
  ``general``: the general corpus' perplexity at each stage; ``losses[i]``: task ``i``'s step losses;
  ``speed``: tokens and seconds (see :func:`_count_step`).
  """

  identity: dict
  task: int = 0
  step: int = 0
  metric: str = "accuracy"
  initial: list | None = None
  rows: list = dataclasses.field(default_factory=list)
  also: dict = dataclasses.field(default_factory=dict)
  general: list = dataclasses.field(default_factory=list)
  losses: list = dataclasses.field(default_factory=list)
  steps: list = dataclasses.field(default_factory=list)
  train_s: list = dataclasses.field(default_factory=list)
  eval_s: list = dataclasses.field(default_factory=list)
  initial_eval_s: float = 0.0
  speed: dict = dataclasses.field(default_factory=lambda: {"train_tokens": 0, "train_step_s": 0.0, "compile_s": 0.0})
  end_tasks: dict | None = None
  params_sha256: str | None = None

  @classmethod
  def from_meta(cls, meta: dict) -> "RunState":
    """A checkpoint's meta; keys an older version did not write take their defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in meta.items() if k in names})

  def to_meta(self) -> dict:
    return dataclasses.asdict(self)


def _check_positions(cfg: Config, model_cfg) -> None:
  """BERT/RoBERTa learn one embedding per position: a longer ``max_length`` would read past the table (NaN)."""
  if getattr(model_cfg, "model_type", None) not in ("bert", "roberta"):
    return
  limit = model_cfg.max_position_embeddings - (model_cfg.pad_token_id + 1 if model_cfg.model_type == "roberta" else 0)
  if cfg.max_length > limit:
    raise ValueError(f"Config.max_length={cfg.max_length} is longer than the {limit} positions {cfg.model!r} has "
                     f"(max_position_embeddings={model_cfg.max_position_embeddings}); use --max-length {limit} or less.")


def magnitude_capture(cfg: Config, head: heads_lib.Head, tasks: Sequence[Task], seed: int,
                      folder: epath.Path) -> Callback:
  """The callback that writes the statistics behind the paper's Figure 1: on ``"initial"``, every task's
  (``<output>/magnitudes_initial.npz``, the same for every method, written once); on ``"trained"``, the task
  just trained (``<run>/magnitudes_task_<t>.npz``). Every process computes them (on a mesh the parameters are
  sharded over all of them); process 0 writes."""

  def save(path, arrays):
    if is_writer():
      _save_npz(path, arrays)

  def capture(event: str, info: dict) -> None:
    if event == "initial":
      path = storage.output_path(cfg.output_dir) / "magnitudes_initial.npz"
      if not _exists_everywhere(path):
        save(path, {f"{j}:{name}": v for j, t in enumerate(tasks) for name, v in capture_magnitudes(
            head, info["params"], [(j, r) for r in t.train], cfg, seed, cfg.magnitude_batches).items()})
    elif event == "trained":
      t = info["task"]
      save(folder / f"magnitudes_task_{t}.npz", capture_magnitudes(
          head, info["params"], [(t, r) for r in tasks[t].train], cfg, seed, cfg.magnitude_batches))

  return capture


@dataclasses.dataclass
class _Run:
  """One run of a method and seed: its fixed parts, its arrays (``params``, ``opt_state``) and its
  :class:`RunState`, with the stages :func:`_train_sequence` runs in order."""

  cfg: Config
  name: str
  seed: int
  method: methods_lib.Method
  tasks: list
  general: Any
  head: heads_lib.Head
  tx: Any
  step_fn: Any
  placed: Placement
  checkpoints: ckpt_lib.RunCheckpoints
  callbacks: tuple
  key: jax.Array
  params: Any
  opt_state: Any
  state: RunState

  @classmethod
  def start(cls, cfg: Config, name: str, seed: int, checkpoints, callbacks) -> "_Run":
    """Loads data, model and head, builds the step, and restores the newest readable checkpoint."""
    method = methods_lib.get_method(name)
    cfg = methods_lib.method_config(cfg, name)
    folder = run_folder(cfg, name, seed)
    folder.mkdir(parents=True, exist_ok=True)
    identity = _identity(cfg, name, seed)
    tasks, general = load_tasks(cfg, seed), load_general(cfg, seed)
    _, model_params, _ = run_model(cfg)
    head = _head(cfg, tasks)
    _check_positions(cfg, head.model.config)
    warning = heads_lib.rate_warning(head, cfg.schedule, cfg.learning_rate)
    if warning and is_writer():
      warnings.warn(f"{name} seed {seed}: {warning}", stacklevel=4)
    key = jax.random.key(seed)
    head_key, lora_key = jax.random.split(jax.random.fold_in(key, 1))
    params = cast_floats(methods_lib.init_params(method, cfg, model_params, head.init(head_key), lora_key),
                         cfg.param_dtype)
    tx, step_fn, placed = _step_and_placement(cfg, method, seed, head)
    params = placed.place(params)
    opt_state = placed.place(optimizers_lib.start_task(method, cfg, tx, params, 0))
    state = RunState(identity, metric=getattr(head, "metric", "accuracy"))
    restored = checkpoints.restore({"params": params, "opt_state": opt_state, "key": key},
                                   check_meta=lambda saved: _check_identity(saved["identity"], identity,
                                                                            checkpoints.folder))
    if restored is not None:
      arrays, meta = restored
      params, opt_state, state = placed.place(arrays["params"]), placed.place(arrays["opt_state"]), \
          RunState.from_meta(meta)
    if is_writer():
      atomic.write_json(folder / "config.json", identity)
    if cfg.magnitude_batches:
      callbacks = (magnitude_capture(cfg, head, tasks, seed, folder), *callbacks)
    return cls(cfg, name, seed, method, tasks, general, head, tx, step_fn, placed, checkpoints, tuple(callbacks),
               key, params, opt_state, state)

  def notify(self, event: str, info: dict) -> None:
    for cb in self.callbacks:
      cb(event, info)

  def eval_params(self):
    """Plain ``{"model", "head"}`` parameters (LoRA merged), where training placed them: on a mesh sharded
    as in the train step, never gathered to one device (see :func:`eval_placement`)."""
    return methods_lib.eval_params(self.method, self.cfg, self.params)

  def where(self) -> str:
    s = self.state
    return (f"{self.name} seed {self.seed}, task {s.task + 1} of {len(self.tasks)} ({self.tasks[s.task].name}), "
            f"step {s.step}")

  def save(self) -> None:
    """A checkpoint at the current position (every process calls it: orbax coordinates a multi-process
    save); a pending stop request ends the run here, unless it is complete."""
    number = self.checkpoints.save({"params": self.placed.fetch(self.params),
                                    "opt_state": self.placed.fetch(self.opt_state), "key": self.key},
                                   self.state.to_meta())
    self.notify("saved", {"checkpoint": number, "task": self.state.task, "step": self.state.step})
    signum = faults.stop_requested()
    if signum and self.state.task < len(self.tasks):
      raise faults.preempted(signum, self.where(), number, self.checkpoints.folder)

  def evaluate_initial(self) -> None:
    """The initial model's row (the reference point of FWT), in every evaluation mode, and the general
    corpus' perplexity; then a checkpoint."""
    cfg, s, plain = self.cfg, self.state, self.eval_params()
    self.notify("initial", {"params": plain})
    start = time.perf_counter()
    s.initial = _initial_accuracies(cfg, self.seed, self.head, plain, self.tasks)
    s.also = {m: {"initial": _initial_accuracies(cfg, self.seed, self.head, plain, self.tasks, mode=m), "rows": []}
              for m in cfg.also_eval}
    s.general = _general_row(cfg, self.head, plain, self.general, "initial model")
    s.initial_eval_s = time.perf_counter() - start
    self.save()

  def train_task(self, t: int) -> None:
    """Task ``t``'s steps from ``state.step`` on (the optimizer reset at its start), checkpoints every
    ``checkpoint_every`` steps and where a stop was requested."""
    cfg, s = self.cfg, self.state
    examples = batching_lib.training_examples(self.method, cfg, self.tasks, t, self.seed)
    total = batching_lib.steps_per_epoch(len(examples), cfg.batch_size) * methods_lib.task_epochs(
        cfg, self.tasks[t].name)
    if s.step == 0:
      self.opt_state = self.placed.place(optimizers_lib.start_task(self.method, cfg, self.tx, self.params, t,
                                                                self.opt_state))
      s.losses.append([])
    start = time.perf_counter()
    desc = f"{self.name} seed {self.seed} task {t + 1}/{len(self.tasks)} {self.tasks[t].name}"
    with _bar(cfg, total=total, initial=s.step, desc=desc, unit="step") as bar:
      for k in range(s.step, total):
        loss = self.train_step(t, k, [examples[i] for i in batching_lib.batch_indices(
            len(examples), cfg.batch_size, self.seed, t, k)])
        if not np.isfinite(loss):
          raise FloatingPointError(f"{desc}, step {k}: the loss is {loss}. Lower learning_rate or check the data.")
        s.losses[t].append(loss)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{s.speed['train_tokens'] / max(s.speed['train_step_s'], 1e-9):.0f}")
        bar.update(1)
        self.notify("step", {"task": t, "step": k, "loss": loss})
        s.step = k + 1
        if (s.step % cfg.checkpoint_every == 0 and s.step < total) or faults.stop_requested():
          s.train_s = _add_time(s.train_s, t, time.perf_counter() - start)
          start = time.perf_counter()
          self.save()
    s.train_s = _add_time(s.train_s, t, time.perf_counter() - start)
    s.steps.append(total)

  def train_step(self, t: int, k: int, examples: list) -> float:
    """Step ``k`` of task ``t`` on ``examples``; returns its loss (timed into ``state.speed``)."""
    batch = self.head.train_batch(examples)
    step_key = jax.random.key_data(jax.random.fold_in(jax.random.fold_in(self.key, t + 2), k))
    batch["rng"] = np.broadcast_to(np.asarray(step_key), (self.cfg.batch_size, *step_key.shape))
    # Every process pads the whole batch (one padded length everywhere) and feeds its own rows.
    compiles, start = _compiles(self.step_fn, batch), time.perf_counter()
    self.params, self.opt_state, loss = self.step_fn(self.params, self.opt_state, self.placed.local_rows(batch))
    loss = float(loss)
    _count_step(self.state.speed, batch, time.perf_counter() - start, compiles)
    return loss

  def evaluate_after(self, t: int) -> None:
    """Every task's row after task ``t`` (and the other modes', the general corpus'); then a checkpoint at
    the next task's start."""
    cfg, s, plain = self.cfg, self.state, self.eval_params()
    self.notify("trained", {"task": t, "params": plain})
    start = time.perf_counter()
    after = self.tasks[t].name
    s.rows.append(evaluate(self.head, plain, self.tasks, cfg=cfg, desc=f"eval after {after}", speed=s.speed))
    s.general = s.general + _general_row(cfg, self.head, plain, self.general, after)
    for m in cfg.also_eval:
      s.also[m]["rows"].append(evaluate(self.head, plain, self.tasks, cfg=cfg, mode=m, desc=f"eval ({m}) after {after}"))
    s.eval_s.append(time.perf_counter() - start)
    s.task, s.step = t + 1, 0
    self.save()
    if cfg.progress and is_writer():
      from tqdm.auto import tqdm
      value = (lambda a: f"{a:.2f}") if s.metric == "perplexity" else (lambda a: f"{100 * a:.1f}")
      tqdm.write(f"{self.name} seed {self.seed} after {after}: " + ", ".join(
          f"{task.name} {value(a)}" for task, a in zip(self.tasks, s.rows[-1])))
    self.notify("task_done", {"task": t, "row": s.rows[-1]})

  def finish(self) -> dict:
    """The DAS end tasks of a text-domain run (then a checkpoint holding them, so that running the command
    again does not repeat them), the parameters' digest, and ``result.json``."""
    cfg, s = self.cfg, self.state
    params = self.placed.fetch(self.params)  # gathered once (on a mesh, the whole model comes to the host)
    if cfg.objective == "lm" and cfg.end_tasks and s.end_tasks is None:
      final = methods_lib.eval_params(self.method, cfg, params)["model"]  # LoRA merged
      s.end_tasks = run_end_tasks(cfg, final, self.seed, [t.name for t in self.tasks])
      self.save()
    s.params_sha256 = params_digest(params)
    result = report_lib.run_result(self.name, self.seed, self.tasks, s.to_meta(), self.head.eval_mode)
    if is_writer():
      atomic.write_json(run_folder(cfg, self.name, self.seed) / "result.json", result)
    return result


def _train_sequence(cfg: Config, method_name: str, seed: int, checkpoints: ckpt_lib.RunCheckpoints,
                    callbacks: Sequence[Callback]) -> dict:
  """The body of :func:`run_sequence`, inside its guards (lock, stop signals, open checkpoints): the
  stages of :class:`_Run` in order, each resumable."""
  run = _Run.start(cfg, method_name, seed, checkpoints, callbacks)
  if run.state.initial is None:
    run.evaluate_initial()
  for t in range(run.state.task, len(run.tasks)):
    run.train_task(t)
    run.evaluate_after(t)
  return run.finish()


def run_end_tasks(cfg: Config, model_params: dict, seed: int, domains: Sequence[str]) -> dict[str, dict]:
  """The DAS protocol (:mod:`migu_jax.cl.end_tasks`): ``{domain: {"task", "accuracy", "macro_f1", ...}}``."""
  names = [d for d in domains if d in cfg.end_tasks]
  task_cfg = cfg.replace(objective="task", order=tuple(cfg.end_tasks[d] for d in names), general=None, end_tasks=None,
                         learning_rate=cfg.end_task_lr or cfg.learning_rate, epochs=cfg.end_task_epochs,
                         train_per_class=cfg.end_task_train_per_class, max_test=cfg.end_task_max_test,
                         methods=("seqft",))
  tasks = load_tasks(task_cfg, seed)
  head = _head(task_cfg, tasks)
  method = methods_lib.get_method("seqft")
  tx, step_fn, placed = _step_and_placement(task_cfg, method, seed, head)

  def start_state(params):
    params = placed.place(params)
    return params, placed.place(optimizers_lib.start_task(method, task_cfg, tx, params, 0))

  def local_step(params, opt_state, batch):  # each process feeds its own rows of the global batch
    return step_fn(params, opt_state, placed.local_rows(batch))

  start = end_tasks_lib.encoder_params(model_params)
  out = {}
  for j, (domain, task) in enumerate(zip(names, tasks)):
    out[domain] = end_tasks_lib.fine_tune_and_score(
        head, local_step, start_state, start, j, task, batch_size=task_cfg.batch_size, epochs=task_cfg.epochs,
        seed=seed, key=jax.random.fold_in(jax.random.key(seed), 10_000 + j))
    if cfg.progress and is_writer():
      from tqdm.auto import tqdm
      r = out[domain]
      tqdm.write(f"end task {task.name} ({domain}): accuracy {100 * r['accuracy']:.1f}, macro-F1 "
                 f"{100 * r['macro_f1']:.1f}")
  return out


def _general_row(cfg: Config, head, params, general, stage: str) -> list[float]:
  """``[perplexity on the general corpus]`` at a stage of the run, or ``[]`` without one."""
  if general is None:
    return []
  with _bar(cfg, total=len(general.test), desc=f"general corpus, {stage}", unit="block") as bar:
    return [head.perplexity(params, None, general.test, progress=bar.update)]


def _count_step(speed: dict, batch: dict, seconds: float, compiles: bool) -> None:
  """Adds a train step to ``speed``: a compiling step's time is compile time, not step time."""
  if compiles:
    speed["compile_s"] += seconds
  else:
    speed["train_tokens"] += batch_tokens(batch)
    speed["train_step_s"] += seconds


def _add_time(times: list, task: int, seconds: float) -> list:
  times = list(times) + [0.0] * (task + 1 - len(times))
  times[task] += seconds
  return times


def _check_identity(saved: dict, current: dict, where: Path) -> None:
  # A setting added to Config after the checkpoint was written counts as its default there.
  defaults = {f.name: _json_ready(f.default) for f in dataclasses.fields(Config)
              if f.default is not dataclasses.MISSING}
  defaults["threshold"] = "quantile"  # as _identity writes the default None
  saved = {**{k: defaults[k] for k in current if k not in saved and k in defaults}, **saved}
  changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  if changed:
    details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:6])
    raise ValueError(f"{where} holds checkpoints of a run with other settings ({details}). Resume with the "
                     "same settings, or choose another output_dir (--output).")


def _initial_accuracies(cfg: Config, seed: int, head, params, tasks, mode: str | None = None) -> list[float]:
  """The initial model's accuracies, shared by the runs of one output folder that start from the same model
  and test sets (every method: LoRA starts with B = 0, and the head's temperature does not change argmax)."""
  values = {k: v for k, v in _identity(cfg, "", seed).items()
            if k in ("model", "objective", "mlm_probability", "head", "eval_mode", "data_dir", "order", "max_test",
                     "max_length", "length_buckets", "eval_batch_size", "max_new_tokens", "seed", "train_per_class",
                     "eval_split", "dev_per_class", "copa_prompt")}
  if mode is not None and mode != cfg.eval_mode:
    values["eval_mode"] = mode
  path = storage.output_path(cfg.output_dir) / "initial" / f"{_fingerprint(values)}.json"
  if _exists_everywhere(path):
    return json.loads(path.read_text())["accuracies"]
  row = evaluate(head, params, tasks, cfg=cfg, desc="eval initial model", mode=mode)
  if is_writer():
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, {"settings": values, "accuracies": row})
  return row


def _restore_newest(run_dir, progress: bool):
  """``(cfg, method name, method, seed, state, meta)`` of a run folder's newest complete checkpoint (with the
  run's own settings)."""
  run_dir = storage.output_path(run_dir)
  if not (run_dir / "config.json").is_file():
    raise FileNotFoundError(f"{run_dir} has no config.json: pass a run folder such as <output>/migu/seed_0.")
  identity = json.loads((run_dir / "config.json").read_text())
  method_name, seed = identity.pop("method"), identity.pop("seed")
  cfg = Config.from_dict({**identity, "methods": (method_name,), "seeds": (seed,), "progress": progress,
                          "output_dir": str(run_dir.parent.parent)})
  method = methods_lib.get_method(method_name)
  _, model_params, _ = run_model(cfg)
  train_head = _head(cfg, load_tasks(cfg, seed))
  key = jax.random.key(seed)
  head_key, lora_key = jax.random.split(jax.random.fold_in(key, 1))
  like = cast_floats(methods_lib.init_params(method, cfg, model_params, train_head.init(head_key), lora_key),
                     cfg.param_dtype)
  tx = optimizers_lib.make_optimizer(method, cfg, seed)
  with ckpt_lib.RunCheckpoints(run_dir / "checkpoints") as checkpoints:
    restored = checkpoints.restore({"params": like, "opt_state": tx.init(like), "key": key})
  if restored is None:
    raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no complete checkpoint yet.")
  return (cfg, method_name, method, seed, *restored)


def end_tasks_checkpoint(run_dir: str | os.PathLike, *, progress: bool = True, **settings) -> dict:
  """The DAS end-task protocol again on a text-domain run's newest checkpoint, with other end-task settings.

  ``settings`` override the run's ``end_tasks``, ``end_task_train_per_class``, ``end_task_epochs``,
  ``end_task_lr`` and ``end_task_max_test`` (e.g. more records for an end task that stayed at chance);
  the continual pre-training is not repeated. Returns ``{"run_dir", "method", "seed", "checkpoint",
  "settings", "end_tasks"}`` (``end_tasks`` as in ``result.json``).
  """
  unknown = sorted(set(settings) - {"end_tasks", "end_task_train_per_class", "end_task_epochs", "end_task_lr",
                                    "end_task_max_test"})
  if unknown:
    raise ValueError(f"end_tasks_checkpoint: {unknown} are not end-task settings.")
  cfg, method_name, method, seed, state, meta = _restore_newest(run_dir, progress)
  if cfg.objective != "lm":
    raise ValueError(f"{run_dir}: end tasks follow continual pre-training (objective='lm'); this run has "
                     f"objective={cfg.objective!r}.")
  cfg = cfg.replace(**settings)
  if not cfg.end_tasks:
    raise ValueError(f"{run_dir}: the run names no end tasks; pass end_tasks={{'group/domain': 'Category/task'}}.")
  final = methods_lib.eval_params(method, cfg, state["params"])["model"]
  out = run_end_tasks(cfg, final, seed, list(resolve_order(cfg.order)))
  return {"run_dir": str(run_dir), "method": method_name, "seed": seed,
          "checkpoint": {"task": meta["task"], "step": meta["step"]},
          "settings": {k: getattr(cfg, k) for k in ("end_tasks", "end_task_train_per_class", "end_task_epochs",
                                                     "end_task_lr", "end_task_max_test")},
          "end_tasks": out}


def evaluate_checkpoint(run_dir: str | os.PathLike, *, order=None, max_test: int | None = None,
                        data_dir: str | None = None, eval_mode: str | None = None, progress: bool = True) -> dict:
  """Evaluates the newest checkpoint of a run folder (``<output>/<method>/seed_<s>``) on tasks.

  Args:
    run_dir: the run folder (with ``config.json`` and ``checkpoints/``).
    order: tasks to evaluate on (default: the run's own order).
    max_test, data_dir, eval_mode: override the run's settings.

  Returns:
    ``{"run_dir", "method", "seed", "checkpoint": {"task", "step"}, "tasks", "accuracies", "eval_mode"}``.
  """
  cfg, method_name, method, seed, state, meta = _restore_newest(run_dir, progress)
  changes = {k: v for k, v in (("order", order), ("max_test", max_test), ("data_dir", data_dir),
                               ("eval_mode", eval_mode)) if v is not None}
  eval_cfg = cfg.replace(**changes)
  tasks = load_tasks(eval_cfg, seed)
  head = _head(eval_cfg, tasks)
  params = methods_lib.eval_params(method, cfg, state["params"])
  row = evaluate(head, params, tasks, cfg=eval_cfg, desc=f"eval {method_name} seed {seed}")
  return {"run_dir": str(run_dir), "method": method_name, "seed": seed,
          "checkpoint": {"task": meta["task"], "step": meta["step"]}, "tasks": [t.name for t in tasks],
          "accuracies": row, "eval_mode": head.eval_mode, "metric": getattr(head, "metric", "accuracy"),
          "heldout_tasks": [t.name for t in tasks if t.test_is_heldout]}


def run_experiment(cfg: Config, *, callbacks: Sequence[Callback] = (), plots: bool = True) -> dict:
  """Runs every method and seed of ``cfg`` (resuming each), then writes ``results.json``, ``results.md``
  and the plots to ``cfg.output_dir``. Returns the combined results."""
  out = storage.output_path(cfg.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  with faults.output_lock(out), faults.stop_signals():  # held across every run, results and plots
    return _run_all(cfg, callbacks, plots, start)


def _run_all(cfg: Config, callbacks: Sequence[Callback], plots: bool, start: float) -> dict:
  """The body of :func:`run_experiment`, holding the output folder."""
  out = storage.output_path(cfg.output_dir)
  tuning = None
  if cfg.tune_rates:  # each method's learning rate chosen on dev first, then the real runs
    tuning = tune_lib.choose_rates(cfg, functools.partial(run_experiment, callbacks=callbacks, plots=False))
    fixed = cfg.learning_rate if cfg.tune_keep_fixed else None
    cfg = cfg.replace(methods=tune_lib.tuned_methods(cfg.methods, tuning["chosen"], fixed), tune_rates=())
  runs = [run_sequence(cfg, m, s, callbacks=callbacks) for m in cfg.methods for s in cfg.seeds]
  results = report_lib.experiment_results(cfg.to_dict(), runs, wall_s=time.perf_counter() - start,
                                          data_dir=str(data_dir(cfg)))
  if tuning is not None:
    results["tuning"] = tuning
  if not is_writer():  # results, plots and logs come from process 0 only
    return results
  report_lib.write_results(out, results)
  if plots:
    from migu_jax.cl import plots as plots_lib
    plots_lib.plot_experiment(out, results)
  return results


__all__ = ["Config", "DTYPES", "DataError", "Placement", "capture_magnitudes", "cast_floats", "data_dir",
           "eval_placement", "evaluate", "evaluate_checkpoint", "is_writer", "load_general", "load_model",
           "end_tasks_checkpoint", "load_tasks", "make_mesh", "params_digest", "run_end_tasks", "run_experiment", "run_folder", "run_model",
           "run_sequence", "scan_model", "shard_spec", "state_specs"]
