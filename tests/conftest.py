import atexit
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share one GPU: each takes memory as it needs it, not 75% of it at its start.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


_CACHE_VARIABLE = "FUSION_JAX_TESTS_XLA_CACHE"
_JAX_CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")


def _session_compilation_cache() -> None:
    """One persistent XLA compilation cache for the test session, in a temporary folder: tests build the
    same programs many times over (each build_program makes new closures, which jax's in-memory cache
    does not match). The session's first process (pytest, or its xdist controller) makes the folder,
    sets it for itself and in the environment (over any JAX cache setting there), and removes it when
    it exits; the xdist workers and the sweeps that tests start as subprocesses take it from the
    environment, so a program compiled once in the session is loaded everywhere else (the kill tests'
    victims excepted: `without_compilation_cache`). JAX writes an entry in place: a process that reads
    one half-written (or left half-written by a killed process) warns and compiles the program itself.
    A killed session leaves the folder in the system's temporary directory."""
    import jax

    folder = os.environ.get(_CACHE_VARIABLE) if os.environ.get("PYTEST_XDIST_WORKER") else None
    if folder is None:
        folder = tempfile.mkdtemp(prefix="fusion_jax_tests_xla_cache_")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ[_CACHE_VARIABLE] = folder
        os.environ.update(zip(_JAX_CACHE_VARIABLES, (folder, "0")))  # the cache's folder, kept however short a compile
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def without_compilation_cache(env: dict) -> dict:
    """env without the session's compilation cache: a sweep that a test kills at its first checkpoint
    compiles its programs, as a real one would, so that its checkpoints last long enough to be caught."""
    return {k: v for k, v in env.items() if k not in _JAX_CACHE_VARIABLES}


_session_compilation_cache()


def load_config(name: str, arg: str = ""):
    """A config file from configs/, as `--config=configs/NAME.py:ARG` would load it (unlocked)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def host_devices(n: int) -> dict:
    """The environment of a subprocess that runs on n CPU devices, also on a machine with an accelerator."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


@pytest.fixture
def smoke_config():
    """configs/synthetic.py:smoke without the report's t-SNE (about a second of each sweep here; the
    session's `smoke_sweep` and the tests that look at the t-SNE keep it)."""
    config = load_config("synthetic", "smoke")
    config.tsne_pairs = 0
    return config


@pytest.fixture(autouse=True, scope="session")
def full_float32_matmuls_on_gpu():
    """On a GPU, float32 matmuls run at full precision in the tests (XLA's default there is TF32,
    ~1e-3 relative): the tests compare against NumPy and PyTorch references in float32 or float64."""
    import jax

    if jax.devices()[0].platform != "gpu":
        yield
        return
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory):
    """One finished `configs/synthetic.py:smoke` sweep for the session: (config, results, workdir).
    A test that changes the workdir copies it first."""
    from fusion_jax.sweep import train_and_evaluate

    workdir = tmp_path_factory.mktemp("smoke_sweep")
    config = load_config("synthetic", "smoke")
    return config, train_and_evaluate(config, str(workdir)), workdir
