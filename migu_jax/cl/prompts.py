"""The instruction prompt of the O-LoRA / MIGU continual-learning benchmark.

Every example is shown to the model as::

    Task:{category}
    Dataset:{task folder}
    {instruction}Option: {label 1}, {label 2}, ... 
    {sentence}
    Answer:

(note the space after the options, before the newline) and the model is trained to continue with the label
string. The instruction depends only on the category; the texts are those of the reference
``configs/instruction_config.json`` of O-LoRA and MIGU, each ending with a newline.

COPA is the exception, as in the reference code (O-LoRA and MIGU): its sentences already say "Choose one
between A and B", so its prompt has no instruction and no option line (:data:`COPA_TEMPLATE`). With
``copa="instruction"`` it takes the common template with the COPA instruction below instead.

Example:
  >>> from types import SimpleNamespace
  >>> task = SimpleNamespace(category="SC", folder="IMDB", labels=("Good", "Bad"))
  >>> print(build_prompt(task, "Loved it."))
  Task:SC
  Dataset:IMDB
  What is the sentiment of the following paragraph? Choose one from the option.
  Option: Good, Bad 
  Loved it.
  Answer:
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

PROMPT_TEMPLATE = "Task:{category}\nDataset:{task}\n{instruction}Option: {options} \n{sentence}\nAnswer:"

COPA_TEMPLATE = "Task:{category}\nDataset:{task}\n{sentence}\nAnswer:"
"""The reference's COPA prompt: no instruction, no option line."""

COPA_STYLES = ("reference", "instruction")

GENERIC_INSTRUCTION = "Choose one from the option.\n"

# One zero-shot instruction per category folder.
INSTRUCTIONS: dict[str, str] = {
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "NLI": ("What is the logical relationship between the \"sentence 1\" and the \"sentence 2\"? "
            "Choose one from the option.\n"),
    "QQP": ("Whether the \"first sentence\" and the \"second sentence\" have the same meaning? "
            "Choose one from the option.\n"),
    "WiC": ("Given a word and two sentences, whether the word is used with the same sense in both sentence? "
            "Choose one from the option.\n"),
    "MultiRC": ("According to the following passage and question, is the candidate answer true or false? "
                "Choose one from the option.\n"),
    "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.\n",
    "COPA": "Which choice best explains or follows from the premise? Choose one from the option.\n",
}


class PromptTask(Protocol):
  """What a prompt needs from a task (:class:`migu_jax.cl.data.Task` has it)."""

  category: str
  folder: str
  labels: Sequence[str]


def instruction_for(category: str) -> str:
  """The instruction for a category folder name (case-insensitive); a generic one for unknown categories.

  Example:
    >>> instruction_for("tc")
    'What is the topic of the following paragraph? Choose one from the option.\\n'
    >>> instruction_for("MyCategory")
    'Choose one from the option.\\n'
  """
  by_lower = {k.lower(): v for k, v in INSTRUCTIONS.items()}
  return by_lower.get(category.lower(), GENERIC_INSTRUCTION)


def build_prompt(task: PromptTask, sentence: str, *, copa: str = "reference") -> str:
  """The model input for one example of ``task``: everything up to and including ``"Answer:"``.

  The target the model should produce is the label string itself (the runner decides on spacing and
  end-of-sequence tokens). ``copa``: ``"reference"`` (COPA without instruction and options, as the
  reference) or ``"instruction"`` (COPA in the common template).

  Example:
    >>> from types import SimpleNamespace
    >>> copa = SimpleNamespace(category="COPA", folder="COPA", labels=("A", "B"))
    >>> build_prompt(copa, "The man fell. Choose one between A and B.")
    'Task:COPA\\nDataset:COPA\\nThe man fell. Choose one between A and B.\\nAnswer:'
  """
  if copa not in COPA_STYLES:
    raise ValueError(f"build_prompt: copa={copa!r}; choose one of {COPA_STYLES} (config.copa_prompt).")
  if task.category.lower() == "copa" and copa == "reference":
    return COPA_TEMPLATE.format(category=task.category, task=task.folder, sentence=sentence)
  return PROMPT_TEMPLATE.format(category=task.category, task=task.folder, instruction=instruction_for(task.category),
                                options=", ".join(task.labels), sentence=sentence)
