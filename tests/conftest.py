"""Test set-up: 8 virtual CPU devices, so pmap and mesh steps run on one CPU; one XLA compilation cache for
the whole run; the shared fixtures."""
import atexit
import os
import shutil
import tempfile


def _with_flags(flags: str, *extra: str) -> str:
  """``flags`` (XLA_FLAGS) with each of ``extra`` added unless that flag is already set."""
  have = {f.split("=")[0] for f in flags.split()}
  return " ".join([*flags.split(), *(f for f in extra if f.split("=")[0] not in have)])


# LLVM without optimization passes: the tiny programs of the tests compile about twice as fast and run a
# little slower (the same computation, so the same results). XLA's older CPU emitters instead of its fusion
# emitters: a program of a few operations (most of the tests' eager calls) compiles in 2/3 of the time.
os.environ["XLA_FLAGS"] = _with_flags(os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
                                      "--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")

# Many tests compile the same programs (the tiny models' steps and evaluations, in each test process and in
# the scripts they start): a compilation cache shared by the run's processes compiles each once. It is set
# before jax is imported, in the environment, so the pytest-xdist workers and the subprocesses inherit it;
# the first process (the one that made it) removes it when it exits. Every program is cached, down to one
# eager operation (read back in half the time it takes to compile); the cache is unbounded, because a bounded
# one takes a lock and writes an access time for every entry, which made the run slower. (Two processes
# writing one entry at once can leave it unreadable: JAX then warns and compiles.)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="migu-jax-tests-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

from tiny_cl import DATA, NO_DATA, build_tiny_models, once_per_run, resumable_config  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_collection_modifyitems(items):
  """The tests marked ``heavy`` (a process or two of their own, or whole experiments: 15 s or more each) run
  first, so that with ``-n 2 --dist worksteal`` none of them starts near the end while the other worker idles."""
  items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # stable: the rest keep their order


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
