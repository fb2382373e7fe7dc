"""The `vaeflow` command line. Every user error exits with code 2 and a message, never a traceback."""

from __future__ import annotations

import functools
import math
import json
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from vaeflow.core.errors import VaeflowError
from vaeflow.core.files import check_writable

app = typer.Typer(pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Train, evaluate and ship variational autoencoders.")
config_app = typer.Typer(no_args_is_help=True, help="Validate configs and print their JSON schema.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print and save measured ratios.")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")

def _print_version(value: bool) -> None:
    """--version: print vaeflow's version and exit."""
    if value:
        from vaeflow import __version__

        typer.echo(f"vaeflow {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="print vaeflow's version and exit")] = False):
    """Train, evaluate and ship variational autoencoders."""


SetOption = Annotated[list[str], typer.Option("--set", help="override a config field, e.g. --set train.epochs=3")]
ConfigArg = Annotated[Path, typer.Argument(help="YAML config file, or a template name (see `vaeflow init --list`)")]
ModelOption = Annotated[str, typer.Option("--model", "-m", help="the model to read: a run directory, or a registered "
                                                                "model models:/NAME@ALIAS or models:/NAME/VERSION")]
SeedOption = Annotated[int, typer.Option(help="random seed of the draws, for a reproducible picture")]


def user_errors(fn):
    """Turn VaeflowError into `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VaeflowError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; resume with `vaeflow train --resume RUN_DIR`", err=True)
            raise typer.Exit(130) from None

    return wrapper


def cpu_job(fn):
    """Run a command that computes on the CPU as one CPU job: it takes its share of the threads (core.cpu), and jobs
    that start while it runs count it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from vaeflow.core.cpu import cpu_share

        with cpu_share(fn.__name__):
            return fn(*args, **kwargs)

    return wrapper


def _templates() -> dict[str, Path]:
    """The shipped starter configs by name, found without importing torch (vaeflow.configs is package data)."""
    from importlib.resources import files

    return {p.stem: p for p in sorted(Path(str(files("vaeflow.configs"))).glob("*.yaml"))}


Template = Enum("Template", {name: name for name in _templates()}, type=str)  # --help lists the names
DEFAULT_TEMPLATE = "vae-shapes-tiny"


def _summary(path: Path) -> str:
    """The leading comment of a template, as one line."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    return " ".join(lines)


@app.command()
@user_errors
def init(
    directory: Annotated[Path, typer.Argument(help="folder to write the config into, created when missing")] = Path("."),
    template: Annotated[Template, typer.Option("--template", "-t", help="the starter config to copy")] = DEFAULT_TEMPLATE,
    list_: Annotated[bool, typer.Option("--list", help="list the templates with what each trains, and exit")] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite the file when it exists")] = False,
):
    """Write a starter config to DIRECTORY/TEMPLATE.yaml, to edit and then `vaeflow run` (see --list)."""
    shipped = _templates()
    if list_:
        for name, path in shipped.items():
            typer.echo(f"{name:<24}{_summary(path)}")
        return
    name = Template(template).value
    target = directory / f"{name}.yaml"
    if target.exists() and not force:
        raise VaeflowError(f"{target} exists; pass --force to overwrite it, or another DIRECTORY")
    if directory.exists() and not directory.is_dir():
        raise VaeflowError(f"{directory} is a file, not a folder; pass the folder to write {name}.yaml into")
    check_writable(directory, folder=True, option="DIRECTORY")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(shipped[name].read_text())
        tmp.replace(target)  # whole or nothing
    except OSError as exc:
        raise VaeflowError(f"cannot write {target}: {exc.strerror or exc}") from None
    typer.echo(f"wrote {target}\nnext: vaeflow config validate {target}\n      vaeflow run {target}")


def _report_failures() -> None:
    from vaeflow.core.registry import get_registry

    for plugin, reason in get_registry().failures:
        typer.echo(f"warning: plugin {plugin!r} did not load: {reason}", err=True)


@app.command()
@user_errors
def plugins(as_json: Annotated[bool, typer.Option("--json", help="print {family: [{name, source}]} as JSON")] = False):
    """List every registered component by family, with its source and options."""
    listing = _plugin_listing()
    for plugin, reason in listing["failures"]:
        typer.echo(f"warning: plugin {plugin!r} did not load: {reason}", err=True)
    typer.echo(json.dumps(listing["json"], indent=2) if as_json else listing["text"])


PLUGIN_LISTING_FILE = "plugins-listing.json"


def _plugin_listing() -> dict:
    """{"text", "json", "failures"} of `vaeflow plugins`. Loading every plugin imports torch (seconds), so a cold
    command answers from a cache under the user cache folder when nothing it depends on changed: the interpreter,
    the installed distributions (by their folders' mtimes), VAEFLOW_PLUGINS, and every source file behind the
    plugins and this listing (by mtime and size). A process that already imported the registry (tests, a notebook)
    lists it directly, so what it registered in-process shows."""
    from vaeflow.core.files import write_text
    from vaeflow.core.sources import environment_stamp, file_stamps, plugin_files

    cache = _cache_dir() / PLUGIN_LISTING_FILE
    environment = environment_stamp()
    cold = "vaeflow.core.registry" not in sys.modules  # a process that imported it may have registered more
    if cold:
        try:
            entry = json.loads(cache.read_text())
            if entry["environment"] == environment and entry["files"] == file_stamps(
                    [Path(row[0]) for row in entry["files"]]):
                return entry["listing"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no cache, an unreadable one, or another version's: list afresh
    stamps = file_stamps(plugin_files(Path(__file__)))  # before loading, so an edit made meanwhile misses next time
    from vaeflow.core.registry import get_registry

    registry = get_registry()
    listing = {"text": "\n".join(_listing_lines(registry)), "json": registry.as_json(),
               "failures": [list(f) for f in registry.failures]}
    try:
        if cold:
            write_text(cache, json.dumps({"environment": environment, "files": stamps, "listing": listing}))
    except OSError:
        pass  # a read-only home: list without a cache
    return listing


def _cache_dir() -> Path:
    """$VAEFLOW_CACHE_DIR, else $XDG_CACHE_HOME/vaeflow, else ~/.cache/vaeflow."""
    import os

    if os.environ.get("VAEFLOW_CACHE_DIR"):
        return Path(os.environ["VAEFLOW_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "vaeflow"


def _listing_lines(registry) -> list[str]:
    """The human listing: each family, its components with source, options and shapes."""
    lines = []
    for family, entries in registry.entries.items():
        lines.append(f"{family}s:")
        if not entries:
            lines.append("  (none)")
        for name, entry in sorted(entries.items()):
            opts = ", ".join(
                f"{k}={f.get_default(call_default_factory=True)!r}" if not f.is_required() else f"{k} (required)"
                for k, f in entry.cls.Options.model_fields.items()
            )
            lines.append(f"  {name:<18} {entry.source}")
            if opts:
                lines.append(f"  {'':<18} options: {opts}")
            lines += [f"  {'':<18} {line}" for line in _shape_lines(entry)]
    return lines


def _shape_lines(entry) -> list[str]:
    """What an encoder produces or a decoder consumes; a model kind's capabilities and the components it needs."""
    from vaeflow.core.interfaces import form_of

    form = form_of(entry.cls)
    if form is not None:
        return [f"{'produces' if entry.family == 'encoder' else 'consumes'}: a {form}"]
    if entry.family == "stage":
        cls = entry.cls
        return [f"inputs: {', '.join(cls.inputs) or '-'}" + (f" (optional: {', '.join(cls.optional)})" if cls.optional else ""),
                f"key: config {', '.join(cls.sections + cls.reads) or '-'}; plugin code of {', '.join(cls.code) or '-'}"]
    if entry.family == "metric":
        cls = entry.cls
        return [f"needs: {', '.join(cls.needs) or 'any model'}; headline: {', '.join(cls.headline) or '-'}"]
    if entry.family != "model":
        return []
    caps = entry.cls.capabilities
    does = [f"{caps.latents} latents"] + (["sampling"] if caps.sampling else [])
    does += [f"{caps.log_likelihood} on log p(x)"] if caps.log_likelihood else []
    slots = ", ".join(f"{field} ({slot.family}{', ' + slot.form if slot.form else ''}"
                      f"{'' if slot.required else ', optional'})" for field, slot in entry.cls.slots.items())
    return [f"capabilities: {', '.join(does)}", f"components: {slots}"] + (
        [f"stages: {', '.join(entry.cls.stages)} (after train)"] if entry.cls.stages else [])


@config_app.command("validate")
@user_errors
def config_validate(file: ConfigArg, set_: SetOption = []):
    """Exit 0 when FILE (with overrides) is valid, including shapes; else list each problem and exit 2."""
    from vaeflow.core.config import config_hash, load_config
    from vaeflow.core.model import build_model

    _report_failures()
    cfg = load_config(file, set_)
    build_model(cfg)  # shape checks against the data
    typer.echo(f"{file}: valid (config hash {config_hash(cfg)[:12]})")


@config_app.command("schema")
@user_errors
def config_schema():
    """Print the JSON schema of the config, with every discovered plugin's options."""
    from vaeflow.core.config import config_model

    typer.echo(json.dumps(config_model().model_json_schema(), indent=2))


@app.command()
@user_errors
def train(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config file, or a template name (see `vaeflow init "
                                                          "--list`)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="run directory to create")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="continue this run directory exactly")] = None,
    set_: SetOption = [],
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="DDP processes on this machine (via torchrun)")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as one JSON line, for scripts")] = False,
):
    """Train a model: `vaeflow train CONFIG --out RUN_DIR` or `vaeflow train --resume RUN_DIR`."""
    import os

    from vaeflow.core import engine
    from vaeflow.core.config import load_config

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_torchrun(nproc))

    if resume is not None:
        if config is not None or out is not None or set_:
            raise VaeflowError("--resume RUN_DIR takes no CONFIG, --out or --set: the run dir holds its config")
        if (resume / "config.yaml").is_file():  # a run dir (else engine.resume says what one is)
            check_writable(resume, folder=True, option="--resume")
        finished = (resume / engine.WEIGHTS_FILE).is_file()  # written once the last epoch is done
        result = engine.resume(resume)
        if finished and not as_json and int(os.environ.get("RANK", "0")) == 0:
            typer.echo(f"{resume} was already trained to its last epoch; nothing to resume (its last epoch below)")
    else:
        if config is None:
            raise VaeflowError("give a CONFIG file (e.g. configs/vae-shapes-tiny.yaml) or --resume RUN_DIR")
        cfg = load_config(config, set_)
        run_dir = out or Path(cfg.tracking.runs_dir) / f"{config.stem}"
        check_writable(run_dir, folder=True, option="--out" if out else "the run directory (tracking.runs_dir)")
        result = engine.train(cfg, run_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    terms = {k: v for k, v in result.final.items() if k not in TRAIN_BOOKKEEPING}
    if as_json:
        typer.echo(json.dumps({"run_dir": str(result.run_dir), "epochs": result.epochs, "steps": result.steps,
                               "img_per_s": round(result.img_per_s, 1), **terms}))
        return
    typer.echo(f"trained {result.epochs} epoch{'s' if result.epochs != 1 else ''} ({result.steps} steps, "
               f"{result.img_per_s:,.0f} img/s in the last epoch) into {result.run_dir}")
    typer.echo("last epoch: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in terms.items()))
    typer.echo(f"next: vaeflow evaluate --model {result.run_dir}")


TRAIN_BOOKKEEPING = ("epoch", "step", "img_per_s", "seconds", "lr", "beta", "capacity", "threads")  # the rest: loss and the kind's terms


def _torchrun(nproc: int) -> int:
    """Re-run this `vaeflow train` command under torchrun with nproc processes; returns its exit code."""
    import subprocess

    args, skip = [], False
    for arg in sys.argv[1:]:  # drop --nproc N / --nproc=N
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "vaeflow.pipelines", *args]
    return subprocess.run(cmd).returncode


def _resolve(model: str) -> str:
    """A registry URI pinned to one version (models:/NAME@alias -> models:/NAME/N), so that everything
    fetched for it (a VQ model's priors too) belongs to the same version; other sources unchanged."""
    if not model.startswith(("models:/", "runs:/")):
        return model
    from vaeflow.pipelines.tracking import get_client

    client = get_client(create=False)  # points MLflow at MLFLOW_TRACKING_URI or the embedded store here; a lookup
    if model.startswith("models:/"):
        from vaeflow.pipelines.registry import resolve_version

        name, version = resolve_version(client, model)
        return f"models:/{name}/{version}"
    return model


def _load(model: str, sets: list[str]):
    """The trained model and its config with the --set overrides that apply to a trained model (data, eval, render);
    an override of what its weights fix (the model section, the image shape) is an error, not silently ignored."""
    from vaeflow.core import load_model
    from vaeflow.core.config import apply_sets, parse_set
    from vaeflow.core.model import data_shape

    net, stored = load_model(_resolve(model), device="auto")
    cfg = apply_sets(stored, sets)
    named = [dotted for dotted, _ in parse_set(list(sets))]
    if cfg.model != stored.model:
        keys = [d for d in named if d.split(".")[0] == "model"]
        raise VaeflowError(f"--set {', '.join(keys)}: a trained model's model section is fixed by its weights (its "
                           f"config.yaml); train a new model to change it: `vaeflow train CONFIG --set ...`")
    shape, trained = data_shape(cfg), data_shape(stored)
    if shape != trained:
        keys = [d for d in named if d.split(".")[0] == "data"]
        raise VaeflowError(f"--set {', '.join(keys)}: the model was trained on {'x'.join(map(str, trained))} images, "
                           f"and this data would be {'x'.join(map(str, shape))}; drop it, or train a model on that data")
    return net, cfg


@app.command()
@user_errors
@cpu_job
def evaluate(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="the model to read: a run directory, or a "
                                                                       "registered model models:/NAME@ALIAS or "
                                                                       "models:/NAME/VERSION")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="JSON file of the metrics (default: RUN_DIR/eval.json "
                                                              "for a run directory, eval-NAME-vVERSION.json here for "
                                                              "a registered model)")] = None,
    set_: SetOption = [],
    run_dir: Annotated[Optional[str], typer.Argument(hidden=True, help="deprecated: use --model RUN_DIR")] = None,
):
    """Compute the test-split metrics that apply to the model (metric plugins: ELBO and IWAE bounds, MSE/PSNR,
    active units, codebook health, disentanglement) and print their headlines."""
    from vaeflow.core.checkpoint import write_text
    from vaeflow.core.data import known_factors, load_split
    from vaeflow.core.metrics import evaluate as run_eval
    from vaeflow.core.metrics import headline_keys

    if run_dir is not None:
        if model is not None:
            raise VaeflowError("give the model once: --model RUN_DIR (the positional RUN_DIR is deprecated)")
        typer.echo("warning: `vaeflow evaluate RUN_DIR` is deprecated; use `vaeflow evaluate --model RUN_DIR`", err=True)
        model = run_dir
    if model is None:
        raise VaeflowError("give the model to evaluate: --model RUN_DIR or --model models:/NAME@ALIAS")
    source = _resolve(model)
    if source.startswith("models:/"):
        name, version = source.removeprefix("models:/").split("/")
        path = out or Path(f"eval-{name}-v{version}.json")
    else:
        path = out or Path(model) / "eval.json"
    if out is not None or Path(model).is_dir() or source.startswith("models:/"):  # a missing run dir: _load says so
        check_writable(path, option="--out" if out else "the metrics file")  # before any metric is computed
    net, cfg = _load(source, set_)
    metrics = run_eval(net, load_split(cfg, "test"), cfg.eval, **known_factors(cfg))
    write_text(path, json.dumps(metrics, indent=2))
    for key in headline_keys(net.capabilities):  # what the metrics that apply to this model declare
        if key in metrics:
            typer.echo(f"{key:<24} {metrics[key]:.4f}" if isinstance(metrics[key], float) else f"{key:<24} {metrics[key]}")
    typer.echo(f"wrote {path}")


@app.command()
@user_errors
@cpu_job
def generate(
    model: ModelOption,
    n: Annotated[int, typer.Option("-n", min=1, help="number of samples")] = 64,
    out: Annotated[Path, typer.Option("--out", help="PNG file of the sample grid")] = Path("samples.png"),
    seed: SeedOption = 0,
    temperature: Annotated[float, typer.Option(min=0.0, help="sampling temperature T: scales the latent prior's "
                                                             "spread (z ~ N(0, T^2 I) under the standard normal) or "
                                                             "divides VQ code logits by T; 1 samples the model "
                                                             "itself")] = 1.0,
    top_k: Annotated[Optional[int], typer.Option("--top-k", min=1, help="VQ: sample among the k likeliest codes")] = None,
    prior: Annotated[list[str], typer.Option("--prior", help="VQ from a run dir: a prior folder per level, top first")] = [],
    set_: SetOption = [],
):
    """Sample and save a grid: z ~ N(0, I) for a VAE; for a VQ-VAE(-2), codes from its priors, top then bottom."""
    from vaeflow.core.images import check_grid_memory
    from vaeflow.core.model import data_shape
    from vaeflow.pipelines.render import check_image_path, samples, save_grid, square_rows

    check_writable(check_image_path(out))  # before any work
    if not math.isfinite(temperature):
        raise VaeflowError(f"--temperature {temperature}: give a finite temperature, e.g. 1 (the model itself) or 0.7")
    model = _resolve(model)
    net, cfg = _load(model, set_)
    check_grid_memory(n, data_shape(cfg), "-n")
    if not net.capabilities.discrete:
        if prior or top_k is not None:
            raise VaeflowError(f"--prior and --top-k apply to VQ models; {model} is a {cfg.model.kind}")
        samples(net, n, seed, out, temperature)
        typer.echo(f"wrote {n} samples to {out}")
        return
    from vaeflow.core.codes import sample_images
    from vaeflow.pipelines.registry import load_generator

    if temperature <= 0:
        raise VaeflowError("--temperature must be > 0 for sampling codes")
    net, cfg, priors = load_generator(model, prior or None)
    save_grid(sample_images(net, priors, n, temperature, top_k, seed), out, nrow=square_rows(n))
    typer.echo(f"wrote {n} samples of the {cfg.model.kind} (priors: {', '.join(priors)}) to {out}")


def _complete_renderer(incomplete: str) -> list[str]:
    """Shell completion of render --kind: the registered renderers (plugins included)."""
    from vaeflow.core.registry import get_registry

    return [name for name in get_registry().names("renderer") if name.startswith(incomplete)]


@app.command()
@user_errors
@cpu_job
def render(
    model: ModelOption,
    out: Annotated[Path, typer.Option("--out", help="folder for the images (one sub-folder per renderer)")] = Path("render"),
    kind: Annotated[list[str], typer.Option("--kind", help="renderer to run (repeatable): traversal, phase, "
                                             "interpolation, discrete, or a plugin's (see `vaeflow plugins`); "
                                             "default: every configured one that applies",
                                             autocompletion=_complete_renderer)] = [],
    prior: Annotated[list[str], typer.Option("--prior", help="VQ from a run dir: a prior folder per level, top first")] = [],
    set_: SetOption = [],
):
    """Render latent traversals, phase diagrams, interpolations (and discrete traversals for VQ) of a trained model."""
    from vaeflow.core.data import load_split
    from vaeflow.pipelines.render import render_all

    check_writable(out, folder=True)  # before any work
    model = _resolve(model)
    net, cfg = _load(model, set_)
    priors = {}
    if net.capabilities.discrete and (not kind or "discrete" in kind):
        from vaeflow.pipelines.registry import load_generator

        net, _, priors = load_generator(model, prior or None)
    paths = render_all(net, cfg, load_split(cfg, "test")[: cfg.render.max_examples], out, priors, kind or None)
    for path in paths:
        typer.echo(str(path))
    typer.echo(f"wrote {len(paths)} files under {out}")


@app.command()
@user_errors
@cpu_job
def interpolate(
    model: ModelOption,
    pairs: Annotated[int, typer.Option(min=1, help="rows: pairs of test images (two rows each for a VQ model: "
                                                   "lerped, and snapped to its codes)")] = 8,
    steps: Annotated[int, typer.Option(min=2, help="columns: points from one image to the other")] = 10,
    out: Annotated[Path, typer.Option("--out", help="PNG file of the interpolation grid")] = Path("interpolation.png"),
    seed: SeedOption = 0,
    set_: SetOption = [],
):
    """Interpolate linearly between the posterior means of pairs of test images, decode, and save a grid."""
    from vaeflow.core.data import load_split
    from vaeflow.core.images import check_grid_memory
    from vaeflow.core.model import data_shape
    from vaeflow.pipelines.render import check_image_path, interpolations

    from vaeflow.core.bounds import MAX_GRID

    for option, value in (("--pairs", pairs), ("--steps", steps)):
        if value > MAX_GRID:
            raise VaeflowError(f"{option} {value}: at most {MAX_GRID} rows or columns in one figure")
    check_writable(check_image_path(out))  # before any work
    net, cfg = _load(_resolve(model), set_)
    check_grid_memory(pairs * steps * (2 if net.capabilities.discrete else 1), data_shape(cfg), "--pairs x --steps")
    interpolations(net, load_split(cfg, "test"), pairs, steps, seed, out)
    typer.echo(f"wrote {pairs} interpolations of {steps} steps to {out}")


def _complete_stage(ctx: typer.Context, incomplete: str) -> list[str]:
    """Shell completion of --until/--force: the stage ids of the config given on the command line."""
    try:
        from vaeflow.core.config import load_config
        from vaeflow.pipelines.pipeline import stage_graph

        # while the option's value is being completed, click has not assigned the positional: it is left in args
        config = ctx.params.get("config") or next(a for a in ctx.args if not a.startswith("-"))
        graph = stage_graph(load_config(config, ctx.params.get("set_") or []))
        return [s.id for s in graph.stages if s.id.startswith(incomplete)]
    except Exception:  # no config yet, or a bad one: nothing to offer
        return []


@app.command()
@user_errors
def run(
    config: ConfigArg,
    set_: SetOption = [],
    until: Annotated[Optional[str], typer.Option(
        help="run only this stage and the stages it needs (see `vaeflow stages CONFIG`); default: every stage",
        autocompletion=_complete_stage)] = None,
    force: Annotated[list[str], typer.Option(
        "--force", help="re-run this stage (repeatable) and every stage that depends on it, whatever the cache "
                        "holds; a bare --force re-runs every stage",
        autocompletion=_complete_stage)] = [],
    as_json: Annotated[bool, typer.Option("--json", help="print the result (stage statuses, folders, MLflow run, "
                                                         "registered version) as one JSON line, for scripts")] = False,
):
    """Run the pipeline through Prefect: the stage graph of the config's model kind, tracked in MLflow."""
    from vaeflow.core.config import load_config
    from vaeflow.core.model import build_model
    from vaeflow.pipelines.pipeline import pipeline, plan, quiet_user_errors
    from vaeflow.pipelines.processes import sigterm_as_interrupt, temporary_server
    from vaeflow.pipelines.tracking import tracking_uri, ui_hint

    cfg = load_config(config, set_)  # fail fast, exit 2, before Prefect starts
    plan(cfg, until, force, str(config))  # unknown stages, missing priors: exit 2 here
    build_model(cfg)  # shape and stride errors exit 2 here, before any run exists
    from vaeflow.pipelines.workspace import workspace

    check_writable(workspace(cfg), folder=True, option="the workspace (VAEFLOW_HOME, tracking.workspace)")
    from vaeflow.pipelines.deployments import check_prefect_api

    check_prefect_api("run")  # a PREFECT_API_URL where no server answers: exit 2 now, before any run or store exists
    quiet_user_errors(echoed=True)  # a stage's user error is printed once, last, by user_errors
    call = lambda: pipeline(str(config), list(set_), until, force=list(force) or None)  # noqa: E731
    again = shlex.join(["vaeflow", "run", str(config), *(a for s in set_ for a in ("--set", s)),
                        *(["--until", until] if until else [])])
    try:
        with sigterm_as_interrupt(), temporary_server():
            result = call()
    except KeyboardInterrupt:
        typer.echo(f"interrupted; its MLflow runs are marked KILLED. Run `{again}` again to continue: finished "
                   "stages come back cached and training resumes from its last checkpoint", err=True)
        raise typer.Exit(130) from None
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo("stages: " + ", ".join(f"{k} {v}" for k, v in result["stages"].items()))
    for key, label in (("run_dir", "trained model"), ("eval", "evaluation")):
        if key in result:
            typer.echo(f"{label}: {result[key]}")
    typer.echo(f"MLflow run {result['mlflow_run_id']} in {tracking_uri()}; UI: {ui_hint()}")
    if "model" not in result:
        return
    model = result["model"]
    typer.echo(f"model {model['name']} version {model['version']}"
               + (" (champion)" if model.get("champion") else "")
               + f": vaeflow generate --model models:/{model['name']}@champion -n 64 --out samples.png")


@app.command()
@user_errors
def stages(
    config: ConfigArg,
    set_: SetOption = [],
    markdown: Annotated[bool, typer.Option("--markdown", help="a mermaid diagram and the what-runs-again table")] = False,
):
    """Show the config's stage graph: each stage, what it needs, and what its cache key covers."""
    from vaeflow.core.config import load_config
    from vaeflow.pipelines.pipeline import describe, stage_graph

    cfg = load_config(config, set_)
    if markdown:
        typer.echo(describe(cfg), nl=False)
        return
    graph = stage_graph(cfg)
    for s in graph.stages:
        key = ", ".join(s.sections + s.reads) or "-"
        typer.echo(f"{s.id:<20} needs {', '.join(graph.needs[s.id]) or '-'}; key: config {key}"
                   + (f", plugin code of {', '.join(s.code)}" if s.code else ""))


@app.command()
@user_errors
def serve(
    config: ConfigArg,
    set_: SetOption = [],
    cron: Annotated[list[str], typer.Option("--cron", help="cron schedule for the pipeline (repeatable)")] = [],
    interval: Annotated[list[int], typer.Option("--interval", min=1, help="interval schedule in seconds (repeatable)")] = [],
    name: Annotated[Optional[str], typer.Option(help="deployment name (default: tracking.model_name)")] = None,
    pin: Annotated[bool, typer.Option("--pin", help="pin the resolved config as the runs' `config` default (a "
                                      "snapshot the UI form shows); default: each run reads CONFIG when it starts")] = False,
):
    """Register the pipeline's deployments (vaeflow_pipeline/NAME, and NAME-STAGE for each stage of the config's
    graph) and run their flow runs in this process until Ctrl-C (needs PREFECT_API_URL). For several worker
    processes, use `vaeflow deploy`."""
    from vaeflow.core.config import config_path, load_config
    from vaeflow.pipelines.deployments import require_api, schedules_from, serve_deployments

    cfg = load_config(config, set_)
    schedules = schedules_from(cfg, cron, interval)  # argument errors first, offline
    require_api("serve")
    serve_deployments(config_path(config).resolve(), list(set_), schedules, name or cfg.tracking.model_name, pin)


@app.command()
@user_errors
def deploy(
    config: ConfigArg,
    pool: Annotated[str, typer.Option("--pool", help="Prefect work pool (type process; created when missing)")],
    set_: SetOption = [],
    cron: Annotated[list[str], typer.Option("--cron", help="cron schedule for the pipeline (repeatable)")] = [],
    interval: Annotated[list[int], typer.Option("--interval", min=1, help="interval schedule in seconds (repeatable)")] = [],
    name: Annotated[Optional[str], typer.Option(help="deployment name (default: tracking.model_name)")] = None,
    pin: Annotated[bool, typer.Option("--pin", help="pin the resolved config as the runs' `config` default (a "
                                      "snapshot the UI form shows); default: each run reads CONFIG when it starts")] = False,
    workspace: Annotated[Optional[Path], typer.Option(
        "--workspace", help="folder the flow runs write to (stage outputs; the sqlite MLflow store unless "
                            "MLFLOW_TRACKING_URI is set): a path every worker sees; default VAEFLOW_HOME, else here")] = None,
    env: Annotated[list[str], typer.Option("--env", help="extra KEY=VALUE for the flow runs' environment (repeatable)")] = [],
):
    """Deploy the pipeline (vaeflow_pipeline/NAME, and NAME-STAGE for each stage of the config's graph) to a process
    work pool, for any number of `prefect worker start --pool POOL` processes to run (needs PREFECT_API_URL)."""
    import os

    from vaeflow.core.config import config_path, load_config
    from vaeflow.pipelines.deployments import (check_runnable, deploy_summary, deploy_to_pool, ensure_process_pool,
                                       parse_env, require_api, schedules_from, worker_env)

    cfg = load_config(config, set_)
    schedules = schedules_from(cfg, cron, interval)  # argument errors first, offline
    require_api("deploy")
    extra = parse_env(env)
    check_runnable(cfg, str(config))  # shape errors exit 2 here, not in every worker's run
    folder = (workspace or Path(os.environ.get("VAEFLOW_HOME") or Path.cwd())).resolve()
    run_env = worker_env(folder, extra)
    pool_message = ensure_process_pool(pool)
    source = config_path(config).resolve()  # a template name: the shipped file, which every run reads
    done = deploy_to_pool(source, list(set_), cfg, schedules, name or cfg.tracking.model_name, pool, run_env, pin)
    for line in deploy_summary(done, pool, pool_message, source, pin, schedules, run_env):
        typer.echo(line)


models_app = typer.Typer(no_args_is_help=True, help="The MLflow model registry.")
app.add_typer(models_app, name="models")


@models_app.command("list")
@user_errors
def models_list(as_json: Annotated[bool, typer.Option("--json", help="print the list as JSON, for scripts")] = False):
    """Registered models: versions, aliases and key metrics."""
    from vaeflow.pipelines.registry import list_models
    from vaeflow.pipelines.tracking import get_client

    rows = list_models(get_client(create=False))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no registered models; `vaeflow run CONFIG` registers one")
    for r in rows:
        metrics = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(r["metrics"].items()))
        typer.echo(f"{r['name']:<24} v{r['version']:<4} {','.join(r['aliases']) or '-':<20} {metrics}")


@models_app.command("promote")
@user_errors
def models_promote(name: Annotated[str, typer.Argument(help="registered model name")],
                   version: Annotated[int, typer.Argument(help="the version the alias will point at")],
                   alias: Annotated[str, typer.Option(help="alias to set")] = "champion"):
    """Point an alias (default: champion) at a model version."""
    from vaeflow.pipelines.registry import promote
    from vaeflow.pipelines.tracking import get_client

    promote(get_client(create=False), name, version, alias)
    typer.echo(f"{name}@{alias} -> version {version}")


@bench_app.command("pipeline")
@user_errors
def bench_pipeline(
    out: Annotated[Path, typer.Option("--out", help="JSON file for the measured figures")] = Path("bench/pipeline.json"),
    config: Annotated[Path, typer.Option(help="the training job: a YAML file or a template name")] = Path("vae-fashion-mnist"),
    epochs: Annotated[int, typer.Option(min=1, help="epochs of the job (4 is about 60 s on 2 cores)")] = 4,
    repeats: Annotated[int, typer.Option(min=1, help="interleaved repeats of bare vs pipeline")] = 1,
):
    """Pipeline overhead vs a bare `vaeflow train`, and the wall time of a cached re-run."""
    check_writable(out)  # before any measurement
    from vaeflow.pipelines.bench import bench_pipeline as run_bench

    typer.echo(json.dumps(run_bench(out=out, config=config, epochs=epochs, repeats=repeats), indent=2))


@bench_app.command("train")
@user_errors
def bench_train(
    out: Annotated[Path, typer.Option("--out", help="JSON file for the measured figures")] = Path("bench/train.json"),
    repeats: Annotated[int, typer.Option(min=1, help="interleaved repeats of each variant")] = 5,
    steps: Annotated[int, typer.Option(min=10, help="training steps per repeat")] = 200,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads")] = 2,
    steady_epochs: Annotated[int, typer.Option(min=2, help="epochs of the steady-state training, whose last is timed")] = 3,
    steady_repeats: Annotated[int, typer.Option(min=0, help="repeats of the steady-state pair (0 skips it)")] = 2,
):
    """Engine vs a pytorch/examples-style loop vs the fp32 matmul roofline, side by side, fresh and in a later epoch."""
    check_writable(out)  # before any measurement
    from vaeflow.pipelines.bench import bench_train as run

    result = run(out=out, repeats=repeats, steps=steps, threads=threads, steady_epochs=steady_epochs,
                 steady_repeats=steady_repeats)
    typer.echo(json.dumps(result, indent=2))


@bench_app.command("contention")
@user_errors
def bench_contention(
    out: Annotated[Path, typer.Option("--out", help="JSON file for the measured figures")] = Path("bench/contention.json"),
    repeats: Annotated[int, typer.Option(min=1, help="interleaved rounds of every variant")] = 3,
    steps: Annotated[int, typer.Option(min=10, help="training steps per job")] = 1000,
    before_pair_steps: Annotated[int, typer.Option(min=10, help="steps per job of the slow 'before' pair")] = 200,
):
    """Two trainings at once vs one alone (total img/s), with vaeflow's thread and OpenMP defaults and without."""
    check_writable(out)  # before any measurement
    from vaeflow.pipelines.bench_contention import bench_contention as run, print_summary

    print_summary(run(out=out, repeats=repeats, steps=steps, before_pair_steps=before_pair_steps))


@bench_app.command("quantizer")
@user_errors
def bench_quantizer(
    out: Annotated[Path, typer.Option("--out", help="JSON file for the measured figures")] = Path("bench/quantizer.json"),
    n: Annotated[int, typer.Option(min=1, help="vectors per forward")] = 32768,
    k: Annotated[int, typer.Option(min=1, help="codebook size")] = 512,
    d: Annotated[int, typer.Option(min=1, help="code width")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="interleaved repeats")] = 5,
):
    """vq and vq-ema forward+backward vs the bare distance matmul + argmin, and vs broadcasting."""
    check_writable(out)  # before any measurement
    from vaeflow.pipelines.bench_quantizer import bench_quantizer as run, print_summary

    print_summary(run(out=out, n=n, k=k, d=d, repeats=repeats))


@bench_app.command("vq-quality")
@user_errors
def bench_vq_quality(
    out: Annotated[Path, typer.Option("--out", help="JSON report; the sample grid is written next to it")] = Path("bench/vqvae2.json"),
    config: Annotated[Path, typer.Option(help="the VQ-VAE-2 config: a YAML file or a template name")] = Path("vqvae2-fashion-mnist"),
    baseline: Annotated[Path, typer.Option(help="the continuous VAE, trained for as many epochs: a YAML file or a template name")] = Path("vae-fashion-mnist"),
):
    """VQ-VAE-2 pipeline vs the conv VAE at the same epochs: code usage, test MSE, top-prior NLL, samples."""
    check_writable(out)  # before any measurement
    from vaeflow.pipelines.bench_vq import bench_vq_quality as run, print_summary

    print_summary(run(out=out, config=config, baseline=baseline))


@bench_app.command("disentanglement")
@user_errors
def bench_disentanglement(
    out: Annotated[Path, typer.Option("--out", help="JSON report; traversal grids are written next to it")] = Path("bench/disentanglement.json"),
    config: Annotated[Path, typer.Option(help="the VAE config on a dataset with known factors: a YAML file or a template name")] = Path("vae-shapes-tiny"),
    beta: Annotated[list[float], typer.Option("--beta", help="β values (repeatable)")] = [1.0, 4.0, 8.0],
):
    """β-VAE at several β with the same budget: MIG, SAP, DCI per β, and a traversal grid for each."""
    check_writable(out)  # before any measurement
    from vaeflow.pipelines.bench_disentangle import bench_disentanglement as run, print_summary

    print_summary(run(out=out, config=config, betas=beta))


@bench_app.command("startup")
@user_errors
def bench_startup(
    out: Annotated[Path, typer.Option("--out", help="JSON file for the measured figures")] = Path("bench/startup.json"),
    repeats: Annotated[int, typer.Option(min=1, help="runs of each command, interleaved")] = 5,
):
    """Start-to-exit time of the CLI's light commands, and whether each imports torch, mlflow or prefect."""
    check_writable(out)  # before any measurement
    from vaeflow.pipelines.bench_startup import bench_startup as run, print_summary

    print_summary(run(out=out, repeats=repeats))


@bench_app.command("zoo")
@user_errors
def bench_zoo(
    out: Annotated[Path, typer.Option("--out", help="JSON file for the measured figures")] = Path("bench/zoo.json"),
    seeds: Annotated[int, typer.Option(min=1, help="seeds per model and side, interleaved")] = 3,
    epochs: Annotated[int, typer.Option(min=1, help="training epochs on Fashion-MNIST")] = 5,
    nll_k: Annotated[int, typer.Option(min=1, help="importance samples of the test NLL (IWAE bound)")] = 1000,
    nll_examples: Annotated[Optional[int], typer.Option(min=1, help="test images scored (default: all 10000)")] = None,
    models: Annotated[list[str], typer.Option("--models", help="zoo models, repeatable or comma-separated "
                                                                 "(default: vae, iwae, beta-tcvae, vamp, info-vae)")] = [],
    venv: Annotated[Optional[Path], typer.Option(help="pythae virtualenv, built when missing (default: "
                                                      "$VAEFLOW_BENCH_PYTHAE_VENV or ~/.cache/vaeflow/bench-pythae-venv)")] = None,
    pythae: Annotated[bool, typer.Option(help="run the pythae side (--no-pythae: vaeflow's side only)")] = True,
    get_nll_examples: Annotated[int, typer.Option(min=0, help="test images pythae's own get_nll scores per run, to "
                                                              "check vaeflow's estimator on pythae's networks (0 "
                                                              "skips it)")] = 500,
    dis_seeds: Annotated[int, typer.Option(min=0, help="seeds of the beta-TCVAE vs beta-VAE table on shapes (0 skips it)")] = 3,
    dis_beta: Annotated[float, typer.Option(help="the beta both use in that table")] = 6.0,
    dis_epochs: Annotated[int, typer.Option(min=1, help="epochs per disentanglement run")] = 10,
    dis_n_train: Annotated[int, typer.Option(min=1, help="shapes training images")] = 10_000,
    dis_n_test: Annotated[int, typer.Option(min=1, help="shapes test images scored")] = 2_000,
):
    """vaeflow's zoo vs pythae: test NLL, img/s per model and side; beta-TCVAE vs beta-VAE MIG, SAP, DCI on shapes."""
    check_writable(out)  # before any measurement
    from vaeflow.pipelines.bench_zoo import bench_zoo as run

    names = [name.strip() for item in models for name in item.split(",") if name.strip()]
    run(out=out, seeds=seeds, epochs=epochs, nll_k=nll_k, nll_examples=nll_examples, models=names or None, venv=venv,
        pythae=pythae, get_nll_examples=get_nll_examples, dis_seeds=dis_seeds,
        dis_beta=dis_beta, dis_epochs=dis_epochs, dis_n_train=dis_n_train, dis_n_test=dis_n_test)


BARE_FORCE = "all"  # what a bare `--force` means: every stage


def bare_force(argv: list[str]) -> list[str]:
    """argv with a bare `--force` (followed by nothing, another option, or the config file) as `--force all`: typer
    options always take a value, and `vaeflow run CONFIG --force` should re-run everything."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--force" and (nxt is None or nxt.startswith("-") or nxt.endswith((".yaml", ".yml", ".json"))
                                 or Path(nxt).is_file()):
            out.append(BARE_FORCE)
    return out


def main() -> None:
    """Console-script entry point."""
    app(args=bare_force(sys.argv[1:]))
