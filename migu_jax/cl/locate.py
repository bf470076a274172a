"""Where the benchmark is: a flag, ``$MIGU_DATA_DIR``, the copy next to the repository, or the hub.

:func:`resolve_data_dir` is the one place that decides; :mod:`migu_jax.cl.data` reads a folder once it
is known, and :mod:`migu_jax.cl.hub` builds one from the Hugging Face hub when nothing local exists.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from migu_jax.cl import hub
from migu_jax.cl.data import DATA_DIR_ENV, TASKS, DataError, resolve_task

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "CL_Benchmark"
"""The benchmark copy next to the repository (``../shared/data/CL_Benchmark``)."""


def default_cache_dir() -> Path:
  """Where :func:`resolve_data_dir` builds the benchmark from the hub: ``$XDG_CACHE_HOME/migu_jax/CL_Benchmark``."""
  base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
  return Path(base) / "migu_jax" / "CL_Benchmark"


def resolve_data_dir(flag: str | os.PathLike | None = None, *, tasks: Iterable[str] | None = None,
                     cache_dir: str | os.PathLike | None = None, use_shared: bool = False) -> Path:
  """The benchmark folder: ``flag``, else ``$MIGU_DATA_DIR``, else (with ``use_shared``) the copy next to
  the repository, :data:`SHARED_DATA`, when it exists, else one built from the Hugging Face hub.

  The hub is tried only when it is reachable (see :func:`~migu_jax.cl.hub.hub_reachable`); the tasks are then
  converted with :func:`migu_jax.cl.hub.build_from_hub` into ``cache_dir`` (default
  :func:`default_cache_dir`), once: a folder that already holds every requested task is reused.

  Args:
    flag: the ``--data-dir`` command-line value, or None.
    tasks: task names to build from the hub when it comes to that (default: all of :data:`TASKS`).
    cache_dir: where to build them.
    use_shared: try :data:`SHARED_DATA` before the hub (the runner and the demo do; a library caller
      that wants only what it was told leaves it off).

  Returns:
    An existing folder with the ``<category>/<task>/{train,test,labels}.json`` layout.

  Raises:
    DataError: the given folder does not exist, or there is no folder and the hub cannot be reached.

  Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> resolve_data_dir(d) == Path(d)
    True
  """
  for value, source in ((flag, "--data-dir"), (os.environ.get(DATA_DIR_ENV) or None, f"${DATA_DIR_ENV}")):
    if not value:
      continue
    path = Path(value).expanduser()
    if not path.is_dir():
      raise DataError(f"{source} points at {str(path)!r}, which is not a folder. Point it at a folder laid out "
                      "as <category>/<task>/{train,test,labels}.json, e.g. ../shared/data/CL_Benchmark.")
    return path
  if use_shared and SHARED_DATA.is_dir():
    return SHARED_DATA

  names = tuple(tasks) if tasks is not None else tuple(TASKS)
  out = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
  refs = [resolve_task(n) for n in names]
  if all((out / r.category / r.folder / "labels.json").is_file() for r in refs):
    return out
  if not hub.hub_reachable():
    raise DataError(
        "No benchmark data folder given and the Hugging Face hub is not reachable. Pass --data-dir PATH or set "
        f"{DATA_DIR_ENV}=PATH, where PATH is laid out like ../shared/data/CL_Benchmark: "
        "<category>/<task>/{train,test,labels}.json (e.g. TC/agnews/train.json).")
  hub.build_from_hub(out, names)
  return out
