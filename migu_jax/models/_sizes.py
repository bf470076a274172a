"""Named sizes of a model family's ``Config`` (``Config.of_size``), shared by BERT, Llama and T5.

A size gives random weights' shapes (tests, demos, planning); a pretrained checkpoint is a
``migu_jax.models.PRESETS`` name instead.

Example:
  >>> from migu_jax.models import llama
  >>> llama.Config.of_size("tiny", num_hidden_layers=1).num_hidden_layers
  1
"""

from __future__ import annotations

import warnings


def of_size(cls, family: str, sizes: dict[str, dict], name: str, overrides: dict):
  """``cls(**sizes[name], **overrides)``; an unknown ``name`` is an error listing the sizes there are."""
  if name not in sizes:
    raise ValueError(f"unknown {family} size {name!r}; choose from {sorted(sizes)}.")
  return cls(**{**sizes[name], **overrides})


class DeprecatedPreset:
  """Mixin for the configs: ``Config.preset``, the deprecated alias of ``Config.of_size`` (a "preset" is
  a pretrained checkpoint, ``models.PRESETS``)."""

  @classmethod
  def preset(cls, name: str, **overrides):
    """Deprecated alias of ``of_size``."""
    warnings.warn(f"{cls.__module__}.Config.preset is deprecated; use Config.of_size({name!r}).",
                  DeprecationWarning, stacklevel=2)
    return cls.of_size(name, **overrides)
