"""A real stack for the web tests: `inferswarm up` with a model server we control.

The stack is what `make run` starts (embedded PostgreSQL, DHT bootstrap, auth,
metrics, an inference worker, the gateway and the web process)
on free ports under a temporary data directory. The worker serves the model
"test-model" through its openai backend from `OpenAIServer` (tests/openai_server.py),
run here in a thread of its own, so tests can slow its tokens down and count
the streams that were cut. Passwords are hashed with cheap Argon2 parameters.
Admins are granted as the operator grants them: `inferswarm admin grant`
(`WebStack.grant_admin`), a real CLI process holding the stack's mesh secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ollama_server import OllamaServer
from openai_server import OpenAIServer
from stack import free_tcp_port, xdg_homes

__all__ = ["MODEL", "PASSWORD", "ADMIN_EMAIL", "free_tcp_port", "ModelServer", "WebStack",
           "web_stack", "post_json", "new_account", "new_key"]

MODEL = "test-model"
PASSWORD = "correct-horse-battery-9"
ADMIN_EMAIL = "admin@example.com"  #: the address the tests' admin registers with; it confers nothing


class ModelServer:
    """A protocol test server (`OpenAIServer`, or `server_class` such as `OllamaServer`)
    on its own event loop in a daemon thread."""

    def __init__(self, models: tuple[str, ...] = (MODEL,), server_class: type = OpenAIServer,
                 **options: object) -> None:
        self._models, self._class, self._options = models, server_class, options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="model-server", daemon=True)
        self.server: Any = None

    def __enter__(self) -> Any:
        self._thread.start()
        self.server = self._class(self._models, **self._options)
        asyncio.run_coroutine_threadsafe(self.server.__aenter__(), self._loop).result(10)
        return self.server

    def __exit__(self, *exc_info: object) -> None:
        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.__aexit__(None, None, None), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@dataclass
class WebStack:
    base_url: str
    data_dir: Path
    bootstrap: str
    model: OpenAIServer
    ready: dict
    ollama: Any = None  #: the `OllamaServer`, when the stack has one

    @property
    def mesh_secret(self) -> str:
        return (self.data_dir / "mesh.secret").read_text().strip()

    def grant_admin(self, user: str) -> None:
        """`inferswarm admin grant USER` with this stack's data directory (its mesh secret)."""
        self.operator("admin", "grant", user)

    def operator(self, *args: str) -> None:
        """`inferswarm ARGS...` as the operator: with this stack's data directory (its mesh secret)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_")}
        done = subprocess.run(
            [sys.executable, "-m", "inferswarm.cli", *args, "--data-dir", str(self.data_dir),
             "--bootstrap", self.bootstrap], capture_output=True, text=True, timeout=60,
            env={**env, **xdg_homes(self.data_dir)})
        assert done.returncode == 0, done.stderr


@contextmanager
def web_stack(root: Path, *, models: dict | None = None, upstream_models: tuple[str, ...] = (),
              ollama_models: tuple[str, ...] = (), **env: str) -> Iterator[WebStack]:
    """Start the whole stack; stop it (SIGTERM, then wait) when the block ends.

    `models`: catalog entries served beside "test-model" (e.g. the local smollm2);
    an entry whose url is "openai" or "ollama" is served by the OpenAI test server
    (listing `upstream_models` too) or by an Ollama test server (started when
    `ollama_models` names its models)."""
    web_port = free_tcp_port()
    data_dir = root / "data"
    with contextlib.ExitStack() as servers:
        model = servers.enter_context(ModelServer(
            (MODEL, *upstream_models), reply="The quick brown fox jumps over the lazy dog near the quiet river bank"))
        ollama = servers.enter_context(ModelServer(ollama_models, OllamaServer)) if ollama_models else None
        urls = {"openai": model.base_url, "ollama": ollama.url if ollama else ""}
        catalog = {MODEL: {"backend": "openai", "url": model.base_url, "slots": 8, "queue": 64}}
        for name, entry in (models or {}).items():
            catalog[name] = {**entry, "url": urls[entry["url"]]} if entry.get("url") in urls else entry
        child_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "INFERSWARM_API_KEY")}
        child_env.update({
            "INFERSWARM_MODELS": json.dumps(catalog),
            "INFERSWARM_ARGON2_TIME_COST": "1", "INFERSWARM_ARGON2_MEMORY_KIB": "8192",
            "INFERSWARM_ARGON2_PARALLELISM": "1", "INFERSWARM_CACHE_TTL": "0",
            "INFERSWARM_LOG_LEVEL": "warning",
            # Suites register many accounts from one address (127.0.0.1); the limits
            # themselves are tested in test_attacks_accounts.py.
            "INFERSWARM_REGISTER_PER_SOURCE": "1000", "INFERSWARM_REGISTER_OVERALL": "1000",
            **xdg_homes(data_dir), **env,
        })
        stderr = open(root / "up.stderr", "w")  # a file: an undrained pipe could block `up`
        proc = subprocess.Popen(
            [sys.executable, "-m", "inferswarm.cli", "up", "--json", "--data-dir", str(data_dir),
             "--dht-port", "0", "--workers", "1", "--web-port", str(web_port),
             "--metrics-port", str(free_tcp_port())],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=child_env)
        try:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                code = proc.wait()
                raise AssertionError(f"up exited early ({code}): {(root / 'up.stderr').read_text()[-3000:]}")
            ready = json.loads(line)
            yield WebStack(f"http://127.0.0.1:{web_port}", data_dir, ready["bootstrap"], model, ready, ollama)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            stderr.close()


def post_json(url: str, body: dict, headers: dict | None = None) -> dict:
    """POST a JSON body with the standard library; the JSON reply (an error status raises)."""
    request = urllib.request.Request(url, method="POST", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def new_account(stack: WebStack, name: str) -> tuple[str, str]:
    """Register `name`, log in and create an API key: (session token, API key)."""
    post_json(f"{stack.base_url}/api/auth/register",
              {"username": name, "email": f"{name}@example.com", "password": PASSWORD})
    token = post_json(f"{stack.base_url}/api/auth/login",
                      {"username_or_email": name, "password": PASSWORD})["token"]
    key = post_json(f"{stack.base_url}/api/auth/api-keys", {"name": "sdk"}, {"Authorization": f"Bearer {token}"})
    return token, key["api_key"]


def new_key(stack: WebStack, name: str) -> str:
    """A new account's API key."""
    return new_account(stack, name)[1]
