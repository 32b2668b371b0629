"""Test environment: offline, CPU, no stale caches (see ../shared/reference/env_check.md, pitfalls 2, 7, 10, 11)."""
import os
import socket
import tempfile

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
