"""Output folders on any file system: local paths and remote URLs (``gs://``, ``s3://``) through etils.epath.

A run's output folder holds its checkpoints (orbax writes remote folders natively), results, magnitudes and
plots. :func:`output_path` turns a setting into an ``epath.Path``: a local folder becomes absolute (a
``pathlib`` path, so ``os`` functions still apply), a URL keeps its scheme (``pathlib.Path("gs://b/x")``
would make the local folder ``gs:/b/x``). The runner, checkpoints and reports go through the same calls for
both; only the atomic rename (:mod:`migu_jax.cl.atomic`) and the output lock (:mod:`migu_jax.cl.faults`)
differ on an object store, which replaces an object whole when its writer closes and has no exclusive create.

Example:
  >>> str(output_path("gs://bucket/runs/7b") / "migu" / "seed_0"), is_local(output_path("gs://bucket/x"))
  ('gs://bucket/runs/7b/migu/seed_0', False)
  >>> is_local(output_path("runs/try")), output_path("runs/try").is_absolute()
  (True, True)
"""

from __future__ import annotations

import os

from etils import epath


def is_local(path: str | os.PathLike) -> bool:
  """Whether ``path`` is on the local file system (no ``scheme://``)."""
  return "://" not in os.fspath(path)


def output_path(folder: str | os.PathLike) -> epath.Path:
  """``folder`` as an ``epath.Path``: absolute when local, its URL kept when remote."""
  path = epath.Path(folder)
  return path.absolute() if is_local(path) else path


__all__ = ["is_local", "output_path"]
