"""The mesh across three hosts: Linux network namespaces with their own addresses.

    host a   PostgreSQL (TCP, password), the DHT bootstrap, auth, metrics, web, the client
    host b   a gateway
    host c   two inference workers (the echo backend), a third one started later

Every process is configured with its own host's address, the bootstrap's
address and its role's credential (made with `inferswarm credential ROLE`;
no process holds the mesh secret), nothing else: the gateway learns of the workers, and the client of
the gateway, only through the DHT. The hosts reach each other through a
bridge in a namespace of their own, never through the machine's loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from netns_support import HostProcess, Network, NetworkPostgres, can_make_namespaces
from shared.identity import MeshCredential

pytestmark = [pytest.mark.skipif(not can_make_namespaces(), reason="needs root and iproute2 for network namespaces"),
              pytest.mark.stack]

DHT_PORT = 7400
WEB_PORT = 8080
MODEL = "echo"
PROMPT = "hosts apart yet one mesh"
PASSWORD = "correct horse battery staple"


class Cluster:
    """The three hosts and what runs on them."""

    def __init__(self, network: Network, root: Path, secret: str, postgres: NetworkPostgres,
                 databases: dict[str, str]) -> None:
        self.network, self.root, self.secret = network, root, secret
        self.postgres, self.databases = postgres, databases
        self.api_key = ""
        self.address = network.addresses
        self.bootstrap = f"{self.address['a']}:{DHT_PORT}"
        self.mesh_id = MeshCredential.from_text(secret).mesh_id.hex()
        self.processes: dict[str, HostProcess] = {}
        self.ready: dict[str, dict[str, Any]] = {}

    def start(self, name: str, host: str, argv: list[str], role: str, **env: str) -> dict[str, Any]:
        """`argv` on `host`, given `role`'s credential only (never the mesh secret)."""
        address = self.address[host]
        base = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_") and k != "DATABASE_URL"}
        base.update(INFERSWARM_DATA_DIR=str(self.root / host), INFERSWARM_NODE_NAME=name,
                    INFERSWARM_CREDENTIAL_FILE=str(self.credential(role)), INFERSWARM_BOOTSTRAP=self.bootstrap,
                    INFERSWARM_DHT_HOST=address, INFERSWARM_RPC_HOST=address)
        (self.root / host).mkdir(parents=True, exist_ok=True)
        process = HostProcess(self.network, host, argv, {**base, **env}, self.root / f"{name}.log")
        self.processes[name] = process
        self.ready[name] = process.ready()
        return self.ready[name]

    def credential(self, role: str) -> Path:
        """`role`'s credential file, made as the README says: `inferswarm credential ROLE --out FILE`
        where the mesh secret is."""
        path = self.root / "credentials" / f"{role}.credential"
        if not path.exists():
            made = subprocess.run([sys.executable, "-m", "inferswarm.cli", "credential", role, "--out", str(path)],
                                  env={**os.environ, "INFERSWARM_MESH_SECRET": self.secret}, capture_output=True,
                                  text=True, timeout=30)
            assert made.returncode == 0, made.stderr
            assert path.stat().st_mode & 0o777 == 0o600 and f"INFERSWARM_CREDENTIAL_FILE={path}" in made.stderr
        return path

    def service(self, name: str, host: str, service: str, **env: str) -> dict[str, Any]:
        return self.start(name, host, [sys.executable, "-m", f"services.{service}"], service, **env)

    def worker(self, name: str) -> dict[str, Any]:
        # Two slots and 50 ms between words: 6 requests at once need more than one worker.
        models = json.dumps({MODEL: {"backend": "echo", "slots": 2, "delay": 0.05}})
        return self.service(name, "c", "inference", INFERSWARM_MODELS=models)

    def on_host_a(self, argv: list[str], *, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """A command run by the client on host a, which knows only the bootstrap and the mesh id."""
        env = {**os.environ, "INFERSWARM_BOOTSTRAP": self.bootstrap, "INFERSWARM_MESH_ID": self.mesh_id,
               "XDG_CONFIG_HOME": str(self.root / "client"), "XDG_CACHE_HOME": str(self.root / "client-cache")}
        env.pop("INFERSWARM_API_KEY", None)
        return subprocess.run([*self.network.exec_prefix("a"), *argv], input=stdin, capture_output=True,
                              text=True, timeout=timeout, env=env)

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return self.on_host_a([sys.executable, "-m", "inferswarm.cli", *args], stdin=stdin)

    def infer_many(self, count: int, *, until_worker: str | None = None) -> list[dict[str, Any]]:
        """`count` inferences through the gateway from host a (or until `until_worker` answers)."""
        result = self.on_host_a([sys.executable, str(Path(__file__).with_name("multihost_client.py")),
                                 "--count", str(count), "--concurrency", "6", "--model", MODEL, "--prompt", PROMPT,
                                 *(["--until-worker", until_worker] if until_worker else [])],
                                stdin=self.api_key, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads(line) for line in result.stdout.splitlines()]

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="isw-mh-"))  # short: PostgreSQL's socket path must fit
    try:
        with Network("a", "b", "c") as network, ExitStack() as cleanup:
            postgres = NetworkPostgres(network, "a", root / "a")
            databases = asyncio.run(postgres.start(["inferswarm_auth", "inferswarm_gateway"]))
            cleanup.callback(postgres.stop)
            cluster = Cluster(network, root, MeshCredential.new_secret().hex(), postgres, databases)
            cleanup.callback(cluster.stop)
            a = network.addresses["a"]
            cluster.start("bootstrap", "a", [sys.executable, "-m", "shared.dht", "--host", a, "--port",
                                             str(DHT_PORT), "--data-dir", str(root / "a" / "bootstrap")], "dht")
            cluster.service("auth", "a", "auth", DATABASE_URL=databases["inferswarm_auth"])
            cluster.service("metrics", "a", "metrics", INFERSWARM_METRICS_HOST=a, INFERSWARM_METRICS_PORT="9100")
            cluster.service("gateway", "b", "gateway", DATABASE_URL=databases["inferswarm_gateway"])
            cluster.worker("worker-1")
            cluster.worker("worker-2")
            cluster.service("web", "a", "web", INFERSWARM_WEB_HOST=a, INFERSWARM_WEB_PORT=str(WEB_PORT))
            cluster.api_key = _user_with_key(cluster)
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _user_with_key(cluster: Cluster) -> str:
    """Register, log in and create a key with the CLI on host a, as a user would."""
    for args in (("register", "hana", "hana@example.com", "--password-stdin"), ("login", "hana", "--password-stdin")):
        result = cluster.cli(*args, stdin=PASSWORD)
        assert result.returncode == 0, result.stderr
    created = cluster.cli("keys", "create", "multihost", "--json")
    assert created.returncode == 0, created.stderr
    return json.loads(created.stdout)["api_key"]


def _host_of(endpoint: str) -> str:
    return endpoint.removeprefix("tcp://").rsplit(":", 1)[0]


def test_every_service_listens_on_its_own_host(cluster):
    address = cluster.address
    assert {name: _host_of(ready["endpoint"]) for name, ready in cluster.ready.items() if "endpoint" in ready} == {
        "auth": address["a"], "metrics": address["a"], "web": address["a"],
        "gateway": address["b"], "worker-1": address["c"], "worker-2": address["c"],
    }
    assert cluster.ready["bootstrap"]["dht"] == cluster.bootstrap
    # The gateway reaches PostgreSQL on host a over the network, with a password.
    assert f"@{address['a']}:" in cluster.databases["inferswarm_gateway"]


def test_a_client_on_host_a_infers_through_the_gateway_on_host_b(cluster):
    answered = cluster.cli("infer", "--model", MODEL, "--json", PROMPT)
    # The CLI saved the key it created; it answers with the echo of the prompt.
    assert answered.returncode == 0, answered.stderr
    final = json.loads(answered.stdout)
    assert final["text"] == PROMPT and final["finish_reason"] == "stop"
    workers = {cluster.ready["worker-1"]["id"], cluster.ready["worker-2"]["id"]}
    assert final["worker"]["id"] in workers

    # Both workers on host c, found through the DHT only, take traffic.
    replies = cluster.infer_many(40)
    assert all(r["ok"] and r["text"] == PROMPT for r in replies), replies
    served = Counter(r["worker"] for r in replies)
    assert set(served) == workers, served

    # auth on host a got the usage the gateway on host b recorded.
    deadline = time.monotonic() + 20
    while True:
        usage = cluster.cli("usage", "--json")
        assert usage.returncode == 0, usage.stderr
        total = sum(day["requests"] for day in json.loads(usage.stdout)["days"])
        if total >= 41 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert total == 41


def test_a_worker_started_later_on_host_c_takes_traffic(cluster):
    ready = cluster.worker("worker-3")
    replies = cluster.infer_many(200, until_worker=ready["id"])
    assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]]
    # The client stops once worker-3 answered; requests in flight then still end after it.
    assert ready["id"] in {r["worker"] for r in replies}, f"worker-3 took none of {len(replies)} requests"


def test_killing_a_worker_leaves_requests_succeeding_on_the_others(cluster):
    killed = cluster.ready["worker-1"]["id"]
    cluster.processes["worker-1"].kill()
    replies = cluster.infer_many(30)
    assert all(r["ok"] and r["text"] == PROMPT for r in replies), [r for r in replies if not r["ok"]]
    assert killed not in {r["worker"] for r in replies}


def test_an_openai_client_on_host_a_reaches_the_workers_through_web_and_the_gateway(cluster):
    script = (
        "import sys, openai\n"
        f"client = openai.OpenAI(base_url='http://{cluster.address['a']}:{WEB_PORT}/v1', api_key=sys.stdin.read())\n"
        f"reply = client.chat.completions.create(model='{MODEL}', messages=[{{'role': 'user', 'content': '{PROMPT}'}}])\n"
        "print(reply.choices[0].message.content)\n"
    )
    result = cluster.on_host_a([sys.executable, "-c", script], stdin=cluster.api_key)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == PROMPT


def test_the_metrics_service_on_host_a_sees_every_host(cluster):
    async def gateway_rows() -> int:
        conn = await asyncpg.connect(cluster.postgres.local_dsn.replace("/postgres?", "/inferswarm_gateway?"))
        try:
            return await conn.fetchval("SELECT count(*) FROM quota_counters")
        finally:
            await conn.close()

    assert asyncio.run(gateway_rows()) > 0  # the gateway's limits live in PostgreSQL on host a
    result = cluster.on_host_a([sys.executable, "-c", (
        "import urllib.request, sys\n"
        f"print(urllib.request.urlopen('http://{cluster.address['a']}:9100/metrics', timeout=10).read().decode())\n"
    )])
    assert result.returncode == 0, result.stderr
    assert 'service="gateway"' in result.stdout and 'service="inference"' in result.stdout


GUESSER = """
import asyncio, json, os, sys
from inferswarm.session import ClientSession
from shared.errors import MeshError
from shared.identity import MeshId

async def main():
    outcomes = []
    for i in range(26):  # a fresh CURVE key every time, as a rotating guesser would
        async with ClientSession(os.environ["INFERSWARM_BOOTSTRAP"].split(","),
                                 MeshId.from_text(os.environ["INFERSWARM_MESH_ID"]), timeout=20) as session:
            try:
                await session("auth").call("auth.login", {"username_or_email": f"nobody{i}",
                                                          "password": "wrong password, long enough"})
                outcomes.append("OK")
            except MeshError as exc:
                outcomes.append(exc.code)
    print(json.dumps(outcomes))

asyncio.run(main())
"""


def test_a_direct_guesser_is_counted_by_its_address_not_its_keys(cluster):
    """Kept last: it leaves host a's address throttled for a while. From another
    host, auth counts a direct caller's failed logins by the address its TCP
    connection shows (20 free across accounts), so new CURVE keys buy nothing."""
    result = cluster.on_host_a([sys.executable, "-c", GUESSER], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])  # after any log lines
    verdicts = outcomes.count("UNAUTHENTICATED")
    assert 20 <= verdicts <= 21 and outcomes[-1] == "RATE_LIMITED", outcomes
    assert set(outcomes) == {"UNAUTHENTICATED", "RATE_LIMITED"}, outcomes
