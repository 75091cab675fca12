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
