"""shared.logging: JSON lines, trace ids, redaction."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shared.logging import (
    bind_trace,
    configure_logging,
    current_trace_id,
    get_logger,
    new_trace_id,
    redact,
)

ROOT = Path(__file__).resolve().parents[1]


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.rpc
def test_a_process_writes_json_lines_with_its_trace_id() -> None:
    script = textwrap.dedent(
        """
        import logging
        from shared.logging import bind_trace, configure_logging, get_logger
        configure_logging("info", "json", service="auth")
        log = get_logger("services.auth")
        with bind_trace("0123456789abcdef0123456789abcdef"):
            log.info("login", user_id=42)
            logging.getLogger("kademlia.network").warning("stdlib %s", "too")
            try:
                1 / 0
            except ZeroDivisionError:
                log.exception("failed")
        log.debug("hidden")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    login, stdlib, failed = [json.loads(line) for line in done.stderr.splitlines()]
    assert login["event"] == "login" and login["user_id"] == 42
    assert login["level"] == "info" and login["logger"] == "services.auth"
    assert login["service"] == "auth"
    assert login["trace_id"] == "0123456789abcdef0123456789abcdef"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", login["timestamp"])
    assert stdlib["event"] == "stdlib too" and stdlib["level"] == "warning"
    assert stdlib["logger"] == "kademlia.network"
    assert stdlib["trace_id"] == login["trace_id"] and stdlib["service"] == "auth"
    assert failed["level"] == "error"
    assert "Traceback" in failed["exception"] and "ZeroDivisionError" in failed["exception"]


@pytest.mark.unit
def test_levels_are_filtered(log_stream: io.StringIO) -> None:
    log = get_logger("t")
    log.debug("not shown")
    logging.getLogger("other").info("shown")
    logging.getLogger("other").debug("not shown either")
    log.warning("shown too")
    assert [line["event"] for line in lines(log_stream)] == ["shown", "shown too"]


@pytest.mark.unit
def test_sensitive_values_are_masked_at_any_depth(log_stream: io.StringIO) -> None:
    payload = {"user": "ann", "credentials": [{"password": "pw1"}, {"Authorization": "Bearer x"}]}
    get_logger("t").info(
        "request",
        payload=payload,
        access_token="t1",
        apiKey="k1",
        key="k2",
        private_key="k3",
        cookie="c",
        mesh_secret="s",
        note="client sent isk_AbC123-x_9 in the body",
        keys=("isk_only",),
        prompt_tokens=12,
        node_key="public",
        tokenizer="bpe",
    )
    line = lines(log_stream)[0]
    masked = [{"password": "***"}, {"Authorization": "***"}]
    assert line["payload"] == {"user": "ann", "credentials": masked}
    for name in ("access_token", "apiKey", "key", "private_key", "cookie", "mesh_secret"):
        assert line[name] == "***", name
    assert line["note"] == "client sent *** in the body"
    assert line["keys"] == ["***"]
    assert (line["prompt_tokens"], line["node_key"], line["tokenizer"]) == (12, "public", "bpe")
    # The caller's objects are left as they were.
    assert payload["credentials"][0]["password"] == "pw1"


@pytest.mark.unit
def test_stdlib_messages_and_tracebacks_are_masked(log_stream: io.StringIO) -> None:
    logging.getLogger("aiohttp.access").warning("GET /?api_key=isk_leaked1 401")
    try:
        raise ValueError("bad key isk_leaked2")
    except ValueError:
        get_logger("t").exception("rejected")
    first, second = lines(log_stream)
    assert first["event"] == "GET /?api_key=*** 401"
    assert "isk_leaked2" not in second["exception"] and "bad key ***" in second["exception"]


@pytest.mark.unit
def test_redact_copies_nothing_when_nothing_is_sensitive() -> None:
    nested = {"a": [1, "two", {"b": 3}]}
    event = {"event": "x", "nested": nested, "n": 1}
    assert redact(None, "info", event) is event
    assert event["nested"] is nested and nested["a"][2] == {"b": 3}


@pytest.mark.unit
def test_configuring_twice_keeps_one_handler(log_stream: io.StringIO) -> None:
    configure_logging("info", "json", service="test", stream=log_stream, cache_loggers=False)
    get_logger("t").info("once")
    assert [line["event"] for line in lines(log_stream)] == ["once"]


@pytest.mark.unit
def test_console_format_for_people(log_stream: io.StringIO) -> None:
    configure_logging("debug", "console", service="test", stream=log_stream, cache_loggers=False)
    get_logger("t").debug("step", password="pw", n=1)
    text = log_stream.getvalue()
    assert "step" in text and "password=***" in text and "n=1" in text
    assert not text.startswith("{")


@pytest.mark.unit
def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("loud")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")


@pytest.mark.unit
def test_trace_ids() -> None:
    assert re.fullmatch(r"[0-9a-f]{32}", new_trace_id())
    assert new_trace_id() != new_trace_id()
    assert current_trace_id() is None
    with bind_trace() as outer:
        assert current_trace_id() == outer
        with bind_trace("inner") as inner:
            assert inner == current_trace_id() == "inner"
        assert current_trace_id() == outer
    assert current_trace_id() is None


@pytest.mark.unit
async def test_concurrent_requests_keep_their_own_trace_ids() -> None:
    async def read() -> str | None:
        return current_trace_id()

    async def handle(trace_id: str) -> tuple[str | None, str | None]:
        with bind_trace(trace_id):
            await asyncio.sleep(0.01)
            inherited = await asyncio.create_task(read())  # tasks copy the context
            return current_trace_id(), inherited

    results = await asyncio.gather(handle("a" * 32), handle("b" * 32))
    assert results == [("a" * 32, "a" * 32), ("b" * 32, "b" * 32)]
