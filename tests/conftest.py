"""Test environment: offline, CPU, no stale caches, and launch variables that do not leak from one test to the next."""
import os
import socket
import tempfile

import pytest

_tmp = tempfile.mkdtemp(prefix="llava-tests-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(_tmp, "hf"))
os.environ["TIKTOKEN_CACHE_DIR"] = ""          # tiktoken caches even local files and can return stale content
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # tests only: on a GPU box this would force CPU
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


os.environ.setdefault("MASTER_PORT", str(free_port()))


_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _fresh_launch_variables():
    """A test that runs train.main in this process joins a gloo group of one and sets RANK, MASTER_PORT, ... The
    group stays (DeepSpeed keeps handles to it for the next in-process run), and its TCP store holds the port. So
    each test ends with the variables as they were and a fresh MASTER_PORT: a subprocess started by a later test
    then starts its own group on a free port instead of joining this one's."""
    before = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    os.environ["MASTER_PORT"] = str(free_port())
