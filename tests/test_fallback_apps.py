"""Fallback as users reach it: the official `openai` package and real `inferswarm` processes.

A real stack (`inferswarm up`): the worker serves "primary" from an Ollama test
server that fails on command, and "test-model" from the OpenAI test server. The
operator makes the alias `smart` -> [primary, test-model] with the real
`inferswarm admin settings set --alias` process. While primary's server is down:

* the SDK's `model="smart"` is answered, and the reply (and each streamed chunk)
  names the model that served, `test-model`, as does `x-inferswarm-model`;
* `x-inferswarm-fallback: false` or `extra_body={"fallback": False}` keep the
  request on primary: a 503 the SDK raises, not another model's answer;
* `inferswarm infer --model smart --json` names the model and what was tried,
  four processes at once and three in a row all answered; with
  `--no-fallback` it fails with the typed error and its exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from web_support import MODEL, PASSWORD, WebStack, web_stack

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]

ASK = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    models = {"primary": {"backend": "ollama", "url": "ollama", "model": "llama3.1:8b"}}
    with web_stack(tmp_path_factory.mktemp("fallback-apps"), models=models, ollama_models=("llama3.1:8b",),
                   INFERSWARM_PROBE_INTERVAL="0.5") as running:
        running.operator("admin", "settings", "set", "--alias", f"smart=primary,{MODEL}")
        yield running


def _cli(stack: WebStack, home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_")}
    env = {**clean, "XDG_CONFIG_HOME": str(home / "config"), "XDG_CACHE_HOME": str(home / "cache"),
           "INFERSWARM_BOOTSTRAP": stack.bootstrap, "INFERSWARM_DATA_DIR": str(stack.data_dir)}
    return subprocess.run([sys.executable, "-m", "inferswarm.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=90, env=env)


@pytest.fixture(scope="module")
def user(stack, tmp_path_factory) -> tuple[Path, str]:
    """A CLI user's home (logged in over HTTP) and their API key."""
    home = tmp_path_factory.mktemp("fallback-user")
    for args, stdin in ((["register", "fay", "fay@example.com", "--password-stdin"], PASSWORD),
                        (["login", "fay", "--password-stdin"], PASSWORD)):
        done = _cli(stack, home, *args, "--base-url", stack.base_url, stdin=stdin)
        assert done.returncode == 0, done.stderr
    created = _cli(stack, home, "keys", "create", "apps", "--json", "--base-url", stack.base_url)
    assert created.returncode == 0, created.stderr
    return home, json.loads(created.stdout)["api_key"]


@pytest.fixture
def client(stack, user) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=user[1], max_retries=0, timeout=60)


@pytest.fixture
def primary_down(stack):
    stack.ollama.fail_status = 503
    yield
    stack.ollama.heal()


def test_the_alias_is_served_by_its_first_model_while_it_works(client):
    raw = client.chat.completions.with_raw_response.create(model="smart", messages=ASK, max_tokens=3)
    reply = raw.parse()
    assert reply.model == "primary" and raw.headers["x-inferswarm-model"] == "primary"
    assert reply.choices[0].message.content


def test_the_sdk_is_answered_by_the_next_model_and_told_which(client, primary_down):
    raw = client.chat.completions.with_raw_response.create(model="smart", messages=ASK, max_tokens=3)
    reply = raw.parse()
    assert reply.model == MODEL and raw.headers["x-inferswarm-model"] == MODEL
    assert reply.choices[0].message.content.split() == "The quick brown".split()
    chunks = list(client.chat.completions.create(model="smart", messages=ASK, max_tokens=3, stream=True))
    assert {chunk.model for chunk in chunks} == {MODEL}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split() == ["The", "quick", "brown"]


def test_the_sdk_can_opt_out_by_header_or_body(client, primary_down):
    for options in ({"extra_headers": {"x-inferswarm-fallback": "false"}}, {"extra_body": {"fallback": False}}):
        with pytest.raises(openai.InternalServerError) as raised:
            client.chat.completions.create(model="smart", messages=ASK, max_tokens=3, **options)
        assert raised.value.status_code == 503, options
    for options in ({"extra_headers": {"x-inferswarm-fallback": "maybe"}}, {"extra_body": {"fallback": "no"}}):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="smart", messages=ASK, **options)
        assert bad.value.body["param"] == "fallback", options


def test_the_cli_names_the_model_that_served_and_can_opt_out(stack, user, primary_down):
    home, _ = user
    done = _cli(stack, home, "infer", "Say hello.", "--model", "smart", "--max-tokens", "3", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["model"] == MODEL and answer["text"].split() == ["The", "quick", "brown"]
    # Right after primary failed the gateway routes around it before admission (nothing tried),
    # or tries it and falls back (named): either way the answer is the next model's.
    assert answer.get("tried", [{"model": "primary", "code": "UNAVAILABLE"}]) == [
        {"model": "primary", "code": "UNAVAILABLE"}]
    # Several users' scripts at once, then in a loop: every one answered by the next model.
    args = ("infer", "Say hello.", "--model", "smart", "--max-tokens", "3", "--json")
    with ThreadPoolExecutor(4) as pool:
        at_once = list(pool.map(lambda _: _cli(stack, home, *args), range(4)))
    in_a_row = [_cli(stack, home, *args) for _ in range(3)]
    for done in at_once + in_a_row:
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["model"] == MODEL
    refused = _cli(stack, home, "infer", "Say hello.", "--model", "smart", "--no-fallback", "--max-tokens", "3")
    assert refused.returncode != 0
    assert refused.stderr.startswith("inferswarm: ") and "unavailable" in refused.stderr.lower(), refused.stderr
