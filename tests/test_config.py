"""shared.config: environment -> frozen dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from shared.config import ConfigError, MeshConfig, Secret, describe, env, load

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class ServiceConfig:
    mesh: MeshConfig
    name: str = env("SVC_NAME")
    workers: int = env("SVC_WORKERS", default=4)
    ratio: float = env("SVC_RATIO", default=0.5)
    debug: bool = env("SVC_DEBUG", default=False)
    models: tuple[str, ...] = env("SVC_MODELS", default=())
    mode: Literal["fast", "safe"] = env("SVC_MODE", default="safe")
    api_secret: Secret = env("SVC_API_SECRET")
    cache_dir: Path | None = env("SVC_CACHE_DIR", default=None)


REQUIRED = {"SVC_NAME": "auth", "SVC_API_SECRET": "hunter2"}


def test_defaults_of_the_mesh_config() -> None:
    mesh = load(MeshConfig, {})
    assert mesh.data_dir == Path(".data")
    assert mesh.bootstrap == ()
    assert (mesh.dht_host, mesh.dht_port) == ("127.0.0.1", 0)
    assert (mesh.rpc_host, mesh.rpc_port) == ("127.0.0.1", 0)
    assert mesh.advertised_host == "127.0.0.1"
    assert mesh.mesh_secret is None
    assert mesh.mesh_secret_path == Path(".data/mesh.secret")
    assert mesh.record_ttl == 30.0
    assert (mesh.log_level, mesh.log_format) == ("info", "json")
    assert mesh.max_message_bytes == 1_048_576


def test_every_type_is_parsed() -> None:
    config = load(
        ServiceConfig,
        {
            **REQUIRED,
            "SVC_WORKERS": " 8 ",
            "SVC_RATIO": "0.25",
            "SVC_DEBUG": "Yes",
            "SVC_MODELS": "llama3, qwen2.5 ,,",
            "SVC_MODE": "FAST",
            "SVC_CACHE_DIR": "/var/cache/isw",
            "INFERSWARM_BOOTSTRAP": "10.0.0.1:4000,[::1]:4001",
            "INFERSWARM_RPC_HOST": "0.0.0.0",
            "INFERSWARM_ADVERTISE_HOST": "node1.lan",
            "INFERSWARM_MESH_SECRET": "ab" * 32,
            "INFERSWARM_LOG_FORMAT": "console",
        },
    )
    assert (config.name, config.workers, config.ratio, config.debug) == ("auth", 8, 0.25, True)
    assert config.models == ("llama3", "qwen2.5")
    assert config.mode == "fast"
    assert config.cache_dir == Path("/var/cache/isw")
    assert config.api_secret.reveal() == "hunter2"
    assert config.mesh.bootstrap == ("10.0.0.1:4000", "[::1]:4001")
    assert config.mesh.advertised_host == "node1.lan"
    assert config.mesh.mesh_secret == Secret("ab" * 32)
    assert config.mesh.log_format == "console"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("text", ["0", "false", "NO", "Off"])
def test_false_booleans(text: str) -> None:
    assert load(ServiceConfig, {**REQUIRED, "SVC_DEBUG": text}).debug is False


def test_an_empty_variable_counts_as_unset() -> None:
    config = load(ServiceConfig, {**REQUIRED, "SVC_WORKERS": "", "INFERSWARM_MESH_SECRET": ""})
    assert config.workers == 4
    assert config.mesh.mesh_secret is None


def test_one_error_names_every_bad_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load(
            ServiceConfig,
            {
                "SVC_WORKERS": "many",
                "SVC_DEBUG": "maybe",
                "SVC_MODE": "turbo",
                "INFERSWARM_RPC_PORT": "abc",
                "INFERSWARM_DHT_PORT": "70000",
                "INFERSWARM_BOOTSTRAP": "10.0.0.1",
                "INFERSWARM_RECORD_TTL": "-1",
                "INFERSWARM_LOG_FORMAT": "xml",
            },
        )
    problems = caught.value.problems
    assert "INFERSWARM_RPC_PORT: expected an integer, got 'abc'" in problems
    assert "SVC_NAME: required but not set" in problems
    assert "SVC_API_SECRET: required but not set" in problems
    named = {problem.split(":")[0] for problem in problems}
    assert named == {
        "SVC_NAME",
        "SVC_API_SECRET",
        "SVC_WORKERS",
        "SVC_DEBUG",
        "SVC_MODE",
        "INFERSWARM_RPC_PORT",
        "INFERSWARM_DHT_PORT",
        "INFERSWARM_BOOTSTRAP",
        "INFERSWARM_RECORD_TTL",
        "INFERSWARM_LOG_FORMAT",
    }
    for problem in problems:
        assert problem in str(caught.value)


def test_a_wildcard_bind_needs_an_advertised_host() -> None:
    with pytest.raises(ConfigError, match="INFERSWARM_ADVERTISE_HOST"):
        load(MeshConfig, {"INFERSWARM_RPC_HOST": "0.0.0.0"})


def test_secret_is_masked_and_compared_in_constant_time() -> None:
    secret = Secret("hunter2")
    assert repr(secret) == str(secret) == f"{secret}" == "***"
    assert secret.reveal() == "hunter2"
    assert secret == Secret("hunter2")
    assert secret != Secret("hunter3")
    assert secret != "hunter2"  # a Secret never equals the bare string
    config = load(ServiceConfig, REQUIRED)
    assert "hunter2" not in repr(config)


def test_an_invalid_secret_is_not_echoed() -> None:
    def hex_only(raw: str) -> Secret:
        bytes.fromhex(raw)  # ValueError quoting nothing
        if len(raw) < 8:
            raise ValueError(f"too short: {raw!r}")
        return Secret(raw)

    @dataclass(frozen=True)
    class KeyConfig:
        key: Secret = env("KEY", parse=hex_only)

    with pytest.raises(ConfigError) as caught:
        load(KeyConfig, {"KEY": "abcd"})
    assert caught.value.problems == ["KEY: too short: ***"]


def test_describe_is_safe_to_log() -> None:
    config = load(ServiceConfig, {**REQUIRED, "INFERSWARM_MESH_SECRET": "cd" * 32})
    described = describe(config)
    assert described["api_secret"] == "***"
    assert described["mesh"]["mesh_secret"] == "***"
    assert described["mesh"]["data_dir"] == ".data"
    assert described["models"] == []
    assert described["name"] == "auth"
    assert "hunter2" not in repr(described) and "cd" * 32 not in repr(described)


def test_a_field_without_a_variable_is_a_programming_error() -> None:
    @dataclass(frozen=True)
    class Broken:
        port: int

    with pytest.raises(TypeError, match="Broken.port"):
        load(Broken, {})
