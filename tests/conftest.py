"""Test set-up: 8 virtual CPU devices, so pmap and mesh steps run on one CPU; the shared fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

from tiny_cl import DATA, NO_DATA, build_tiny_models, once_per_run, resumable_config  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
  """Folders of tiny random models with tokenizers trained on the benchmark's sentences (needs the benchmark
  copy): ``{"bert": ..., "llama": ..., "t5": ...}``."""
  if not DATA.is_dir():
    pytest.skip(NO_DATA)
  return once_per_run(tmp_path_factory, "tiny_models", build_tiny_models)


@pytest.fixture(scope="session")
def uninterrupted_run(tiny_models, tmp_path_factory):
  """MIGU's run of :func:`tiny_cl.resumable_config`, never stopped: the result resumed runs must equal."""
  def run(folder):
    from migu_jax.cl import runner
    return runner.run_sequence(resumable_config(tiny_models, folder), "migu", 0)

  return once_per_run(tmp_path_factory, "uninterrupted_run", run)
