import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_config(name: str, arg: str = ""):
    """A config file from configs/, as `--config=configs/NAME.py:ARG` would load it (unlocked)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture
def smoke_config():
    return load_config("synthetic", "smoke")


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
