"""Structured logs: one JSON object per line on stderr, from structlog and stdlib alike.

    configure_logging(level="info", fmt="json", service="auth")   # once, at start
    log = get_logger(__name__)
    with bind_trace(request_trace_id):
        log.info("login", user_id=42)
    # {"user_id": 42, "event": "login", "trace_id": "…", "level": "info",
    #  "logger": "services.auth.service", "timestamp": "…Z", "service": "auth"}

Records from stdlib loggers (kademlia, asyncio, aiohttp, warnings) go through
the same processors, so stderr stays one JSON object per line.

Every line passes `redact`: values under sensitive keys (password, secret,
token, api key, authorization, cookie, private, `key`) become `***`, at any
depth, and API keys (`isk_…`) are masked wherever they appear in a string.
Counts are safe under plural names (`prompt_tokens`, `max_tokens`): only the
singular `token` is treated as sensitive.
"""

from __future__ import annotations

import logging
import re
import secrets
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TextIO

import structlog
from structlog.contextvars import bind_contextvars, get_contextvars, reset_contextvars
from structlog.stdlib import ProcessorFormatter
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "configure_logging",
    "get_logger",
    "new_trace_id",
    "bind_trace",
    "current_trace_id",
    "bind_request_id",
    "redact",
]

_MASK = "***"
_TRACE_KEY = "trace_id"
# `token` only when not followed by a letter: `access_token`, `accessToken`
# and `token_type` are masked, `prompt_tokens` and `tokenizer` are not.
_SENSITIVE_KEY = re.compile(
    r"passw(?:or)?d|secret|api_?key|authori[sz]ation|cookie|private|token(?![a-z])"
)
_API_KEY = re.compile(r"isk_[A-Za-z0-9_\-]+")
_API_KEY_PREFIX = "isk_"
_MAX_DEPTH = 8  # deeper structures are left alone rather than walked forever
#: Libraries whose info-level lines are chatter (command lines, state dumps).
_CHATTY = ("pgserver",)


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """A structlog logger named `name` (a module's `__name__`)."""
    return structlog.stdlib.get_logger(name, **initial)


# --- trace ids -------------------------------------------------------------------


def new_trace_id() -> str:
    """A fresh trace id: 32 lowercase hex characters (128 random bits)."""
    return secrets.token_hex(16)


@contextmanager
def bind_trace(trace_id: str | None = None) -> Iterator[str]:
    """Bind `trace_id` (or a new one) to every log line in this context.

    It is a context variable, so tasks started inside inherit it and
    concurrent requests never see each other's. The previous value is restored
    on exit.
    """
    trace_id = trace_id or new_trace_id()
    tokens = bind_contextvars(**{_TRACE_KEY: trace_id})
    try:
        yield trace_id
    finally:
        reset_contextvars(**tokens)


def bind_request_id(request_id: str) -> None:
    """Bind a request's id (the gateway's `gw-...`, which callers see as `x-request-id`) to
    every later log line of this context: the rest of the handler's task. The RPC server
    runs each request in a task of its own, so the binding ends with the request."""
    bind_contextvars(request_id=request_id)


def current_trace_id() -> str | None:
    """The trace id bound in this context, or None."""
    return get_contextvars().get(_TRACE_KEY)


# --- redaction -------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _is_sensitive(key: str) -> bool:
    lowered = key.lower()
    return lowered == "key" or _SENSITIVE_KEY.search(lowered) is not None


def _redact_value(value: Any, depth: int) -> Any:
    """`value` with secrets masked; the same object when nothing changed."""
    if isinstance(value, str):
        if _API_KEY_PREFIX in value:  # cheap test first: this runs on every string
            return _API_KEY.sub(_MASK, value)
        return value
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return _redact_mapping(value, depth + 1, copy=True)
    if isinstance(value, (list, tuple)):
        return _redact_sequence(value, depth + 1)
    return value


def _redact_sequence(sequence: list[Any] | tuple[Any, ...], depth: int) -> Any:
    copied: list[Any] | None = None  # made at the first masked item, if any
    for index, item in enumerate(sequence):
        new = _redact_value(item, depth)
        if new is not item:
            if copied is None:
                copied = list(sequence)
            copied[index] = new
    if copied is None:
        return sequence
    return copied if isinstance(sequence, list) else tuple(copied)


def _redact_mapping(mapping: MutableMapping[Any, Any], depth: int, copy: bool) -> Any:
    """Mask `mapping`'s values; copy it first (only if needed) when `copy`."""
    result = mapping
    for key, value in mapping.items():
        if isinstance(key, str) and _is_sensitive(key):
            new = _MASK if value is not None else None
        else:
            new = _redact_value(value, depth)
        if new is not value:
            if result is mapping and copy:
                result = dict(mapping)  # the caller's dict: never change it in place
            result[key] = new
    return result


def redact(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask sensitive values anywhere in the event.

    The event dict itself is ours and changed in place; nested dicts and lists
    belong to the caller and are copied only where something is masked.
    """
    redacted: MutableMapping[str, Any] = _redact_mapping(event_dict, 0, copy=False)
    return redacted


# --- configuration -----------------------------------------------------------------


def _add_service(service: str) -> Processor:
    def add_service(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("service", service)
        return event_dict

    return add_service


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}")
    return number


def configure_logging(
    level: str | int = "info",
    fmt: str = "json",
    service: str | None = None,
    *,
    stream: TextIO | None = None,
    cache_loggers: bool = True,
) -> None:
    """Send structlog and stdlib logging to `stream` (stderr) as `fmt` lines.

    `fmt` is "json" (one object per line) or "console" (for a human at a
    terminal). Calling it again replaces the previous set-up; pass
    `cache_loggers=False` when re-configuring in tests, because a logger that
    has been used keeps the configuration it was first used with.
    """
    number = _level_number(level)
    if fmt not in ("json", "console"):
        raise ValueError(f"unknown log format {fmt!r}; expected 'json' or 'console'")
    common: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if service is not None:
        common.append(_add_service(service))
    structlog.configure(
        processors=[*common, ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(number),
        cache_logger_on_first_use=cache_loggers,
    )
    stream = stream or sys.stderr
    _install_handler(_formatter(fmt, common, stream.isatty()), stream, number)


def _formatter(fmt: str, common: list[Processor], colors: bool) -> ProcessorFormatter:
    final: list[Processor] = [ProcessorFormatter.remove_processors_meta]
    if fmt == "json":
        # Tracebacks become a string field, and redact runs after that so an
        # API key quoted in an exception message is masked too.
        final += [structlog.processors.format_exc_info, redact, structlog.processors.JSONRenderer()]
    else:
        # ConsoleRenderer prints exceptions itself, after redact: fine for the
        # developer at the terminal this format is for.
        final += [redact, structlog.dev.ConsoleRenderer(colors=colors)]
    return ProcessorFormatter(foreign_pre_chain=common, processors=final)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Our handler, a distinct class so re-configuring can find and replace it."""


def _install_handler(formatter: logging.Formatter, stream: TextIO, level: int) -> None:
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(stream)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level)
    chatty_level = logging.WARNING if level > logging.DEBUG else logging.NOTSET
    for name in _CHATTY:  # still audible when debugging
        logging.getLogger(name).setLevel(chatty_level)
    logging.captureWarnings(True)  # warnings.warn output becomes a JSON line too
