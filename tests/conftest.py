import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Numerics must not depend on the machine's core count: in-process tests run with a fixed thread count, ranks
# spawned by tests (harness.py, or `trellis train` subprocesses, whose spawner keeps an OMP_NUM_THREADS it is
# given) with one thread each, whatever the CPU.
TEST_THREADS = 2
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Prepared corpora (engine/data/corpus.py) of this session go to a temporary cache, never the user's ~/.cache.
os.environ.setdefault("TRELLIS_CACHE", tempfile.mkdtemp(prefix="trellis-test-data-"))


def pytest_configure(config):
    import torch

    torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def trellis_cmd() -> list[str]:
    return [sys.executable, "-m", "trellis"]
