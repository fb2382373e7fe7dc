"""Static checks of docker/compose.yaml and the Dockerfiles: the stack has to fit together by
construction, because no Docker engine runs where these tests run.

The compose file is read with yaml.safe_load (which resolves the `<<: *anchor` merges the way
Compose does) and `${VAR:-default}` is replaced by its default, as Compose does with an empty
environment. Nothing here needs Docker; `docker compose config` runs only where it works.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
MLFLOW_DOCKERFILE = DOCKER / "mlflow.Dockerfile"
INIT_SQL = DOCKER / "postgres-init.sql"
README = DOCKER / "README.md"

EXPECTED_SERVICES = {"postgres", "minio", "create-bucket", "mlflow", "prefect-server", "worker", "worker-gpu"}
WORKERS = ("worker", "worker-gpu")
PREFECT_SERVICES = ("prefect-server", *WORKERS)
UI_PORTS = {"prefect-server": 4200, "mlflow": 5000}  # the only published ports, host side

# Keys of a service that this stack may use (a subset of the Compose specification): a typo such
# as `depend_on` or `healthchek` would otherwise be ignored here and rejected by Compose there.
SERVICE_KEYS = {"build", "image", "command", "entrypoint", "environment", "volumes", "ports", "depends_on",
                "healthcheck", "restart", "profiles", "deploy", "working_dir", "user", "expose"}
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
    assert url.scheme in ("postgresql", "postgresql+psycopg2")
    assert url.hostname == "postgres" and (url.port or 5432) == 5432
    assert url.path.lstrip("/") == "mlflow" and "mlflow" in init_databases()
    assert url.username == pg["POSTGRES_USER"] and url.password == pg["POSTGRES_PASSWORD"]
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_mlflow_artifacts_go_to_the_bucket_the_one_shot_service_creates(services):
    cmd = argv(services["mlflow"]["command"])
    assert "--serve-artifacts" in cmd, "clients upload through the server; they need no S3 credentials"
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
    pins = {d.split("==")[0]: d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    install = " ".join(line for line in text.splitlines() if "pip install" in line)
    for pkg in (pins["mlflow"], "psycopg2-binary", "boto3"):
        assert pkg in install, f"{pkg} is not installed in {MLFLOW_DOCKERFILE.name}"
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    for name, svc in services.items():  # nothing is installed when a container starts
        for part in ("command", "entrypoint"):
            assert "pip install" not in " ".join(argv(svc.get(part))), f"{name}.{part}"


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
    deps = {d.split("==")[0]: d.split("==")[1] for d in
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"] if "==" in d}
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(deps['torch'])}\s*$", text, re.M)
    assert re.search(rf"^ARG TORCHVISION_VERSION={re.escape(deps['torchvision'])}\s*$", text, re.M)
    assert "https://download.pytorch.org/whl/cpu" in text
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


# --- docs and the real Compose, where available -----------------------------------------------
def test_readme_covers_the_stack(services):
    text = README.read_text()
    for needle in ("docker compose -f docker/compose.yaml", "--profile gpu", "http://127.0.0.1:4200",
                   "http://127.0.0.1:5000", "nvidia.com/gpu", "--type kubernetes", "vae_pipeline"):
        assert needle in text, needle
    for w in WORKERS:
        assert flag(argv(services[w]["command"]), "--pool") in text


def test_docker_compose_config_when_available():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client")
    try:
        if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=10).returncode != 0:
            pytest.skip("no `docker compose` plugin")
        r = subprocess.run([docker, "compose", "-f", str(COMPOSE_FILE), "--profile", "gpu", "config", "--quiet"],
                           capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("docker compose did not answer")
    assert r.returncode == 0, r.stderr
