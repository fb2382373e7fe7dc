"""The `vaeflow` command line. Every user error exits with code 2 and a message, never a traceback."""

from __future__ import annotations

import functools
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.errors import VaeflowError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Train, evaluate and ship variational autoencoders.")
config_app = typer.Typer(no_args_is_help=True, help="Validate configs and print their JSON schema.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print and save measured ratios.")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")

SetOption = Annotated[list[str], typer.Option("--set", help="override a config field, e.g. --set train.epochs=3")]


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


def _report_failures() -> None:
    from core.registry import get_registry

    for plugin, reason in get_registry().failures:
        typer.echo(f"warning: plugin {plugin!r} did not load: {reason}", err=True)


@app.command()
@user_errors
def plugins(as_json: Annotated[bool, typer.Option("--json", help="print {family: [{name, source}]} as JSON")] = False):
    """List every registered component by family, with its source and options."""
    from core.registry import get_registry

    registry = get_registry()
    _report_failures()
    if as_json:
        typer.echo(json.dumps(registry.as_json(), indent=2))
        return
    for family, entries in registry.entries.items():
        typer.echo(f"{family}s:")
        if not entries:
            typer.echo("  (none)")
        for name, entry in sorted(entries.items()):
            opts = ", ".join(
                f"{k}={f.get_default(call_default_factory=True)!r}" if not f.is_required() else f"{k} (required)"
                for k, f in entry.cls.Options.model_fields.items()
            )
            typer.echo(f"  {name:<18} {entry.source}")
            if opts:
                typer.echo(f"  {'':<18} options: {opts}")
            for line in _shape_lines(entry):
                typer.echo(f"  {'':<18} {line}")


def _shape_lines(entry) -> list[str]:
    """What an encoder produces or a decoder consumes; a model kind's capabilities and the components it needs."""
    from core.interfaces import form_of

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
def config_validate(file: Path, set_: SetOption = []):
    """Exit 0 when FILE (with overrides) is valid, including shapes; else list each problem and exit 2."""
    from core.config import config_hash, load_config
    from core.model import build_model

    _report_failures()
    cfg = load_config(file, set_)
    build_model(cfg)  # shape checks against the data
    typer.echo(f"{file}: valid (config hash {config_hash(cfg)[:12]})")


@config_app.command("schema")
@user_errors
def config_schema():
    """Print the JSON schema of the config, with every discovered plugin's options."""
    from core.config import config_model

    typer.echo(json.dumps(config_model().model_json_schema(), indent=2))


@app.command()
@user_errors
def train(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="run directory to create")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="continue this run directory exactly")] = None,
    set_: SetOption = [],
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="DDP processes on this machine (via torchrun)")] = 1,
):
    """Train a model: `vaeflow train CONFIG --out RUN_DIR` or `vaeflow train --resume RUN_DIR`."""
    import os

    from core import engine
    from core.config import load_config

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_torchrun(nproc))

    if resume is not None:
        if config is not None or out is not None or set_:
            raise VaeflowError("--resume RUN_DIR takes no CONFIG, --out or --set: the run dir holds its config")
        result = engine.resume(resume)
    else:
        if config is None:
            raise VaeflowError("give a CONFIG file (e.g. configs/vae-shapes-tiny.yaml) or --resume RUN_DIR")
        cfg = load_config(config, set_)
        run_dir = out or Path(cfg.tracking.runs_dir) / f"{config.stem}"
        result = engine.train(cfg, run_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    typer.echo(json.dumps({"run_dir": str(result.run_dir), "epochs": result.epochs, "steps": result.steps,
                           "img_per_s": round(result.img_per_s, 1),
                           **{k: v for k, v in result.final.items() if k not in TRAIN_BOOKKEEPING}}))


TRAIN_BOOKKEEPING = ("epoch", "step", "img_per_s", "seconds", "lr", "beta", "capacity")  # the rest: loss and the kind's terms


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "pipelines", *args]
    return subprocess.run(cmd).returncode


def _resolve(model: str) -> str:
    """A registry URI pinned to one version (models:/NAME@alias -> models:/NAME/N), so that everything
    fetched for it (a VQ model's priors too) belongs to the same version; other sources unchanged."""
    if not model.startswith(("models:/", "runs:/")):
        return model
    from pipelines.tracking import get_client

    client = get_client()  # points MLflow at MLFLOW_TRACKING_URI or the embedded store here
    if model.startswith("models:/"):
        from pipelines.registry import resolve_version

        name, version = resolve_version(client, model)
        return f"models:/{name}/{version}"
    return model


def _load(model: str, sets: list[str]):
    from core import load_model
    from core.config import apply_sets

    net, cfg = load_model(_resolve(model), device="auto")
    return net, apply_sets(cfg, sets)


@app.command()
@user_errors
def evaluate(
    run_dir: Path,
    out: Annotated[Optional[Path], typer.Option("--out", help="JSON file (default RUN_DIR/eval.json)")] = None,
    set_: SetOption = [],
):
    """Compute the test-split metrics that apply to the model (metric plugins: ELBO and IWAE bounds, MSE/PSNR,
    active units, codebook health, disentanglement) and print their headlines."""
    from core.checkpoint import write_text
    from core.data import known_factors, load_split
    from core.metrics import evaluate as run_eval
    from core.metrics import headline_keys

    net, cfg = _load(str(run_dir), set_)
    metrics = run_eval(net, load_split(cfg, "test"), cfg.eval, **known_factors(cfg))
    path = out or Path(run_dir) / "eval.json"
    write_text(path, json.dumps(metrics, indent=2))
    for key in headline_keys(net.capabilities):  # what the metrics that apply to this model declare
        if key in metrics:
            typer.echo(f"{key:<24} {metrics[key]:.4f}" if isinstance(metrics[key], float) else f"{key:<24} {metrics[key]}")
    typer.echo(f"wrote {path}")


@app.command()
@user_errors
def generate(
    model: Annotated[str, typer.Option("--model", help="run directory or models:/NAME@alias")],
    n: Annotated[int, typer.Option("-n", min=1, help="number of samples")] = 64,
    out: Annotated[Path, typer.Option("--out")] = Path("samples.png"),
    seed: int = 0,
    temperature: Annotated[float, typer.Option(min=0.0)] = 1.0,
    top_k: Annotated[Optional[int], typer.Option("--top-k", min=1, help="VQ: sample among the k likeliest codes")] = None,
    prior: Annotated[list[str], typer.Option("--prior", help="VQ from a run dir: a prior folder per level, top first")] = [],
    set_: SetOption = [],
):
    """Sample and save a grid: z ~ N(0, I) for a VAE; for a VQ-VAE(-2), codes from its priors, top then bottom."""
    from pipelines.render import check_image_path, samples, save_grid, square_rows

    check_image_path(out)  # before any work
    model = _resolve(model)
    net, cfg = _load(model, set_)
    if not net.capabilities.discrete:
        if prior or top_k is not None:
            raise VaeflowError(f"--prior and --top-k apply to VQ models; {model} is a {cfg.model.kind}")
        samples(net, n, seed, out, temperature)
        typer.echo(f"wrote {n} samples to {out}")
        return
    from core.codes import sample_images
    from pipelines.registry import load_generator

    if temperature <= 0:
        raise VaeflowError("--temperature must be > 0 for sampling codes")
    net, cfg, priors = load_generator(model, prior or None)
    save_grid(sample_images(net, priors, n, temperature, top_k, seed), out, nrow=square_rows(n))
    typer.echo(f"wrote {n} samples of the {cfg.model.kind} (priors: {', '.join(priors)}) to {out}")


@app.command()
@user_errors
def render(
    model: Annotated[str, typer.Option("--model", help="run directory or models:/NAME@alias")],
    out: Annotated[Path, typer.Option("--out", help="folder for the images (one sub-folder per renderer)")] = Path("render"),
    kind: Annotated[list[str], typer.Option("--kind", help="renderer to run (repeatable): traversal, phase, "
                                             "interpolation, discrete; default: every configured one that applies")] = [],
    prior: Annotated[list[str], typer.Option("--prior", help="VQ from a run dir: a prior folder per level, top first")] = [],
    set_: SetOption = [],
):
    """Render latent traversals, phase diagrams, interpolations (and discrete traversals for VQ) of a trained model."""
    from core.data import load_split
    from pipelines.render import render_all

    model = _resolve(model)
    net, cfg = _load(model, set_)
    priors = {}
    if net.capabilities.discrete and (not kind or "discrete" in kind):
        from pipelines.registry import load_generator

        net, _, priors = load_generator(model, prior or None)
    paths = render_all(net, cfg, load_split(cfg, "test")[: cfg.render.max_examples], out, priors, kind or None)
    for path in paths:
        typer.echo(str(path))
    typer.echo(f"wrote {len(paths)} files under {out}")


@app.command()
@user_errors
def interpolate(
    model: Annotated[str, typer.Option("--model", help="run directory or models:/NAME@alias")],
    pairs: Annotated[int, typer.Option(min=1, help="rows: pairs of test images")] = 8,
    steps: Annotated[int, typer.Option(min=2, help="columns: points from one image to the other")] = 10,
    out: Annotated[Path, typer.Option("--out")] = Path("interpolation.png"),
    seed: int = 0,
    set_: SetOption = [],
):
    """Interpolate between the posterior means of pairs of test images and save a grid (option 2)."""
    from core.data import load_split
    from pipelines.render import interpolations

    net, cfg = _load(model, set_)
    interpolations(net, load_split(cfg, "test"), pairs, steps, seed, out)
    typer.echo(f"wrote {pairs} interpolations of {steps} steps to {out}")


@app.command()
@user_errors
def run(
    config: Path,
    set_: SetOption = [],
    until: Annotated[Optional[str], typer.Option(
        help="run only this stage and the stages it needs (see `vaeflow stages CONFIG`); default: every stage")] = None,
    force: Annotated[list[str], typer.Option(
        "--force", help="re-run this stage (repeatable) and every stage that depends on it, whatever the cache "
                        "holds; a bare --force re-runs every stage")] = [],
):
    """Run the pipeline through Prefect: the stage graph of the config's model kind, tracked in MLflow."""
    from core.config import load_config
    from core.model import build_model
    from pipelines.pipeline import pipeline, plan
    from pipelines.processes import sigterm_as_interrupt, temporary_server
    from pipelines.tracking import tracking_uri, ui_hint

    cfg = load_config(config, set_)  # fail fast, exit 2, before Prefect starts
    plan(cfg, until, force, str(config))  # unknown stages, missing priors: exit 2 here
    build_model(cfg)  # shape and stride errors exit 2 here, before any run exists
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
    typer.echo(json.dumps(result, indent=2))
    typer.echo("\nstages: " + ", ".join(f"{k} {v}" for k, v in result["stages"].items()))
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
    config: Path,
    set_: SetOption = [],
    markdown: Annotated[bool, typer.Option("--markdown", help="a mermaid diagram and the what-runs-again table")] = False,
):
    """Show the config's stage graph: each stage, what it needs, and what its cache key covers."""
    from core.config import load_config
    from pipelines.pipeline import describe, stage_graph

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
    config: Path,
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
    from core.config import load_config
    from pipelines.deployments import require_api, schedules_from, serve_deployments

    cfg = load_config(config, set_)
    require_api("serve")
    schedules = schedules_from(cfg, cron, interval)
    serve_deployments(config.resolve(), list(set_), schedules, name or cfg.tracking.model_name, pin)


@app.command()
@user_errors
def deploy(
    config: Path,
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

    from core.config import load_config
    from pipelines.deployments import (check_runnable, deploy_summary, deploy_to_pool, ensure_process_pool,
                                       parse_env, require_api, schedules_from, worker_env)

    cfg = load_config(config, set_)
    require_api("deploy")
    schedules = schedules_from(cfg, cron, interval)
    extra = parse_env(env)
    check_runnable(cfg, str(config))  # shape errors exit 2 here, not in every worker's run
    folder = (workspace or Path(os.environ.get("VAEFLOW_HOME") or Path.cwd())).resolve()
    run_env = worker_env(folder, extra)
    pool_message = ensure_process_pool(pool)
    done = deploy_to_pool(config.resolve(), list(set_), cfg, schedules, name or cfg.tracking.model_name, pool, run_env, pin)
    for line in deploy_summary(done, pool, pool_message, config, pin, schedules, run_env):
        typer.echo(line)


models_app = typer.Typer(no_args_is_help=True, help="The MLflow model registry.")
app.add_typer(models_app, name="models")


@models_app.command("list")
@user_errors
def models_list(as_json: Annotated[bool, typer.Option("--json")] = False):
    """Registered models: versions, aliases and key metrics."""
    from pipelines.registry import list_models
    from pipelines.tracking import get_client

    rows = list_models(get_client())
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
def models_promote(name: str, version: int, alias: Annotated[str, typer.Option(help="alias to set")] = "champion"):
    """Point an alias (default: champion) at a model version."""
    from pipelines.registry import promote
    from pipelines.tracking import get_client

    promote(get_client(), name, version, alias)
    typer.echo(f"{name}@{alias} -> version {version}")


@bench_app.command("pipeline")
@user_errors
def bench_pipeline(
    out: Annotated[Path, typer.Option("--out", help="JSON file for the measured figures")] = Path("bench/pipeline.json"),
    config: Annotated[Path, typer.Option(help="the training job")] = Path("configs/vae-fashion-mnist.yaml"),
    epochs: Annotated[int, typer.Option(min=1, help="epochs of the job (4 is about 60 s on 2 cores)")] = 4,
    repeats: Annotated[int, typer.Option(min=1, help="interleaved repeats of bare vs pipeline")] = 1,
):
    """Pipeline overhead vs a bare `vaeflow train`, and the wall time of a cached re-run."""
    from pipelines.bench import bench_pipeline as run_bench

    typer.echo(json.dumps(run_bench(out=out, config=config, epochs=epochs, repeats=repeats), indent=2))


@bench_app.command("train")
@user_errors
def bench_train(
    out: Annotated[Path, typer.Option("--out", help="JSON file for the measured figures")] = Path("bench/train.json"),
    repeats: Annotated[int, typer.Option(min=1, help="interleaved repeats of each variant")] = 5,
    steps: Annotated[int, typer.Option(min=10, help="training steps per repeat")] = 200,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads")] = 2,
):
    """Engine vs a pytorch/examples-style loop vs the fp32 matmul roofline, side by side."""
    from pipelines.bench import bench_train as run

    result = run(out=out, repeats=repeats, steps=steps, threads=threads)
    typer.echo(json.dumps(result, indent=2))


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
    from pipelines.bench_quantizer import bench_quantizer as run, print_summary

    print_summary(run(out=out, n=n, k=k, d=d, repeats=repeats))


@bench_app.command("vq-quality")
@user_errors
def bench_vq_quality(
    out: Annotated[Path, typer.Option("--out", help="JSON report; the sample grid is written next to it")] = Path("bench/vqvae2.json"),
    config: Annotated[Path, typer.Option(help="the VQ-VAE-2 config")] = Path("configs/vqvae2-fashion-mnist.yaml"),
    baseline: Annotated[Path, typer.Option(help="the continuous VAE, trained for as many epochs")] = Path("configs/vae-fashion-mnist.yaml"),
):
    """VQ-VAE-2 pipeline vs the conv VAE at the same epochs: code usage, test MSE, top-prior NLL, samples."""
    from pipelines.bench_vq import bench_vq_quality as run, print_summary

    print_summary(run(out=out, config=config, baseline=baseline))


@bench_app.command("disentanglement")
@user_errors
def bench_disentanglement(
    out: Annotated[Path, typer.Option("--out", help="JSON report; traversal grids are written next to it")] = Path("bench/disentanglement.json"),
    config: Annotated[Path, typer.Option(help="the VAE config on a dataset with known factors")] = Path("configs/vae-shapes-tiny.yaml"),
    beta: Annotated[list[float], typer.Option("--beta", help="β values (repeatable)")] = [1.0, 4.0, 8.0],
):
    """β-VAE at several β with the same budget: MIG, SAP, DCI per β, and a traversal grid for each."""
    from pipelines.bench_disentangle import bench_disentanglement as run, print_summary

    print_summary(run(out=out, config=config, betas=beta))


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
    from pipelines.bench_zoo import bench_zoo as run

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
