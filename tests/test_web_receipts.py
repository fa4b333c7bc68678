"""Signed usage receipts through a real stack (`inferswarm up`), read with the official
`openai` package and checked against the keys the web service publishes.

web -> gateway (signs with its node key) -> inference worker -> the OpenAI test
server ("test-model", and "te3" for embeddings). The real `inferswarm receipts
verify` runs in subprocesses, with keys from a file, from the web service and
from the mesh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import openai
import pytest

from shared.identity import NodeIdentity
from shared.receipts import HEADER, verify
from stack import xdg_homes
from web_support import MODEL, new_key, web_stack

pytestmark = [pytest.mark.stack, pytest.mark.timeout(180)]

HELLO = [{"role": "user", "content": "Say something."}]
EMBEDDER = {"te3": {"backend": "openai", "kind": "embedding", "url": "openai", "model": "text-embedding-3-small"}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("receipts"), models=EMBEDDER,
                   upstream_models=("text-embedding-3-small",)) as running:
        yield running


@pytest.fixture(scope="module")
def key(stack) -> str:
    return new_key(stack, "receipt-rita")


@pytest.fixture(scope="module")
def client(stack, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def keys(stack) -> list[str]:
    with urllib.request.urlopen(f"{stack.base_url}/api/receipts/keys", timeout=30) as reply:
        return json.loads(reply.read())


def _get(stack, path: str, headers: dict) -> dict:
    request = urllib.request.Request(f"{stack.base_url}{path}", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def test_the_web_service_publishes_the_live_gateways_keys(stack, keys):
    """The node keys of the stack's gateways, as their key files on disk say."""
    files = sorted((stack.data_dir / "nodes").glob("gateway*/node.key"))
    assert files and keys == sorted(NodeIdentity.load_or_create(path).public_key.hex() for path in files)


def test_a_chat_completion_carries_a_receipt_that_matches_the_reply(stack, client, key, keys):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=4)
    completion = raw.parse()
    receipt = verify(raw.headers[HEADER], keys)
    assert receipt.request_id == raw.headers["x-request-id"]
    assert receipt.model == completion.model == MODEL
    assert (receipt.prompt_tokens, receipt.completion_tokens) == (completion.usage.prompt_tokens,
                                                                  completion.usage.completion_tokens)
    assert receipt.completion_tokens == 4 and receipt.cost is None
    assert abs(receipt.at - completion.created) < 5
    assert receipt.user_id == _get(stack, "/api/quota", {"X-API-Key": key})["user_id"]


def test_a_stream_carries_its_receipt_on_its_last_event(client, keys):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=3, stream=True, stream_options={"include_usage": True})
    assert HEADER not in raw.headers  # sent before any receipt exists
    chunks = list(raw.parse())
    last, finish = chunks[-1], chunks[-2]
    assert not last.choices and last.usage.completion_tokens == 3
    receipt = verify(last.receipt, keys)
    assert receipt.request_id == raw.headers["x-request-id"]
    assert (receipt.prompt_tokens, receipt.completion_tokens) == (last.usage.prompt_tokens, 3)
    assert finish.choices[0].finish_reason == "length" and finish.receipt == last.receipt
    # without the usage chunk, the finish chunk is the last before [DONE]
    plain = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, stream=True))
    assert verify(plain[-1].receipt, keys).completion_tokens == 2


def test_several_choices_have_a_receipt_each(client, keys):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=2, n=2)
    receipts = [verify(text, keys) for text in raw.headers[HEADER].split(",")]
    assert [r.request_id for r in receipts] == raw.headers["x-inferswarm-request-ids"].split(",")
    assert sum(r.prompt_tokens + r.completion_tokens for r in receipts) == raw.parse().usage.total_tokens


def test_completions_responses_and_embeddings_carry_receipts(client, keys):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Say", max_tokens=2)
    assert verify(raw.headers[HEADER], keys).request_id == raw.headers["x-request-id"]

    raw = client.responses.with_raw_response.create(model=MODEL, input="Say something.", max_output_tokens=3)
    receipt = verify(raw.headers[HEADER], keys)
    assert receipt.request_id == raw.headers["x-request-id"]
    assert receipt.completion_tokens == raw.parse().usage.output_tokens == 3
    events = list(client.responses.create(model=MODEL, input="Say something.", max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete"  # cut by max_output_tokens, as at OpenAI
    assert verify(events[-1].response.receipt, keys).completion_tokens == 3

    raw = client.embeddings.with_raw_response.create(model="te3", input=["first text", "second text"])
    reply = raw.parse()
    receipt = verify(raw.headers[HEADER], keys)
    assert receipt.request_id == raw.headers["x-request-id"]
    assert receipt.model == reply.model == "te3"
    assert (receipt.prompt_tokens, receipt.completion_tokens) == (reply.usage.prompt_tokens, 0)


def _verify_cli(stack, path, *options: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_")}
    return subprocess.run([sys.executable, "-m", "inferswarm.cli", "receipts", "verify", str(path), *options],
                          capture_output=True, text=True, timeout=60, input=stdin,
                          env={**env, **xdg_homes(stack.data_dir)})


def test_the_cli_verifies_good_receipts_and_refuses_a_tampered_one(stack, client, keys, tmp_path):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=3)
    good = raw.headers[HEADER]
    request_id = raw.headers["x-request-id"]
    good_file = tmp_path / "good.txt"
    good_file.write_text(f"# receipts of today\n{good}\n")
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(keys))

    for options in (("--keys", str(keys_file)), ("--base-url", stack.base_url),
                    ("--data-dir", str(stack.data_dir), "--bootstrap", stack.bootstrap)):
        done = _verify_cli(stack, good_file, *options)
        assert done.returncode == 0, (options, done.stderr)
        assert done.stdout.startswith("OK  line 2") and f"request_id={request_id}" in done.stdout
        assert "completion_tokens=3" in done.stdout and f"model={MODEL}" in done.stdout

    done = _verify_cli(stack, "-", "--keys", str(keys_file), "--json", stdin=good)
    assert done.returncode == 0 and json.loads(done.stdout)[0]["request_id"] == request_id

    payload, signature = good[len("isr-v1."):].split(".")
    more = verify(good, keys).fields()
    assert more["completion_tokens"] == 3
    index = len(payload) // 2
    tampered = "isr-v1." + payload[:index] + ("A" if payload[index] != "A" else "B") + payload[index + 1:] \
        + "." + signature
    bad_file = tmp_path / "bad.txt"
    bad_file.write_text(f"{good}\n{tampered}\n")
    done = _verify_cli(stack, bad_file, "--base-url", stack.base_url)
    assert done.returncode == 9, done.stderr
    assert done.stdout.startswith("OK  line 1")
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("inferswarm: line 2: INVALID_PARAMS (")

    stranger = tmp_path / "stranger.txt"
    stranger.write_text("ab" * 32 + "\n")
    done = _verify_cli(stack, good_file, "--keys", str(stranger))
    assert done.returncode == 9 and "(unknown_signer)" in done.stderr
