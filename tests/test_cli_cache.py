"""The CLI from anywhere, and the DHT only when it must: real stacks, real CLI processes.

`inferswarm up` leaves `mesh.json` in its user's config directory; a CLI in
any directory finds the mesh from it, remembers the providers it looked up
(signed records, in its cache directory) and calls them directly next time;
when a remembered provider is gone, the call falls back to a lookup.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fault_support import Supervised
from inferswarm.providers import ProviderFile, cache_path, verifier_for
from shared.dht import service_topic
from shared.identity import MeshId
from stack import free_udp_port, read_ready, start_up, xdg_homes

pytestmark = pytest.mark.stack

PASSWORD = "cached-horse-battery-3"
GATEWAY = service_topic("gateway")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("stack") / "data"
    proc = start_up(data_dir, free_udp_port(), "--workers", "1")
    try:
        yield data_dir, read_ready(proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def user_env(homes: dict[str, str], home: Path, **extra: str) -> dict[str, str]:
    """A user's shell: XDG homes, no INFERSWARM_* at all (no data dir, no bootstrap)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERSWARM_", "XDG_"))}
    return {**env, **homes, "HOME": str(home), **extra}


def inferswarm(*args: str, env: dict[str, str], cwd: Path | str, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "inferswarm.cli", *args], input=stdin, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=90)


def cached(homes: dict[str, str], mesh_id: str) -> dict[str, list]:
    """What the provider file of these homes holds, verified as the CLI verifies it."""
    mesh = MeshId.from_text(mesh_id)
    return ProviderFile(cache_path(mesh, Path(homes["XDG_CACHE_HOME"]) / "inferswarm"), verifier_for(mesh)).load()


@pytest.mark.timeout(240)
def test_the_cli_works_from_any_directory_with_what_up_wrote(stack, tmp_path):
    data_dir, ready = stack
    homes = xdg_homes(data_dir)
    written = json.loads((Path(homes["XDG_CONFIG_HOME"]) / "inferswarm" / "mesh.json").read_text())
    assert written == {"mesh_id": ready["mesh_id"], "bootstrap": ready["bootstrap"], "data_dir": str(data_dir)}

    empty = tmp_path / "elsewhere"
    empty.mkdir()
    for cwd in (empty, "/"):
        result = inferswarm("models", "--json", env=user_env(homes, tmp_path / "home"), cwd=cwd)
        assert result.returncode == 0, result.stderr
        assert [m["name"] for m in json.loads(result.stdout)["models"]] == ["minilm", "smollm2"]
    assert list(empty.iterdir()) == []  # nothing left in the working directory


@pytest.mark.timeout(240)
def test_a_second_command_calls_the_cached_providers_without_joining_the_dht(stack, tmp_path):
    data_dir, ready = stack
    homes = {**xdg_homes(data_dir), "XDG_CACHE_HOME": str(tmp_path / "cache")}  # a cache of its own
    env = user_env(homes, tmp_path / "home")
    dead = f"127.0.0.1:{free_udp_port()}"  # nothing answers there: joining the DHT would fail

    # An empty cache needs the DHT: with a dead bootstrap the command cannot work.
    refused = inferswarm("models", "--bootstrap", dead, env=env, cwd=tmp_path)
    assert refused.returncode == 6 and "cannot reach the mesh" in refused.stderr, refused.stderr
    assert cached(homes, ready["mesh_id"]) == {}

    first = inferswarm("register", "hal", "hal@example.com", "--password-stdin", env=env, cwd=tmp_path,
                       stdin=PASSWORD)
    assert first.returncode == 0, first.stderr
    assert inferswarm("models", "--json", env=env, cwd=tmp_path).returncode == 0
    remembered = cached(homes, ready["mesh_id"])  # verified records, live
    assert set(remembered) >= {service_topic("auth"), GATEWAY}
    cache_file = cache_path(MeshId.from_text(ready["mesh_id"]), Path(homes["XDG_CACHE_HOME"]) / "inferswarm")
    assert cache_file.stat().st_mode & 0o777 == 0o600

    # Now the same commands work with the dead bootstrap: they never joined.
    dead_env = {**env, "INFERSWARM_BOOTSTRAP": dead}
    for args, stdin in ((("login", "hal", "--password-stdin"), PASSWORD), (("keys", "create", "k", "--json"), None),
                        (("models", "--json"), None), (("quota", "--json"), None)):
        result = inferswarm(*args, env=dead_env, cwd=tmp_path, stdin=stdin)
        assert result.returncode == 0, (args, result.stderr)


@pytest.mark.timeout(120)
def test_without_a_stack_or_a_mesh_id_the_cli_says_what_to_do(tmp_path):
    homes = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = inferswarm("models", env=user_env(homes, tmp_path / "home"), cwd=tmp_path)
    assert result.returncode == 6
    line, = result.stderr.strip().splitlines()
    assert "no mesh id" in line and "inferswarm up" in line and "INFERSWARM_MESH_ID" in line

    bad = inferswarm("models", env=user_env(homes, tmp_path / "home", INFERSWARM_MESH_ID="zz"), cwd=tmp_path)
    assert bad.returncode == 6 and "INFERSWARM_MESH_ID" in bad.stderr and "Traceback" not in bad.stderr

    no_secret = inferswarm("models", "--data-dir", str(tmp_path), env=user_env(homes, tmp_path / "home"),
                           cwd=tmp_path)
    assert no_secret.returncode == 6 and "mesh.secret" in no_secret.stderr


@pytest.mark.timeout(240)
def test_inferswarm_mesh_id_overrides_mesh_json(stack, tmp_path):
    data_dir, ready = stack
    homes = {**xdg_homes(data_dir), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    other = "ab" * 32  # a mesh nobody here belongs to: every record found fails its check
    env = user_env(homes, tmp_path / "home", INFERSWARM_MESH_ID=other, INFERSWARM_BOOTSTRAP=ready["bootstrap"])
    result = inferswarm("models", env=env, cwd=tmp_path)
    assert result.returncode == 6 and "no live provider" in result.stderr, result.stderr
    assert inferswarm("models", env={**env, "INFERSWARM_MESH_ID": ready["mesh_id"]}, cwd=tmp_path).returncode == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("gateways", [1, 2])
def test_cached_gateways_that_restarted_elsewhere_are_found_again_by_a_lookup(tmp_path, gateways):
    data_dir = tmp_path / "data"
    names = ["gateway"] if gateways == 1 else [f"gateway-{index}" for index in range(1, gateways + 1)]
    # Records living 120 s: the ones cached before the restart are still live
    # after it, so the next command really starts from dead endpoints.
    up = Supervised(data_dir, free_udp_port(), "--gateways", str(gateways), "--workers", "1",
                    env={"INFERSWARM_RECORD_TTL": "120"})
    try:
        ready = up.wait_ready()
        homes = xdg_homes(data_dir)
        env = user_env(homes, tmp_path / "home")
        assert inferswarm("models", "--json", env=env, cwd=tmp_path).returncode == 0
        before = {p.endpoint for p in cached(homes, ready["mesh_id"])[GATEWAY]}
        assert before == {up.ready_line(name)["endpoint"] for name in names}

        # Each restarts on a new port, with the same node key: for one gateway,
        # the lookup finds the very node that failed, at its new endpoint.
        restarted = {}
        for name in names:
            pid = up.pid_of(name)
            os.kill(pid, signal.SIGKILL)
            restarted[name] = asyncio.run(up.wait_restarted(name, pid, timeout=60))["endpoint"]
        after = set(restarted.values())
        assert not after & before  # new ports: every cached endpoint is dead
        assert {p.endpoint for p in cached(homes, ready["mesh_id"])[GATEWAY]} == before  # and still cached

        result = inferswarm("models", "--json", env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert [m["name"] for m in json.loads(result.stdout)["models"]] == ["minilm", "smollm2"]
        # The fallback lookup's answer replaced the dead records for the next commands.
        assert {p.endpoint for p in cached(homes, ready["mesh_id"])[GATEWAY]} == after
    finally:
        assert up.stop() == 0
