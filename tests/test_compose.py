"""Static checks of docker/compose.yaml and the Dockerfiles: the stack has to fit together by
construction, because no Docker engine runs where these tests run.

The compose file is read with yaml.safe_load (which resolves the `<<: *anchor` merges the way
Compose does) and `${VAR:-default}` is replaced by its default, as Compose does with an empty
environment. Nothing here needs Docker (there is no `docker compose` plugin where these tests run, so
no test calls it).

The stack must run what the native team setup runs: the MLflow and Prefect server commands are
compared with the ones tests/servers.py starts (read from its source, not imported), the workers'
environment with what `vaeflow deploy` (vaeflow.pipelines.deployments.worker_env) writes into the deployments,
and the deploy command in docker/README.md with the workers' pools and workspace.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import posixpath
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def pins() -> dict[str, str]:
    """{name: "name==version"} from constraints.txt, the exact versions the project installs with (pyproject.toml
    declares ranges)."""
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            found[line.split("==")[0].strip().lower().replace("_", "-")] = line
    return found
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
MLFLOW_DOCKERFILE = DOCKER / "mlflow.Dockerfile"
INIT_SQL = DOCKER / "postgres-init.sql"
README = DOCKER / "README.md"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
SERVERS = ROOT / "tests" / "servers.py"  # how the tests start the real servers (the native team setup)
CONFIGS = ROOT / "configs"

EXPECTED_SERVICES = {"postgres", "minio", "create-bucket", "mlflow", "prefect-server", "worker", "worker-gpu"}
WORKERS = ("worker", "worker-gpu")
SCALABLE = ("worker",)  # `docker compose up --scale worker=N`: no fixed hostname
PREFECT_SERVICES = ("prefect-server", *WORKERS)
UI_PORTS = {"prefect-server": 4200, "mlflow": 5000}  # the only published ports, host side

# Keys of a service that this stack may use (a subset of the Compose specification): a typo such
# as `depend_on` or `healthchek` would otherwise be ignored here and rejected by Compose there.
SERVICE_KEYS = {"build", "image", "command", "entrypoint", "environment", "volumes", "ports", "depends_on",
                "healthcheck", "restart", "profiles", "deploy", "working_dir", "user", "expose", "hostname",
                "shm_size"}
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
BUILD_KEYS = {"context", "dockerfile", "args", "target"}
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose interpolation with an empty environment: ${X:-d} and ${X-d} -> d, $$ -> $."""
    def sub(m: re.Match) -> str:
        assert m.group("op") in ("-", ":-"), f"{m.group(0)}: every variable needs a default"
        return m.group("default")
    parts = value.split("$$")
    return "$".join(_VAR.sub(sub, part) for part in parts)


def _interp_tree(node):
    if isinstance(node, str):
        return interpolate(node)
    if isinstance(node, list):
        return [_interp_tree(v) for v in node]
    if isinstance(node, dict):
        return {k: _interp_tree(v) for k, v in node.items()}
    return node


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose(raw) -> dict:
    return _interp_tree(raw)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env(service: dict) -> dict[str, str]:
    e = service.get("environment") or {}
    if isinstance(e, list):
        e = dict(item.split("=", 1) for item in e)
    return {k: "" if v is None else str(v) for k, v in e.items()}


def argv(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def flag(args: list[str], name: str) -> str:
    """The value of `--name value` or `--name=value` in an argument list."""
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def published(service: dict) -> list[tuple[str, int, int]]:
    """(host_ip, host_port, container_port) of every published port, short or long syntax."""
    out = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            assert "published" in p, f"{p}: a port without `published` gets a random host port"
            out.append((p.get("host_ip", ""), int(p["published"]), int(p["target"])))
            continue
        parts = str(p).split("/")[0].split(":")
        assert len(parts) == 3, f"{p!r}: write HOST_IP:HOST_PORT:CONTAINER_PORT so the bind address is explicit"
        out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def init_databases() -> set[str]:
    return {m.lower() for m in re.findall(r"create\s+database\s+\"?(\w+)\"?", INIT_SQL.read_text(), re.I)}


# --- structure ------------------------------------------------------------------------------
def test_expected_services(services):
    assert EXPECTED_SERVICES <= set(services), f"missing: {EXPECTED_SERVICES - set(services)}"


def test_service_keys_are_known(services):
    for name, svc in services.items():
        assert set(svc) <= SERVICE_KEYS, f"{name}: unknown keys {set(svc) - SERVICE_KEYS}"
        assert set(svc.get("healthcheck", {})) <= HEALTHCHECK_KEYS, name
        if isinstance(svc.get("build"), dict):
            assert set(svc["build"]) <= BUILD_KEYS, name


def test_depends_on_targets_exist_and_conditions_hold(services):
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for target, spec in deps.items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert target != name
            cond = spec.get("condition", "service_started")
            assert cond in DEPENDS_CONDITIONS, f"{name} -> {target}: {cond}"
            if cond == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy: it has no healthcheck"
            # a profiled service cannot be a dependency of an always-on one
            if services[target].get("profiles"):
                assert set(services[target]["profiles"]) <= set(svc.get("profiles", [])), f"{name} -> {target}"


def test_no_dependency_cycles(services):
    def deps(n):
        d = services[n].get("depends_on", {})
        return list(d) if isinstance(d, (list, dict)) else []
    state: dict[str, int] = {}

    def visit(n, path):
        if state.get(n) == 1:
            raise AssertionError(f"cycle: {' -> '.join(path + [n])}")
        if state.get(n) == 2:
            return
        state[n] = 1
        for d in deps(n):
            visit(d, path + [n])
        state[n] = 2
    for n in services:
        visit(n, [])
    assert state == dict.fromkeys(services, 2)  # every service visited and finished, none left on the stack


# --- ports ----------------------------------------------------------------------------------
def test_only_the_two_uis_are_published_and_only_on_loopback(services):
    seen = {}
    for name, svc in services.items():
        for host_ip, host_port, container_port in published(svc):
            assert host_ip == "127.0.0.1", f"{name}: port {host_port} bound to {host_ip or 'all interfaces'}"
            seen[host_port] = (name, container_port)
    assert set(seen) == set(UI_PORTS.values()), f"published host ports: {sorted(seen)}"
    for name, port in UI_PORTS.items():
        assert seen[port][0] == name


def test_published_container_ports_are_where_the_servers_listen(services):
    pf = argv(services["prefect-server"]["command"])
    assert pf[:3] == ["prefect", "server", "start"]
    assert flag(pf, "--host") == "0.0.0.0"  # reachable from the other containers and the port map
    ml = argv(services["mlflow"]["command"])
    assert ml[:2] == ["mlflow", "server"]
    assert flag(ml, "--host") == "0.0.0.0"
    (_, _, pf_port), = published(services["prefect-server"])
    (_, _, ml_port), = published(services["mlflow"])
    assert int(flag(pf, "--port")) == pf_port
    assert int(flag(ml, "--port")) == ml_port


# --- Prefect --------------------------------------------------------------------------------
def test_prefect_server_uses_the_prefect_database(services):
    e = env(services["prefect-server"])
    url = urlparse(e["PREFECT_SERVER_DATABASE_CONNECTION_URL"])
    pg = env(services["postgres"])
    assert url.scheme == "postgresql+asyncpg"  # Prefect needs an async driver
    assert url.hostname == "postgres" and (url.port or 5432) == 5432
    assert url.path.lstrip("/") == "prefect" and "prefect" in init_databases()
    assert url.username == pg["POSTGRES_USER"] and url.password == pg["POSTGRES_PASSWORD"]
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # the browser reaches the API through the published port, not the service name
    ui = urlparse(e["PREFECT_UI_API_URL"])
    assert ui.hostname == "127.0.0.1" and ui.port == UI_PORTS["prefect-server"] and ui.path == "/api"


@pytest.mark.parametrize("worker", WORKERS)
def test_worker_points_at_prefect_and_mlflow_services(services, worker):
    svc = services[worker]
    e = env(svc)
    api = urlparse(e["PREFECT_API_URL"])
    assert api.hostname == "prefect-server" and api.hostname in services
    assert api.port == int(flag(argv(services["prefect-server"]["command"]), "--port")) == 4200
    assert api.path == "/api"
    ml = urlparse(e["MLFLOW_TRACKING_URI"])
    assert ml.scheme == "http" and ml.hostname == "mlflow" and ml.hostname in services
    assert ml.port == int(flag(argv(services["mlflow"]["command"]), "--port"))
    cmd = argv(svc["command"])
    assert cmd[:3] == ["prefect", "worker", "start"]
    assert flag(cmd, "--type") == "process"
    assert flag(cmd, "--pool")
    assert svc["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert svc["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert "build" in svc, f"{worker} runs the vaeflow image, built from docker/Dockerfile"


def test_workers_serve_different_pools(services):
    pools = [flag(argv(services[w]["command"]), "--pool") for w in WORKERS]
    assert len(set(pools)) == len(pools), pools


def test_gpu_worker_requests_nvidia_gpus_and_cpu_hosts_do_without(services):
    gpu = services["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    assert all("count" in d or "device_ids" in d for d in devices)
    assert gpu.get("profiles") == ["gpu"], "the GPU worker only starts with --profile gpu"
    assert gpu["build"]["args"]["VARIANT"] == "cuda"
    cpu = services["worker"]
    assert not cpu.get("profiles") and "deploy" not in cpu
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    assert gpu["image"] != cpu["image"], "the cuda and cpu builds must not overwrite each other's tag"


@pytest.mark.parametrize("name", PREFECT_SERVICES)
def test_prefect_services_have_telemetry_off(services, name):
    e = env(services[name])
    assert e.get("DO_NOT_TRACK") == "true"
    assert e.get("PREFECT_SERVER_ANALYTICS_ENABLED") == "false"
    assert e.get("MLFLOW_DISABLE_TELEMETRY") == "true"


# --- MLflow and the object store ------------------------------------------------------------
def _bucket_service(services) -> tuple[str, str, str]:
    """(alias URL, alias, bucket) from the one-shot service's `mc alias set` / `mc mb` command."""
    script = " ".join(argv(services["create-bucket"].get("command")))
    alias_set = re.search(r"mc alias set (\S+) (\S+)", script)
    mb = re.search(r"mc mb (?:--?[\w-]+ )*([\w.-]+)/([\w.-]+)", script)
    assert alias_set and mb, script
    assert mb.group(1) == alias_set.group(1), "mc mb uses another alias than the one it set"
    return alias_set.group(2), mb.group(1), mb.group(2)


def test_mlflow_backend_store_is_the_mlflow_database(services):
    cmd = argv(services["mlflow"]["command"])
    url = urlparse(flag(cmd, "--backend-store-uri"))
    pg = env(services["postgres"])
    # SQLAlchemy 2.1 reads a plain postgresql:// as psycopg 3, which the MLflow image does not have
    assert url.scheme == "postgresql+psycopg2", url.scheme
    assert url.hostname == "postgres" and (url.port or 5432) == 5432
    assert url.path.lstrip("/") == "mlflow" and "mlflow" in init_databases()
    assert url.username == pg["POSTGRES_USER"] and url.password == pg["POSTGRES_PASSWORD"]
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_mlflow_artifacts_go_to_the_bucket_the_one_shot_service_creates(services):
    cmd = argv(services["mlflow"]["command"])
    # clients upload through the server (--serve-artifacts, MLflow's default); they need no S3 credentials
    assert "--no-serve-artifacts" not in cmd and "--default-artifact-root" not in cmd
    dest = urlparse(flag(cmd, "--artifacts-destination"))
    assert dest.scheme == "s3"
    alias_url, _, bucket = _bucket_service(services)
    assert dest.netloc == bucket
    store = urlparse(alias_url)
    assert store.hostname in services, f"mc talks to {store.hostname}, not a compose service"
    dep = services["mlflow"]["depends_on"]["create-bucket"]
    assert dep["condition"] == "service_completed_successfully"
    assert services["create-bucket"].get("restart", "no") == "no"
    assert store.hostname in services["create-bucket"]["depends_on"]


def test_mlflow_s3_endpoint_and_credentials_match_the_object_store(services):
    e = env(services["mlflow"])
    alias_url, _, _ = _bucket_service(services)
    endpoint, store = urlparse(e["MLFLOW_S3_ENDPOINT_URL"]), urlparse(alias_url)
    assert endpoint.hostname == store.hostname == "minio"
    assert endpoint.port == store.port == 9000
    minio = env(services["minio"])
    assert e["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert e["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    assert len(minio["MINIO_ROOT_PASSWORD"]) >= 8, "MinIO refuses root passwords shorter than 8 characters"
    mc = env(services["create-bucket"])
    assert (mc["MINIO_ROOT_USER"], mc["MINIO_ROOT_PASSWORD"]) == (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"])


def test_mlflow_accepts_the_host_headers_it_will_see(services):
    """MLflow's host check (fnmatch with '*', else equality) must let workers and this machine in."""
    allowed = [h.strip() for h in env(services["mlflow"])["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]
    assert "mlflow" in allowed and "*" not in allowed

    def ok(host):
        return any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)
    port = UI_PORTS["mlflow"]
    for host in ("mlflow", f"mlflow:{port}", f"localhost:{port}", f"127.0.0.1:{port}"):
        assert ok(host), host
    assert not ok("evil.example.com")


def test_mlflow_image_bakes_its_drivers(services):
    build = services["mlflow"]["build"]
    dockerfile = (DOCKER / build["context"] / build.get("dockerfile", "Dockerfile")).resolve()
    assert dockerfile == MLFLOW_DOCKERFILE.resolve()
    text = MLFLOW_DOCKERFILE.read_text()
    install = " ".join(line for line in text.splitlines() if "pip install" in line)
    for pkg in (pins()["mlflow"], "psycopg2-binary", "boto3"):
        assert pkg in install, f"{pkg} is not installed in {MLFLOW_DOCKERFILE.name}"
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    for name, svc in services.items():  # nothing is installed when a container starts
        for part in ("command", "entrypoint"):
            assert "pip install" not in " ".join(argv(svc.get(part))), f"{name}.{part}"


# --- the same servers as the native team setup (tests/servers.py) ----------------------------
def native_server(function: str) -> dict:
    """What tests/servers.py's `function` starts, read from its source: the command's words and flags, which
    URL (a flag's value or an environment variable) gets which driver via with_driver(url, DRIVER), and the
    environment it sets (None: removed)."""
    tree = ast.parse(SERVERS.read_text())
    fn = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function), None)
    assert fn is not None, f"tests/servers.py has no {function}()"

    def driver(node) -> str | None:
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "with_driver":
            return node.args[1].value
        return None

    out = {"words": [], "flags": [], "values": {}, "drivers": {}, "env": {}}
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["args"]:
            items = node.value.elts
            for i, item in enumerate(items):
                if isinstance(item, ast.Constant) and isinstance(item.value, str):
                    out["words"].append(item.value)
                    if item.value.startswith("--"):
                        out["flags"].append(item.value)
                        if i + 1 < len(items):
                            out["values"][item.value] = items[i + 1]
                if (d := driver(item)) and i > 0:
                    out["drivers"][items[i - 1].value] = d
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                    continue
                if d := driver(value):
                    out["drivers"][key.value] = d
                elif isinstance(value, ast.Constant) and (value.value is None or isinstance(value.value, str)):
                    out["env"][key.value] = value.value
    return out


def test_native_servers_are_read():
    """The reader above finds what it needs, so that the comparisons below cannot pass on nothing."""
    ml = native_server("mlflow_server")
    assert {"server", "--backend-store-uri", "--artifacts-destination", "--host", "--port"} <= set(ml["words"]), ml
    assert ml["drivers"].get("--backend-store-uri") == "psycopg2", ml["drivers"]
    assert ml["env"].get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION") == "false", ml["env"]
    pf = native_server("prefect_server")
    assert {"server", "start", "--host", "--port"} <= set(pf["words"]), pf
    assert pf["drivers"].get("PREFECT_SERVER_DATABASE_CONNECTION_URL") == "asyncpg", pf["drivers"]


def test_mlflow_server_runs_the_native_command(services):
    """`mlflow server` with exactly the flags tests/servers.py passes; the backend URL names the native driver;
    few request workers."""
    native = native_server("mlflow_server")
    cmd = argv(services["mlflow"]["command"])
    assert cmd[:2] == ["mlflow", "server"]
    flags = [a.split("=", 1)[0] for a in cmd if a.startswith("--")]
    assert sorted(flags) == sorted(native["flags"]), f"compose: {flags}; tests/servers.py: {native['flags']}"
    assert urlparse(flag(cmd, "--backend-store-uri")).scheme == f"postgresql+{native['drivers']['--backend-store-uri']}"
    workers = int(flag(cmd, "--workers"))
    assert 1 <= workers <= 4, f"--workers {workers}: each is a process with its own database pool"


def test_mlflow_server_environment_is_the_native_one(services):
    native = native_server("mlflow_server")["env"]
    e = env(services["mlflow"])
    for key, value in native.items():
        if value is None:
            assert key not in e, f"tests/servers.py unsets {key} for the server; compose sets it"
        else:
            assert e.get(key) == value, f"{key}: compose {e.get(key)!r}, tests/servers.py {value!r}"


def test_prefect_server_runs_the_native_command(services):
    native = native_server("prefect_server")
    cmd = argv(services["prefect-server"]["command"])
    assert cmd[:3] == ["prefect", "server", "start"]
    assert sorted(a for a in cmd if a.startswith("--")) == sorted(native["flags"])
    e = env(services["prefect-server"])
    for var, driver in native["drivers"].items():
        assert urlparse(e[var]).scheme == f"postgresql+{driver}", (var, e.get(var))
    for key, value in native["env"].items():
        if value is None:  # PREFECT_API_URL, PREFECT_PROFILE: the server is not a client of another server
            assert key not in e, key


# --- workers: the environment `vaeflow deploy` writes, one shared workspace ------------------
def dockerfile_env(path: Path = None) -> dict[str, str]:
    """The ENV instructions of the vaeflow Dockerfile, as a dict."""
    text = (path or DOCKERFILE).read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for word in shlex.split(line[4:]):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {word}: write KEY=VALUE"
                out[key] = value
    return out


def dockerfile_workdir() -> str:
    return re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M)[-1]


def worker_environment(services, worker: str) -> dict[str, str]:
    """What a process in the worker container sees: the image's ENV, then compose's environment."""
    return {**dockerfile_env(), **env(services[worker])}


def workspace_mount(services, worker: str) -> str:
    """VAEFLOW_HOME/<tracking.workspace default>: where the pipeline's workspace is in the worker."""
    from vaeflow.core.config import TrackingConfig

    return posixpath.normpath(posixpath.join(env(services[worker])["VAEFLOW_HOME"],
                                             TrackingConfig.model_fields["workspace"].default))


@pytest.mark.parametrize("worker", WORKERS)
def test_worker_environment_is_what_vaeflow_deploy_writes(services, worker):
    """`vaeflow deploy` run in a worker container puts worker_env(--workspace, that container's environment) into the
    deployments' job variables; each variable must equal the worker's own, so that a deployed run and a
    `docker compose run worker vaeflow run ...` see the same settings."""
    from vaeflow.pipelines.deployments import worker_env

    e = worker_environment(services, worker)
    assert e["VAEFLOW_HOME"] == dockerfile_workdir() == "/app", "the workspace root is the image's code folder"
    ml = urlparse(e["MLFLOW_TRACKING_URI"])
    assert ml.hostname == "mlflow" and ml.hostname in services
    job = worker_env(Path(e["VAEFLOW_HOME"]), environ=e)
    differ = {k: (v, e.get(k)) for k, v in job.items() if e.get(k) != v}
    assert not differ, f"job variable vs {worker}'s environment: {differ}"
    assert "OMP_WAIT_POLICY" not in e and "GOMP_SPINCOUNT" not in e, "vaeflow bounds the spinning itself"


def test_every_worker_mounts_one_workspace_volume_at_vaeflow_home(compose, services):
    """The stage outputs, Prefect's cache records (<workspace>/prefect-results) and the stage locks live in the
    workspace, and cache keys include its path: one named volume, at VAEFLOW_HOME/.vaeflow, in every worker."""
    sources = set()
    for w in WORKERS:
        target = workspace_mount(services, w)
        mounts = {t: s for s, t in _volume_sources(services[w])}
        assert target in mounts, f"{w}: nothing mounted at its workspace {target}"
        assert mounts[target] in (compose.get("volumes") or {}), f"{w}: {target} must be a named volume"
        sources.add(mounts[target])
    assert len(sources) == 1, f"the workers' workspaces are different volumes: {sources}"
    assert len({workspace_mount(services, w) for w in WORKERS}) == 1, "the workspace path is in every cache key"


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_keep_their_workspace_in_the_volume(services, config):
    raw = yaml.safe_load((CONFIGS / config).read_text()) or {}
    ws = (raw.get("tracking") or {}).get("workspace", ".vaeflow")
    home = env(services["worker"])["VAEFLOW_HOME"]
    target = workspace_mount(services, "worker")
    path = posixpath.normpath(posixpath.join(home, ws))
    assert path == target or path.startswith(target + "/"), f"{config}: workspace {path} is outside the volume"


def test_no_results_storage_path_outside_the_workspace(services):
    """Results are shared through the workspace volume; a PREFECT_RESULTS_LOCAL_STORAGE_PATH anywhere else would
    suggest otherwise (and put whatever uses it into a container's private folder)."""
    for name, svc in services.items():
        e = {**(dockerfile_env() if "build" in svc and "mlflow" not in name else {}), **env(svc)}
        for var in ("PREFECT_RESULTS_LOCAL_STORAGE_PATH", "PREFECT_LOCAL_STORAGE_PATH"):
            if var in e:
                assert name in WORKERS, f"{name} sets {var}"
                target = workspace_mount(services, name)
                assert posixpath.normpath(e[var]).startswith(target + "/"), f"{name}: {var}={e[var]}"


def test_worker_hostnames(services):
    """Pipeline runs end the RUNNING MLflow runs of their own hostname whose process is gone. Replicas of a scaled
    service share a fixed hostname and would end each other's live runs: the scalable worker has none; a fixed
    one is unique in the stack."""
    for w in SCALABLE:
        assert "hostname" not in services[w], f"{w} is scaled with --scale; a fixed hostname is shared by replicas"
    assert services["worker-gpu"].get("hostname"), "the GPU worker keeps its hostname when it is recreated"
    names = [svc["hostname"] for svc in services.values() if "hostname" in svc]
    assert len(names) == len(set(names)), names
    assert not set(names) & set(services), "a hostname equal to a service name would shadow that service"


@pytest.mark.parametrize("worker", WORKERS)
def test_workers_take_one_flow_run_at_a_time(services, worker):
    """As the workers of tests/test_deploy.py: --limit 1; parallel runs come from more workers."""
    assert flag(argv(services[worker]["command"]), "--limit") == "1"


def _bytes(size) -> int:
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(size).strip().lower())
    assert m, size
    return int(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2)]


def test_gpu_worker_has_shared_memory_for_nccl(services):
    """train.nproc > 1 runs torchrun with NCCL, which needs more /dev/shm than Docker's 64 MB."""
    assert _bytes(services["worker-gpu"].get("shm_size", "64m")) >= 2**30
    assert "shm_size" not in services["worker"] or _bytes(services["worker"]["shm_size"]) >= 64 * 2**20


# --- images, builds, volumes ----------------------------------------------------------------
def test_images_are_pinned_or_built(services):
    for name, svc in services.items():
        image = svc.get("image")
        assert image or "build" in svc, f"{name}: neither image nor build"
        if not image:
            continue
        ref = image.split("@")[0]
        tag = ref.rsplit("/", 1)[-1].partition(":")[2]
        assert tag or "@sha256:" in image or "build" in svc, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image}"
    assert not services["minio"]["image"].startswith(("minio/", "docker.io/minio/")), "minio/minio left Docker Hub"
    assert services["minio"]["image"].split(":")[1].startswith("RELEASE.")


def test_build_contexts_and_dockerfiles_exist(services):
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            continue
        build = {"context": build} if isinstance(build, str) else build
        context = (DOCKER / build["context"]).resolve()
        assert context.is_dir(), f"{name}: {context}"
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        if build.get("dockerfile", "").endswith("docker/Dockerfile"):
            assert context == ROOT, f"{name}: docker/Dockerfile needs the repository as its context"


def _volume_sources(svc) -> list[tuple[str, str]]:
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            out.append((v.get("source", ""), v["target"]))
        else:
            src, _, rest = v.partition(":")
            out.append((src, rest.split(":")[0]))
    return out


def test_named_volumes_are_declared_and_bind_sources_exist(compose, services):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in services.items():
        for src, target in _volume_sources(svc):
            assert target.startswith("/"), f"{name}: {target}"
            if src.startswith(("/", ".", "~")):
                assert (DOCKER / src).exists() or src.startswith(("/", "~")), f"{name}: bind source {src} missing"
            elif src:
                assert src in declared, f"{name} mounts undeclared volume {src}"
                used.add(src)
    assert declared == used, f"declared but unused: {declared - used}"
    for required in ("postgres-data", "minio-data"):
        assert required in used


def test_workers_share_data_runs_and_workspace(services):
    mounts = [dict((t, s) for s, t in _volume_sources(services[w])) for w in WORKERS]
    for target in ("/data", "/runs", "/app/.vaeflow"):
        assert all(target in m for m in mounts), target
        assert len({m[target] for m in mounts}) == 1, f"{target} differs between workers"
    for w in WORKERS:
        assert env(services[w])["VAEFLOW_DATA_DIR"] == "/data"


def test_postgres_init_and_healthcheck(services):
    pg = services["postgres"]
    assert {"prefect", "mlflow"} <= init_databases()
    targets = {t: s for s, t in _volume_sources(pg)}
    init = [t for t in targets if t.startswith("/docker-entrypoint-initdb.d/")]
    assert init and (DOCKER / targets[init[0]]).resolve() == INIT_SQL.resolve()
    test = " ".join(pg["healthcheck"]["test"])
    assert "pg_isready" in test


def test_credentials_come_from_variables_with_defaults(raw):
    text = COMPOSE_FILE.read_text()
    for var in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"):
        assert re.search(r"\$\{" + var + r":-[^}]+\}", text), var
    interpolate(text)  # every ${VAR} in the file has a default (asserts inside)


def test_shell_snippets_parse():
    """The one-shot script and the postgres healthcheck are valid POSIX sh after interpolation."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    data = _interp_tree(yaml.safe_load(COMPOSE_FILE.read_text()))["services"]
    snippets = [" ".join(argv(data["create-bucket"]["command"])), data["postgres"]["healthcheck"]["test"][1]]
    for script in snippets:
        r = subprocess.run([sh, "-n", "-c", script], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}\n{r.stderr}"


# --- Dockerfile -----------------------------------------------------------------------------
def _dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_dockerfile_variants_pins_and_user():
    text = _dockerfile()
    assert re.search(r"^ARG VARIANT=cpu\s*$", text, re.M)
    deps = {name: pin.split("==")[1] for name, pin in pins().items()}
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(deps['torch'])}\s*$", text, re.M)
    assert re.search(rf"^ARG TORCHVISION_VERSION={re.escape(deps['torchvision'])}\s*$", text, re.M)
    assert "https://download.pytorch.org/whl/cpu" in text
    # the other dependencies: pyproject's ranges, held to constraints.txt's versions as in `make install`
    assert re.search(r"^COPY pyproject\.toml constraints\.txt /app/", text, re.M)
    assert re.search(r"pip install -c constraints\.txt -r /tmp/requirements\.txt", text)
    assert re.search(r"^\s*cpu\)", text, re.M) and re.search(r"^\s*cuda\)", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), users
    for var, value in (("DO_NOT_TRACK", "true"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                       ("PREFECT_SERVER_ANALYTICS_ENABLED", "false")):
        assert re.search(rf"\b{var}={value}\b", text), var
    assert "chown vaeflow:vaeflow /data /runs /app/.vaeflow" in text  # the workspace is writable
    # Prefect's server copies its UI into a writable folder, which must exist and belong to the user
    ui = re.search(r"PREFECT_SERVER_UI_STATIC_DIRECTORY=(\S+)", text)
    assert ui and re.search(rf"chown vaeflow:vaeflow [^\n]*{re.escape(ui.group(1))}", text), "UI folder not writable"
    assert re.search(r"^USER\s+\S+", MLFLOW_DOCKERFILE.read_text(), re.M), "the MLflow server runs as root"


def test_image_runs_vaeflow_from_its_workdir():
    """`vaeflow deploy` registers the folder its code is imported from as the deployments' source: the image
    installs vaeflow editable from WORKDIR /app, so that folder is /app in every container of the image."""
    text = _dockerfile()
    assert dockerfile_workdir() == "/app"
    copy = re.search(r"^COPY \. /app\s*$", text, re.M)
    install = re.search(r"^RUN pip install --no-deps -e \.(?:\s|$)", text, re.M)
    assert copy and install and copy.start() < install.start(), "COPY . /app, then pip install --no-deps -e ."
    # the source and the configs reach the image
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    from vaeflow.pipelines.deployments import PIPELINE_ENTRYPOINT

    # the one pipeline flow's file, the entrypoint every deployment names
    needed = ["pyproject.toml", "README.md", "configs/vae-fashion-mnist.yaml", PIPELINE_ENTRYPOINT.split(":")[0]]
    for path in needed:
        assert (ROOT / path).is_file(), path
        parts = Path(path).parts
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        hit = [p for p in patterns for pre in prefixes
               if fnmatch.fnmatch(pre, p) or fnmatch.fnmatch(pre, p.removeprefix("**/"))]
        assert not hit, f"{path} is excluded from the build context by {hit}"


def test_image_vaeflow_variables_are_the_same_in_both_variants():
    """`vaeflow deploy` copies the deployer's VAEFLOW_* variables into the runs' environment: a deploy from the CPU
    worker to the GPU pool must not carry CPU-only values."""
    for key, value in dockerfile_env().items():
        if key.startswith("VAEFLOW_"):
            assert "$" not in value, f"{key}={value} differs between the image variants"


@pytest.mark.parametrize("variant, expected", [
    ("cpu", "pip install --index-url https://download.pytorch.org/whl/cpu torch=={t} torchvision=={tv}"),
    ("cuda", "pip install torch=={t} torchvision=={tv}"),
    ("rocm", None),
])
def test_dockerfile_variant_step(variant, expected):
    """The torch RUN step, run with pip stubbed out: CPU wheels from the CPU index, CUDA from PyPI."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    text = _dockerfile()
    script = re.search(r"^RUN (set -eu;.*?esac)\s*$", text, re.S | re.M).group(1).replace("\\\n", " ")
    t = re.search(r"^ARG TORCH_VERSION=(\S+)", text, re.M).group(1)
    tv = re.search(r"^ARG TORCHVISION_VERSION=(\S+)", text, re.M).group(1)
    r = subprocess.run([sh, "-c", 'pip() { echo pip "$@"; }; ' + script], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "VARIANT": variant, "TORCH_VERSION": t, "TORCHVISION_VERSION": tv})
    if expected is None:
        assert r.returncode != 0 and "VARIANT" in r.stderr
    else:
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == expected.format(t=t, tv=tv)


def _entrypoint() -> list[str]:
    m = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", _dockerfile(), re.M)
    assert m, "ENTRYPOINT in exec form"
    return json.loads(m.group(1))


@pytest.mark.parametrize("args, expected", [
    ([], "vaeflow"),  # (CMD supplies --help in the image)
    (["--help"], "vaeflow --help"),
    (["train", "configs/x.yaml", "--out", "/runs/x y"], "vaeflow train configs/x.yaml --out /runs/x y"),
    (["prefect", "worker", "start", "--pool", "p"], "prefect worker start --pool p"),
    (["prefect", "flow-run", "execute"], "prefect flow-run execute"),  # Kubernetes/Docker work pools
    (["python", "-c", "print(1)"], "python -c print(1)"),
    (["vaeflow", "serve", "configs/x.yaml"], "vaeflow serve configs/x.yaml"),  # `docker compose run worker vaeflow ...`
    (["@prefect", "version"], "prefect version"),  # an absolute path ('@' = the fake bin folder)
])
def test_entrypoint_dispatch(tmp_path, args, expected):
    """`docker run IMAGE train ...` runs vaeflow; `prefect ...` (compose, work pools) runs prefect."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    entry = _entrypoint()
    assert entry[:2] == ["/bin/sh", "-c"]
    for tool in ("vaeflow", "prefect", "python"):
        fake = tmp_path / tool
        fake.write_text(f'#!/bin/sh\nprintf "%s" "{tool}"; for a in "$@"; do printf " %s" "$a"; done\n')
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    args = [str(tmp_path / a[1:]) if a.startswith("@") else a for a in args]
    r = subprocess.run([sh, *entry[1:], *args], capture_output=True, text=True,
                       env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected


# --- docs -------------------------------------------------------------------------------------
def test_readme_covers_the_stack(services):
    text = README.read_text()
    for needle in ("docker compose -f docker/compose.yaml", "--profile gpu", "http://127.0.0.1:4200",
                   "http://127.0.0.1:5000", "nvidia.com/gpu", "--type kubernetes", "vaeflow_pipeline",
                   "--scale worker=", "train.nproc", "vaeflow.host", "KILLED"):
        assert needle in text, needle
    for w in WORKERS:
        assert flag(argv(services[w]["command"]), "--pool") in text


def _readme_commands(word: str) -> list[list[str]]:
    """The `docker compose ...` commands in docker/README.md's bash blocks that contain `word`, as argv."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("docker compose") and word in line:
                out.append(shlex.split(line))
    return out


def _compose_run(args: list[str]) -> tuple[str, list[str]]:
    """(service, command) of `docker compose -f docker/compose.yaml [--profile P] run [OPTIONS] SERVICE CMD...`."""
    assert args[:4] == ["docker", "compose", "-f", "docker/compose.yaml"], args
    i = args.index("run")
    assert all(a in ("--profile", "gpu") for a in args[4:i]), args
    i += 1
    while args[i].startswith("-"):
        i += 2 if args[i] in ("-e", "--env", "-v", "--volume", "-u", "--user", "-w", "--workdir", "--name",
                              "-l", "--label", "--entrypoint") else 1
    return args[i], args[i + 1:]


def test_readme_deploy_commands_fit_the_workers(services):
    """Each documented `vaeflow deploy` runs in a one-off container of a worker service without a fixed hostname,
    names a pool that a worker listens on, a config shipped in the image, and the workers' VAEFLOW_HOME as
    --workspace; the documented `prefect deployment run`s name deployments those commands create."""
    from vaeflow.core.config import load_config
    from vaeflow.pipelines.deployments import deployable_stages, deployment_specs
    from vaeflow.pipelines.pipeline import FLOW_NAME

    deploys = _readme_commands("vaeflow deploy")
    assert deploys, "docker/README.md documents no `docker compose ... vaeflow deploy`"
    pools = {flag(argv(services[w]["command"]), "--pool") for w in WORKERS}
    homes = {env(services[w])["VAEFLOW_HOME"] for w in WORKERS}
    created, used_pools = set(), set()
    for args in deploys:
        service, cmd = _compose_run(args)
        assert service in WORKERS, f"{service}: deploy in a container of the workers' image"
        assert "hostname" not in services[service], f"one-off `run {service}` containers share its fixed hostname"
        assert cmd[:2] == ["vaeflow", "deploy"], cmd
        config = cmd[2]
        assert not config.startswith("/") and (ROOT / config).is_file(), f"{config}: a config of the image's /app"
        assert flag(cmd, "--pool") in pools, f"no worker listens on pool {flag(cmd, '--pool')}"
        used_pools.add(flag(cmd, "--pool"))
        assert {flag(cmd, "--workspace")} == homes, f"--workspace {flag(cmd, '--workspace')}, workers: {homes}"
        try:
            name = flag(cmd, "--name")
        except AssertionError:
            name = yaml.safe_load((ROOT / config).read_text())["tracking"]["model_name"]
        overrides = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
        cfg = load_config(ROOT / config, overrides)
        # what `vaeflow deploy` registers: FLOW/NAME (the whole pipeline) and FLOW/NAME-STAGE for the stages but the last
        specs = deployment_specs(ROOT / config, overrides, cfg, [], "--pin" in cmd, name)
        assert [s["name"] for s in specs] == [name] + [f"{name}-{stage}" for stage in deployable_stages(cfg)[:-1]]
        created |= {f"{s['flow_name']}/{s['name']}" for s in specs}
        assert f"{FLOW_NAME}/{name}" in created
    assert used_pools == pools, f"pools without a documented deploy: {pools - used_pools}"
    runs = [a for a in _readme_commands("prefect deployment run")]
    assert runs
    for args in runs:
        target = args[args.index("run", args.index("deployment")) + 1]
        assert target in created, f"{target} is not created by a documented deploy ({sorted(created)})"
        assert target.startswith(f"{FLOW_NAME}/")  # every deployment is one of the one pipeline flow
