"""Output folders through etils.epath (migu_jax/cl/storage.py): local folders and remote URLs take the same
calls; a URL keeps its scheme (pathlib would make ``gs://b`` the local folder ``gs:/b``). The runs of
test_cl_runner.py and test_cl_resume.py write and resume through this code with local paths."""

import json
import warnings

import pytest
from etils import epath

from migu_jax.cl import atomic, faults, storage


def test_local_writes_are_atomic_through_epath(tmp_path):
  path = storage.output_path(tmp_path) / "sub" / "result.json"
  assert isinstance(path, epath.Path) and storage.is_local(path)
  path.parent.mkdir(parents=True)
  atomic.write_json(path, {"a": 1})
  atomic.write_bytes(path.with_name("x.bin"), b"\x00\x01")
  assert json.loads(path.read_text()) == {"a": 1} and path.with_name("x.bin").read_bytes() == b"\x00\x01"
  assert sorted(p.name for p in path.parent.iterdir()) == ["result.json", "x.bin"]  # no .tmp left


def test_remote_folders_keep_their_url_and_are_not_locked(tmp_path):
  from migu_jax.cl import runner

  cfg = runner.Config(output_dir="gs://bucket/runs/7b", progress=False)
  assert str(runner.run_folder(cfg, "migu", 0)) == "gs://bucket/runs/7b/migu/seed_0"
  with pytest.warns(faults.FaultWarning, match="not locked"):
    with faults.output_lock("gs://bucket/runs/7b"):
      pass
  with warnings.catch_warnings():  # warned once per folder
    warnings.simplefilter("error")
    with faults.output_lock("gs://bucket/runs/7b"):
      pass
