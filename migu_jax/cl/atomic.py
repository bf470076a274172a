"""Files replaced atomically: a reader (or a run killed mid-write) sees the old file or the new one, never half.

Example:
  >>> import json, tempfile
  >>> from pathlib import Path
  >>> path = Path(tempfile.mkdtemp()) / "result.json"
  >>> write_json(path, {"accuracy": 0.5})
  >>> json.loads(path.read_text())
  {'accuracy': 0.5}
"""

from __future__ import annotations

import json
import os

from migu_jax.cl import storage


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path``: locally through ``<path>.tmp`` and an atomic rename; on an object store
  (``gs://``) directly, as the store replaces the object whole when the write closes."""
  path = storage.output_path(path)
  if not storage.is_local(path):
    path.write_bytes(data)
    return
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` with :func:`write_bytes`."""
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value, **dumps_kwargs) -> None:
  """Writes ``value`` as indented JSON (``default=str`` unless given) with :func:`write_text`."""
  write_text(path, json.dumps(value, **{"indent": 2, "default": str, **dumps_kwargs}))
