"""llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`) over
the embedded SmolLM2 GGUF, as a real upstream for the openai backend's tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from services.inference.backends.local import default_gguf

__all__ = ["llama_server"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def llama_server(alias: str = "smollm2-server", *, threads: int = 1) -> Iterator[str]:
    """Start the server serving the model as `alias`; its API base URL (…/v1) once it answers."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf()), "--host", "127.0.0.1",
         "--port", str(port), "--n_threads", str(threads), "--n_ctx", "2048", "--model_alias", alias],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "llama_cpp.server exited"
            assert time.monotonic() < deadline, "llama_cpp.server did not start"
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
