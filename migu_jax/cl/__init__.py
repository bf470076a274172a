"""The data and metrics layer of the continual-learning runner.

* :mod:`migu_jax.cl.locate`: where the benchmark is (flag, ``$MIGU_DATA_DIR``, the shared copy, the hub).
* :mod:`migu_jax.cl.data`: task names and orders, loading, validating and sampling tasks.
* :mod:`migu_jax.cl.hub`: building the benchmark layout from the Hugging Face hub (network only).
* :mod:`migu_jax.cl.prompts`: the O-LoRA / MIGU instruction prompt.
* :mod:`migu_jax.cl.metrics`: average accuracy, backward / forward transfer and forgetting.
"""

from migu_jax.cl.data import DATA_DIR_ENV as DATA_DIR_ENV
from migu_jax.cl.data import ORDERS as ORDERS
from migu_jax.cl.data import TASKS as TASKS
from migu_jax.cl.data import DataError as DataError
from migu_jax.cl.data import HeldOutSplit as HeldOutSplit
from migu_jax.cl.data import Record as Record
from migu_jax.cl.data import Task as Task
from migu_jax.cl.data import TaskRef as TaskRef
from migu_jax.cl.data import load_task as load_task
from migu_jax.cl.data import read_labels as read_labels
from migu_jax.cl.data import read_records as read_records
from migu_jax.cl.data import resolve_order as resolve_order
from migu_jax.cl.data import resolve_task as resolve_task
from migu_jax.cl.data import sample_per_class as sample_per_class
from migu_jax.cl.data import sample_stratified as sample_stratified
from migu_jax.cl.data import split_heldout as split_heldout
from migu_jax.cl.hub import build_from_hub as build_from_hub
from migu_jax.cl.locate import resolve_data_dir as resolve_data_dir
from migu_jax.cl.metrics import average_accuracy as average_accuracy
from migu_jax.cl.metrics import average_forgetting as average_forgetting
from migu_jax.cl.metrics import backward_transfer as backward_transfer
from migu_jax.cl.metrics import forward_transfer as forward_transfer
from migu_jax.cl.metrics import summarize as summarize
from migu_jax.cl.prompts import build_prompt as build_prompt
from migu_jax.cl.prompts import instruction_for as instruction_for
from migu_jax.cl.heads import HEADS as HEADS
from migu_jax.cl.methods import METHODS as METHODS
from migu_jax.cl.runner import Config as Config
from migu_jax.cl.runner import evaluate_checkpoint as evaluate_checkpoint
from migu_jax.cl.runner import run_experiment as run_experiment
from migu_jax.cl.runner import run_sequence as run_sequence
