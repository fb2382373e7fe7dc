"""Prefect deployments of the pipeline: served by one process (`vaeflow serve`) or deployed to a work pool
(`vaeflow deploy`) whose runs any number of `prefect worker start --pool NAME` processes execute.

Both register the same deployments of the one pipeline flow (pipelines/pipeline.py), named from its stage graph:
NAME runs every stage, NAME-STAGE runs a stage and what it needs (`until`); and give them parameters that mean
what they say:
- by default `config` is None, so each run reads the YAML at `config_path` when it starts (a scheduled run picks up
  edits to the file), with the `--set` overrides as the `overrides` default;
- with `pin`, the resolved config (overrides applied) is pinned as the default of `config`: a snapshot, and the
  Prefect UI's custom-run form shows it ready to edit.
The description and a tag (`config:runtime` / `config:pinned`) say which.

The parameter form is built from the discovered config model (vaeflow.core.config.config_model), not from the flow's
static signature: each plugin section is a union selected by `name` whose branches carry that plugin's own
options, and sections that do not apply to the deployment's model kind are left out (form_schema).
"""

from __future__ import annotations

import inspect
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

from vaeflow.core.config import Config, ScheduleConfig
from vaeflow.core.cpu import exported_waiting
from vaeflow.core.interfaces import TAGS
from vaeflow.core.errors import VaeflowError, masked_url

PROJECT_DIR = Path(__file__).resolve().parents[1]  # the folder holding pipelines/ and core/: the deployments' source
PIPELINE_ENTRYPOINT = "pipelines/pipeline.py:pipeline"
TELEMETRY_OFF = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

# the form's section headings (the JSON schema titles the Prefect UI shows), by path in the config
SECTION_TITLES = {
    "data": "Data", "train": "Training", "eval": "Evaluation",
    "tracking": "Tracking", "prior": "Code priors (VQ)", "prior.sample": "Prior sampling", "render": "Rendering",
    "quality": "Sample quality",
}
CODE_GRIDS_ONLY = ("prior",)  # sections only models with code grids read: left out of the others' form and value
NOT_IN_FORM = ("schedules",)  # deployment schedules, not run settings: a run ignores them
PARAMETER_DESCRIPTIONS = {
    "config_path": "YAML config file, read at run time unless `config` is set (then it only names the run)",
    "overrides": "overrides applied on top of the config, as with `vaeflow run --set`, e.g. train.epochs=3",
    "until": "run only this stage and the stages it needs (empty: every stage)",
    "force": "stages to run again whatever the cache holds, with every stage that depends on them (all: every stage)",
}
CONFIG_DESCRIPTION = {
    False: "The whole run config. Left empty (None), the run reads `config_path` when it starts; set it to run "
           "with these values instead of the file.",
    True: "The whole run config, pinned when the deployment was made (a snapshot of `config_path` with its "
          "overrides): runs use these values, not the file. Set it to None to read `config_path` at run time.",
}


# --- schedules -------------------------------------------------------------------------------
def to_prefect_schedules(schedules: list[ScheduleConfig]) -> list:
    """Config schedules as Prefect schedule objects."""
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    out = []
    for s in schedules:
        if s.cron is not None:
            out.append(CronSchedule(cron=s.cron, timezone=s.timezone))
        else:
            out.append(IntervalSchedule(interval=timedelta(seconds=s.interval_seconds)))
    return out


def describe_schedule(s: ScheduleConfig) -> str:
    return f"cron {s.cron!r}" + (f" ({s.timezone})" if s.timezone else "") if s.cron else f"every {s.interval_seconds} s"


# --- the parameter form ----------------------------------------------------------------------
def has_code_grids(cfg: Config) -> bool:
    """Whether the config's model kind has discrete code grids (and so code priors)."""
    return cfg.model.capabilities.discrete


def _drop(data: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data.get(key) or {}
    data.pop(last, None)


def form_value(cfg: Config) -> dict:
    """The config as the value of the `config` parameter: JSON, less the fields the form leaves out for its kind
    (they take their defaults when the run validates the config)."""
    data = cfg.model_dump(mode="json")
    for dotted in (() if has_code_grids(cfg) else CODE_GRIDS_ONLY) + NOT_IN_FORM:
        _drop(data, dotted)
    return data


def _first_paragraph(doc: str | None) -> str | None:
    return inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ") if doc else None


def _ref_name(node: dict) -> str | None:
    ref = node.get("$ref", "")
    return ref.rsplit("/", 1)[-1] if ref.startswith("#/definitions/") else None


def _union_refs(node: dict) -> list[dict]:
    """The `$ref` branches of a (possibly optional, possibly list-of) union property, in place."""
    if "items" in node:
        node = node["items"]
    if "anyOf" in node:  # Optional[...]: the non-null member
        node = next(m for m in node["anyOf"] if m.get("type") != "null")
    if "oneOf" in node:
        return node["oneOf"]
    return [node] if "$ref" in node else []


def _order_first(node: dict, tag: str, value: Any, defs: dict) -> None:
    """Put the union branch whose `tag` const equals value first. Prefect's UI picks a union's tab by the overlap of
    the value's keys with each branch's fields, the first on a tie; the configured branch first wins ties."""
    target = node.get("items", node)
    if "anyOf" in target:
        target = next(m for m in target["anyOf"] if m.get("type") != "null")
    if "oneOf" not in target:
        return
    target["oneOf"].sort(key=lambda ref: defs[_ref_name(ref)]["properties"].get(tag, {}).get("const") != value)


def _gc_definitions(schema: dict) -> None:
    """Drop definitions that nothing references any more."""
    while True:
        text = json.dumps({k: v for k, v in schema.items() if k != "definitions"}) + json.dumps(
            list(schema["definitions"].values()))
        unused = [name for name in schema["definitions"] if f'"#/definitions/{name}"' not in text]
        if not unused:
            return
        for name in unused:
            del schema["definitions"][name]


def form_schema(flow_fn, cfg: Config, pinned: bool, registry=None) -> dict:
    """The deployment's parameter schema (Prefect's `parameter_openapi_schema`), from the flow's signature with its
    `config` parameter typed by the discovered config model (vaeflow.core.config.config_model):

    - `model` is a union selected by `kind`: a tab per registered model kind with the same kind of latents as the
      config's (continuous or code grids), each with that kind's options and slots;
    - every plugin section (data.dataset, the model's slots, the code levels' priors, render.renderers) is a union
      selected by `name`, one branch per registered plugin, titled by the plugin's name and described by its
      docstring, with that plugin's options as fields (descriptions and defaults);
    - sections get human titles, and the parameters descriptions that say how the config is chosen;
    - the code priors are left out of a form for a model without code grids, and so are the deployment schedules.

    Prefect's server validates every flow run's parameters against it (jsonschema), so form_value(cfg) must pass."""
    from prefect.utilities.callables import generate_parameter_schema, parameter_docstrings

    from vaeflow.core.config import config_model
    from vaeflow.core.registry import get_registry

    registry = registry or get_registry()
    signature = inspect.signature(flow_fn, eval_str=True)
    params = [p.replace(annotation=Optional[config_model(registry)]) if p.name == "config" else p
              for p in signature.parameters.values()]
    schema = generate_parameter_schema(signature.replace(parameters=params),
                                       parameter_docstrings(inspect.getdoc(flow_fn))).model_dump()
    defs, props = schema["definitions"], schema["properties"]
    for name, text in PARAMETER_DESCRIPTIONS.items():
        if name in props:
            props[name]["description"] = text
    names = deployable_stages(cfg)
    for param, choices in (("until", names), ("force", [*names, "all"])):
        for branch in props.get(param, {}).get("anyOf", []):  # Optional[str] / Optional[list[str]]
            if branch.get("type") == "string":
                branch["enum"] = choices
            elif branch.get("type") == "array":
                branch["items"] = {"type": "string", "enum": choices}
    props["config"]["description"] = CONFIG_DESCRIPTION[pinned]
    root_name = _ref_name(next(m for m in props["config"]["anyOf"] if "$ref" in m))
    root = defs[root_name]
    root.update(title="Run config", description=_first_paragraph(Config.__doc__))

    def section(path: str) -> tuple[dict, dict]:
        """(the property node at a dotted path under the config, the definition it refers to)."""
        node_def, node = root, None
        for key in path.split("."):
            node = node_def["properties"][key]
            node_def = defs.get(_ref_name(node) or "", {})
        return node, node_def

    # sections that do not apply, and run-irrelevant ones, leave the form
    for dotted in (() if has_code_grids(cfg) else CODE_GRIDS_ONLY) + NOT_IN_FORM:
        root["properties"].pop(dotted, None)
        if dotted in root.get("required", []):
            root["required"].remove(dotted)

    # section titles and descriptions (the typed sections built after discovery carry no docstring)
    for path, title in SECTION_TITLES.items():
        try:
            _, node_def = section(path)
        except KeyError:  # left out for this kind
            continue
        parent, _, key = path.rpartition(".")
        owner = Config if not parent else Config.model_fields[parent].annotation
        field = owner.model_fields[key]
        node_def["title"] = title
        description = _first_paragraph(getattr(field.annotation, "__doc__", None)) or field.description
        if description:
            node_def["description"] = description

    def title_union(node: dict, family: str, current: Any) -> None:
        """One tab per registered plugin of the family, titled by its name, the configured one first."""
        key = TAGS.get(family, "name")  # `schedule` for train.beta
        for ref in _union_refs(node):
            branch = defs[_ref_name(ref)]
            name = branch["properties"][key].get("const")
            if name is None:  # a family with no plugin at all: a bare name box
                branch.update(title=f"{family} (none registered)", description=f"no {family} plugin is installed; "
                                                                               "`vaeflow plugins` lists them")
                continue
            entry = registry.get(family, name)
            branch["title"] = name
            branch["description"] = _first_paragraph(entry.cls.__doc__) or f"the {name} {family}"
            branch["properties"][key].update(title=key.capitalize(), default=name, description=f"the {family} "
                                             f"plugin, from {entry.package} (switch plugins with the tabs above)")
        if isinstance(current, dict):
            _order_first(node, key, current.get(key), defs)
        pick = f"pick the {family} plugin (a tab each), then its options"
        node["description"] = f"{node['description']}; {pick}" if node.get("description") else pick.capitalize()

    values = cfg.model_dump(mode="json")
    # the model: a tab per kind with the same kind of latents (the pipeline differs between them), this one first
    model_node = root["properties"]["model"]
    kinds = model_node.get("oneOf") if "oneOf" in model_node else None
    members = kinds if kinds is not None else [model_node]
    keep = []
    for ref in members:
        member = defs[_ref_name(ref)]
        kind = member["properties"]["kind"].get("const") or member["properties"]["kind"].get("default")
        cls = registry.get("model", kind).cls
        if cls.capabilities.latents != cfg.model.capabilities.latents:
            continue
        keep.append(ref)
        member.update(title=kind, description=_first_paragraph(cls.__doc__) or f"the {kind} model")
        member["properties"]["kind"].update(title="Kind", default=kind, description=f"the model kind, from "
                                            f"{registry.get('model', kind).package} (switch kinds with the tabs above)")
        current = values["model"] if values["model"]["kind"] == kind else {}
        for fname, slot in cls.slots.items():
            if fname in member["properties"]:
                node = member["properties"][fname]
                node.setdefault("title", fname.replace("_", " ").capitalize())
                title_union(node, slot.family, current.get(fname))
        for fname, prop in member["properties"].items():  # nested option sections (e.g. vq): titled by field
            nested = defs.get(_ref_name(prop) or "")
            if nested is not None and fname not in cls.slots:
                field = cls.Options.model_fields.get(fname)
                nested["title"] = (field.title if field is not None and field.title else
                                   fname.replace("_", " ").capitalize())
                if prop.get("description"):
                    nested["description"] = prop["description"]
    if kinds is not None:
        kinds[:] = keep
        _order_first(model_node, "kind", cfg.model.kind, defs)
    model_node.update(title="Model", description=_first_paragraph(Config.model_fields["model"].description)
                      or "the model kind (a tab each), then its options and components")

    # the other plugin unions: data.dataset, prior levels, render.renderers
    from vaeflow.core.config import STATIC_COMPONENT_FIELDS, code_levels

    others = {**STATIC_COMPONENT_FIELDS, **{("prior", level): "prior" for level in code_levels(registry)}}
    for (sec, fname), family in others.items():
        try:
            node = section(sec)[1]["properties"][fname]
        except KeyError:
            continue
        node.setdefault("title", fname.replace("_", " ").capitalize())
        title_union(node, family, (values.get(sec) or {}).get(fname))

    _gc_definitions(schema)
    return schema


def check_form(schema: dict, parameters: dict) -> None:
    """Validate parameters as Prefect's server does, before anything is registered."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    try:
        validate(parameters, schema, raise_on_error=True)
    except ValidationError as exc:  # a bug here, not a user error: the form would refuse its own defaults
        raise RuntimeError(f"the deployment's parameter form rejects its own parameters: {exc}") from None


# --- the deployments ---------------------------------------------------------------------------
def deployable_stages(cfg: Config) -> list[str]:
    """The stages a deployment can stop at, from the config's stage graph: every stage, an expanded one (e.g.
    train_prior, one per code level) by its name."""
    from vaeflow.pipelines.pipeline import stage_graph

    graph = stage_graph(cfg)
    return list(dict.fromkeys(s.name for s in graph.stages))


def deployment_specs(config_path: Path, overrides: list[str], cfg: Config, schedules: list[ScheduleConfig],
                     pin: bool = False, name: str = "vaeflow") -> list[dict]:
    """What each deployment registers: the pipeline flow, its entrypoint, the deployment name (NAME for the whole
    pipeline, NAME-STAGE for a stage and what it needs), parameters, schema, description, tags, schedules."""
    from vaeflow.pipelines.pipeline import FLOW_NAME, pipeline

    config_path = Path(config_path).resolve()
    mode = "pinned" if pin else "runtime"
    how = (f"Config pinned at deploy time: a snapshot of {config_path} with overrides {overrides or '(none)'}; "
           "edits to the file do not apply (set `config` to None in a custom run to read the file)."
           if pin else
           f"Config read from {config_path} when each run starts, so edits to the file apply to later runs"
           + (f", with overrides {overrides}" if overrides else "") + "; set `config` in a custom run to override it.")
    params = ({"config_path": str(config_path), "overrides": [], "config": form_value(cfg)} if pin else
              {"config_path": str(config_path), "overrides": list(overrides), "config": None})
    schema = form_schema(pipeline.fn, cfg, pin)
    check_form(schema, params)
    stages = deployable_stages(cfg)
    specs = []
    for until in (None, *stages[:-1]):  # the last stage's deployment is the whole pipeline
        what = "vaeflow pipeline" if until is None else f"vaeflow pipeline up to {until} (and the stages it needs)"
        specs.append(dict(flow_name=FLOW_NAME, name=name if until is None else f"{name}-{until}",
                          entrypoint=PIPELINE_ENTRYPOINT, flow=pipeline,
                          parameters=params if until is None else {**params, "until": until}, schema=schema,
                          description=f"{what} for {config_path.name} (kind {cfg.model.kind}). {how}",
                          tags=["vaeflow", f"config:{mode}", f"kind:{cfg.model.kind}"] + ([f"stage:{until}"] if until else []),
                          schedules=to_prefect_schedules(schedules) if until is None else []))
    return specs


def _with_form(deployment, spec: dict):
    """Replace the schema Prefect derived from the flow's static signature by the plugin-aware form.

    RunnerDeployment keeps it in the private attribute `_parameter_openapi_schema` (a ParameterSchema), which
    `apply()` sends as the deployment's `parameter_openapi_schema`."""
    from prefect.utilities.callables import ParameterSchema

    deployment._parameter_openapi_schema = ParameterSchema(**spec["schema"])
    return deployment


def build_deployments(config_path: Path, overrides: list[str], schedules: list[ScheduleConfig], name: str,
                      pin: bool = False, cfg: Config | None = None) -> list:
    """RunnerDeployments for `prefect.serve` (the flows run in the serving process)."""
    from vaeflow.core.config import load_config

    cfg = cfg or load_config(config_path, overrides)
    return [_with_form(spec["flow"].to_deployment(name=spec["name"], parameters=spec["parameters"],
                                                  schedules=spec["schedules"], description=spec["description"],
                                                  tags=spec["tags"]), spec)
            for spec in deployment_specs(config_path, overrides, cfg, schedules, pin, name)]


def serve_deployments(config_path: Path, overrides: list[str], schedules: list[ScheduleConfig], name: str,
                      pin: bool = False) -> None:
    """Register the deployments with the Prefect server and run their flow runs until interrupted."""
    from prefect import serve

    serve(*build_deployments(config_path, overrides, schedules, name, pin))


# --- work pools --------------------------------------------------------------------------------
def worker_env(workspace: Path, extra: dict[str, str] | None = None, environ: dict[str, str] | None = None) -> dict:
    """The environment each flow run gets from the deployment's job variables, so that workers write into the
    deployer's workspace and MLflow store: VAEFLOW_HOME, MLFLOW_TRACKING_URI (the workspace's sqlite store unless
    the deployer points at a server), the deployer's VAEFLOW_* settings (plugins, data dir, config overrides),
    telemetry off, and the deployer's OMP_WAIT_POLICY or GOMP_SPINCOUNT if set. Flow runs that share a machine's
    cores take their share of the threads, and `import vaeflow` bounds OpenMP's spinning (core.cpu), so PASSIVE
    (0.41-0.90x one run's speed, bench/contention.json) is not the default."""
    environ = os.environ if environ is None else environ
    workspace = Path(workspace).resolve()
    env = {k: v for k, v in sorted(environ.items()) if k.startswith("VAEFLOW_")}
    env["VAEFLOW_HOME"] = str(workspace)
    uri = environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative to the deployer's folder
        uri = f"sqlite:///{(Path.cwd() / uri.removeprefix('sqlite:///')).resolve()}"
    env["MLFLOW_TRACKING_URI"] = uri
    if environ.get("MLFLOW_REGISTRY_URI"):
        env["MLFLOW_REGISTRY_URI"] = environ["MLFLOW_REGISTRY_URI"]
    env.update(exported_waiting(environ))  # not vaeflow's own default: each flow run's `import vaeflow` sets that
    env.update(TELEMETRY_OFF)
    env.update(extra or {})
    return env


def ensure_process_pool(pool: str) -> str:
    """Create the work pool (type process) if it is missing; refuse a pool of another type. Returns a message."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(
                    name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template(),
                    description="vaeflow pipeline runs, executed by `prefect worker start --pool " + pool + "`"))
            except ObjectAlreadyExists:  # created meanwhile by another deployer
                return f"work pool {pool!r} exists (type process)"
            return f"created work pool {pool!r} (type process)"
    if existing.type != "process":
        raise VaeflowError(f"work pool {pool!r} is of type {existing.type!r}; `vaeflow deploy` targets process pools, "
                           f"whose workers run the flows in local processes: choose another --pool name")
    return f"work pool {pool!r} exists (type process)"


def deploy_to_pool(config_path: Path, overrides: list[str], cfg: Config, schedules: list[ScheduleConfig], name: str,
                   pool: str, env: dict[str, str], pin: bool = False) -> list[dict]:
    """Register the deployments on a process work pool, with the flows loaded from PROJECT_DIR by
    `flow.from_source` (the workers run that code), and return what was deployed."""
    from prefect import flow
    from prefect.deployments.runner import DeploymentApplyError

    deployments = []
    remote = flow.from_source(source=str(PROJECT_DIR), entrypoint=PIPELINE_ENTRYPOINT)
    for spec in deployment_specs(config_path, overrides, cfg, schedules, pin, name):
        deployments.append((spec, _with_form(remote.to_deployment(
            name=spec["name"], parameters=spec["parameters"], schedules=spec["schedules"], description=spec["description"],
            tags=spec["tags"], work_pool_name=pool, job_variables={"env": env}), spec)))
    # Flow.deploy(...) is to_deployment(...) then prefect.deploy(...), which applies each deployment to the pool
    # (no image to build or push for a process pool). The form schema must go in between, so apply them here; unlike
    # prefect.deploy, a failure of any one is an error, not a line in a table.
    done = []
    for spec, deployment in deployments:
        try:
            deployment_id = deployment.apply(work_pool_name=pool)
        except DeploymentApplyError as exc:
            raise VaeflowError(f"the Prefect server refused deployment {spec['flow_name']}/{spec['name']}: {exc}") from None
        done.append({"name": f"{spec['flow_name']}/{spec['name']}", "id": str(deployment_id), "entrypoint": spec["entrypoint"],
                     "tags": spec["tags"], "schedules": len(spec["schedules"])})
    return done


# --- command-line helpers (vaeflow serve / vaeflow deploy) ---------------------------------------
def require_api(command: str) -> str:
    """PREFECT_API_URL, or a user error saying how to get a server; a user error too when no server answers there
    (check_prefect_api), before anything is registered."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise VaeflowError(f"vaeflow {command} needs a Prefect server: run `make server` (or `prefect server start`) "
                           "and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    check_prefect_api(command)
    return url


PREFECT_PROBE_TIMEOUT = 5.0  # seconds: a Prefect server answers /health at once


def check_prefect_api(command: str = "run", timeout: float = PREFECT_PROBE_TIMEOUT) -> None:
    """When PREFECT_API_URL is set (environment or Prefect profile): raise a VaeflowError unless a Prefect server
    answers its health check there within `timeout` seconds, without Prefect's retries. Without it, nothing: `vaeflow
    run` then starts a temporary local server. Call it before any work starts (no MLflow run, no store is made)."""
    from pydantic import ValidationError

    try:
        from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

        url = PREFECT_API_URL.value()
    except ValidationError as exc:  # Prefect refuses its own settings, PREFECT_API_URL's value among them
        raise VaeflowError(f"Prefect's settings are invalid: {_settings_problem(exc)}; fix the variable (or "
                           f"`prefect config view` for the profile's), e.g. PREFECT_API_URL=http://127.0.0.1:4200/api"
                           ) from None
    if not url:
        return
    import httpx
    from prefect.client.orchestration import get_client

    with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}):
        try:
            with get_client(sync_client=True, httpx_settings={"timeout": timeout}) as client:
                error = client.api_healthcheck()
        except Exception as exc:  # an address the client can not even use
            error = exc
    if error is None:
        return
    shown = masked_url(str(url))
    where = f"PREFECT_API_URL={shown}" + ("" if os.environ.get("PREFECT_API_URL") else
                                          " (from the active Prefect profile; see `prefect config view`)")
    example = "http://127.0.0.1:4200/api"
    if isinstance(error, httpx.HTTPStatusError):
        status = error.response.status_code
        if status in (401, 403):
            raise VaeflowError(f"{where}: the Prefect server refused the request (HTTP {status}); check PREFECT_API_KEY "
                               f"(Prefect Cloud) or PREFECT_API_AUTH_STRING (a server with basic auth)")
        raise VaeflowError(f"{where}: a server answered HTTP {status} at {shown.rstrip('/')}/health, so this is not a "
                           f"Prefect API address; a Prefect server's API URL ends in /api, e.g. {example}")
    if isinstance(error, (httpx.UnsupportedProtocol, httpx.InvalidURL)) or not str(url).startswith(("http://", "https://")):
        raise VaeflowError(f"{where} is not an http(s) address of a Prefect API; e.g. PREFECT_API_URL={example}")
    reason = (f"no answer within {timeout:g} s" if isinstance(error, httpx.TimeoutException) else
              "connection refused" if "refused" in str(error).lower() or "All connection attempts failed" in str(error)
              else (str(error).splitlines() or [type(error).__name__])[0][:200])
    todo = (f"start one with `prefect server start` (then PREFECT_API_URL={example}), fix PREFECT_API_URL, or unset it "
            f"to let `vaeflow run` start a temporary local server" if command == "run" else
            f"start one with `make server` or `prefect server start` (then PREFECT_API_URL={example}), or fix "
            f"PREFECT_API_URL; `vaeflow {command}` needs a server that keeps running")
    raise VaeflowError(f"{where}: no Prefect server answers there ({reason}); {todo}")


def _settings_problem(exc) -> str:
    """The first problem of a pydantic ValidationError of Prefect's settings, naming the variable and its value."""
    first = (exc.errors() or [{}])[0]
    msg = str(first.get("msg", exc)).removeprefix("Value error, ")
    loc = "_".join(str(p) for p in first.get("loc", ())).upper()
    var = f"PREFECT_{loc}" if loc else ("PREFECT_API_URL" if os.environ.get("PREFECT_API_URL") else "")
    value = os.environ.get(var) if var else None
    return f"{var}={masked_url(value)}: {msg}" if value is not None else f"{var or 'a setting'}: {msg}"


CRON_EXAMPLES = "e.g. '0 3 * * *' (03:00 daily) or '*/15 * * * *' (every 15 minutes)"
MAX_INTERVAL = 366 * 24 * 3600  # ScheduleConfig.interval_seconds' bound


def cron_problem(cron: str, timezone: str | None = None) -> str | None:
    """Why Prefect would refuse this cron schedule (validated as Prefect validates it: its CronSchedule), or None."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        return "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
    return None


def schedules_from(cfg: Config, cron: list[str], interval: list[int]) -> list[ScheduleConfig]:
    """The config's `schedules:` plus --cron / --interval, each checked as Prefect will check it: a user error names
    the option (or the config entry), the value and an example."""
    for i, s in enumerate(cfg.schedules):
        if s.cron is not None and (why := cron_problem(s.cron, s.timezone)):
            raise VaeflowError(f"schedules[{i}] in the config (cron {s.cron!r}"
                               + (f", timezone {s.timezone!r}" if s.timezone else "") + f"): {why}; a cron expression "
                               f"has five fields, minute hour day-of-month month day-of-week, {CRON_EXAMPLES}, and a "
                               f"timezone is an IANA name such as Europe/Paris")
    for c in cron:
        if why := cron_problem(c):
            raise VaeflowError(f"--cron {c!r}: {why}; give five fields, minute hour day-of-month month day-of-week, "
                               f"{CRON_EXAMPLES.replace('e.g. ', 'e.g. --cron ').replace(' or ', ' or --cron ')}")
    for i in interval:
        if not 0 < i <= MAX_INTERVAL:
            raise VaeflowError(f"--interval {i}: give seconds between 1 and {MAX_INTERVAL} (366 days), e.g. "
                               f"--interval 3600 (hourly)")
    try:
        return (cfg.schedules + [ScheduleConfig(cron=c) for c in cron]
                + [ScheduleConfig(interval_seconds=i) for i in interval])
    except ValueError as exc:
        raise VaeflowError(f"--cron/--interval: {exc}") from None


def parse_env(items: list[str]) -> dict[str, str]:
    """--env KEY=VALUE items."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise VaeflowError(f"--env {item!r}: expected KEY=VALUE, e.g. --env OMP_NUM_THREADS=2")
        out[key.strip()] = value
    return out


def check_runnable(cfg: Config, source: str) -> None:
    """Fail at deploy time, exit 2, on what every run would fail on (shapes, a VQ config without priors)."""
    from vaeflow.core.model import build_model
    from vaeflow.pipelines.pipeline import plan

    plan(cfg, source=source)
    build_model(cfg)


def deploy_summary(done: list[dict], pool: str, pool_message: str, config_path: Path, pin: bool,
                   schedules: list[ScheduleConfig], env: dict[str, str]) -> list[str]:
    """What `vaeflow deploy` prints: the deployments, where runs write, and the commands to run them."""
    import shlex

    how = ("the resolved config is pinned as the `config` default (edits to the file do not apply)" if pin else
           f"each run reads {Path(config_path).resolve()} when it starts (--pin pins a snapshot instead)")
    lines = [pool_message, f"deployed to work pool {pool!r}; {how}:"]
    width = max(len(d["name"]) for d in done)
    for i, d in enumerate(done):
        when = ", ".join(describe_schedule(s) for s in schedules) if i == 0 and schedules else ""
        lines.append(f"  {d['name']:<{width}}  {when}".rstrip())
    lines += ["",
              f"flow runs write to workspace {env['VAEFLOW_HOME']} and MLflow store {env['MLFLOW_TRACKING_URI']}",
              "start workers (any number, on machines that reach this Prefect server and see that workspace and "
              "config), with PREFECT_API_URL exported:",
              f"  prefect worker start --pool {shlex.quote(pool)}",
              "run the pipeline now (or from the UI: Deployments -> Run):",
              f"  prefect deployment run {shlex.quote(done[0]['name'])}"]
    return lines
