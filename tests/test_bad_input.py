"""Bad input and faults as a new user meets them (#14): each is exit 2 with a message naming the file, field or path,
no traceback, and nothing half-written or duplicated. Real files, real `vaeflow` processes, real full disks (a small
tmpfs; mounting needs root, which these machines' test runs have: the disk tests skip elsewhere)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import get_args

import pytest
import torch

from vaeflow.core.checkpoint import CHECKPOINT_FILE, METRICS_FILE, WEIGHTS_FILE
from vaeflow.core.files import DiskFullError, atomic_write, check_writable
from conftest import TINY, VAEFLOW

SMALL = ["--set", "data.dataset.n_train=256", "--set", "data.dataset.n_test=64", "--set", "train.progress=false",
         "--set", "eval.iwae_k=4"]  # 4 steps an epoch; the tiny conv VAE's checkpoint is about 6.3 MiB
MIB = 1024 * 1024


def vaeflow(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """The console script as a user runs it."""
    return subprocess.run([VAEFLOW, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def user_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Assert exit 2 with every word in stderr and no traceback; returns stderr."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-4000:]
    for word in words:
        assert word in proc.stderr, f"{word!r} not in:\n{proc.stderr[-3000:]}"
    return proc.stderr


def mount_tmpfs(folder: Path, options: str) -> None:
    """Mount a tmpfs at folder (skips the test where mounting is not allowed, i.e. not root)."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): needs root")


@pytest.fixture
def disk(tmp_path):
    """A mount point for a small tmpfs (mount with mount_tmpfs); unmounted afterwards."""
    folder = tmp_path / "disk"
    yield folder
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0 and folder.is_mount():
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # a file still open: detach it


def resize(folder: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)


def epochs_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def leftovers(folder: Path) -> list[Path]:
    """Temp files of atomic writes (.NAME.XXXX.tmp) anywhere under folder."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# --- the config file ------------------------------------------------------------------------------------------
def test_a_config_that_is_not_utf8_names_the_file_line_and_encoding(tmp_path):
    bad = tmp_path / "latin.yaml"
    bad.write_bytes(TINY.read_text().replace("# A small", "# Caf\u00e9: a small", 1).encode("latin-1"))
    err = user_error(vaeflow("config", "validate", bad), str(bad), "line 1", "byte offset 5", "must be UTF-8")
    assert "0xe9" in err
    out = tmp_path / "run"
    user_error(vaeflow("train", bad, "--out", out), "must be UTF-8")
    assert not out.exists()


def test_a_duplicated_key_is_an_error_naming_the_key_and_both_lines(tmp_path):
    text = TINY.read_text()
    top = tmp_path / "top.yaml"  # a second `train:` block would silently replace the first
    top.write_text(text + "train:\n  epochs: 2\n")
    first = 1 + text.splitlines().index("train:")
    second = len(text.splitlines()) + 1
    err = user_error(vaeflow("config", "validate", top), str(top), "duplicate key 'train'",
                     f"lines {first} and {second}")
    assert "valid" not in err.replace("not valid", "")
    nested = tmp_path / "nested.yaml"
    nested.write_text(text.replace("  epochs: 5\n", "  epochs: 5\n  lr: 0.01\n  epochs: 7\n", 1))
    line = 1 + text.splitlines().index("  epochs: 5")
    user_error(vaeflow("config", "validate", nested), "train.epochs: duplicate key 'epochs'",
               f"lines {line} and {line + 2}")
    out = tmp_path / "run"
    user_error(vaeflow("train", nested, "--out", out), "duplicate key 'epochs'")
    assert not out.exists()


def test_a_directory_given_as_the_config_says_so_and_what_to_pass(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = user_error(vaeflow("config", "validate", empty), str(empty), "is a directory", "YAML config file")
    assert "not found" not in err
    project = tmp_path / "vae-shapes-tiny"  # as `vaeflow init vae-shapes-tiny` makes it: not the shipped template
    project.mkdir()
    (project / "mine.yaml").write_text(TINY.read_text())
    err = user_error(vaeflow("config", "validate", "vae-shapes-tiny", cwd=tmp_path), "is a directory",
                     "vae-shapes-tiny/mine.yaml", "pass vae-shapes-tiny.yaml")
    assert "valid (config hash" not in err


def test_resume_on_a_folder_that_is_not_a_run_says_what_a_run_directory_holds(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("x")
    err = user_error(vaeflow("train", "--resume", folder), f"{folder} is not a run directory", "config.yaml",
                     CHECKPOINT_FILE, "--out folder of `vaeflow train")
    assert "YAML file" not in err and "template" not in err
    assert sorted(p.name for p in folder.iterdir()) == ["todo.txt"]  # nothing written into it


# --- counts ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("train.epochs", "1.0e+29"), ("train.epochs", str(10**26)),
                                          ("train.batch_size", "1.0e+9"), ("train.max_steps", str(10**20)),
                                          ("eval.iwae_k", str(10**12)), ("quality.samples", str(10**15))])
def test_absurd_counts_are_refused_naming_the_field(field, value):
    from vaeflow.core.config import load_config
    from vaeflow.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(TINY, [f"{field}={value}"])
    (path, msg), = info.value.problems
    assert path == field and ("upper bound" in msg or "too large" in msg), msg


def test_counts_a_real_user_runs_still_validate():
    from vaeflow.core.config import load_config

    cfg = load_config(TINY, ["train.epochs=100000", "train.batch_size=65536", "train.max_steps=1000000000",
                             "eval.iwae_k=5000", "train.seed=1700000000000000000", "quality.samples=50000"])
    assert cfg.train.epochs == 100000 and cfg.train.max_steps == 10**9


def test_every_count_in_the_config_has_an_upper_bound():
    """Each int field of every section (plugins' options aside) is bounded above: a typo cannot validate."""
    from vaeflow.core.config import component_fields, config_model

    plugins = {".".join(key) for key in component_fields()} | {"model"}  # options the plugins declare

    def int_fields(model, path=()):
        for name, field in model.model_fields.items():
            dotted = ".".join((*path, name))
            args = get_args(field.annotation) or (field.annotation,)
            if int in args and bool not in args:
                yield dotted, field
            for arg in args:
                if isinstance(arg, type) and hasattr(arg, "model_fields") and dotted not in plugins:
                    yield from int_fields(arg, (*path, name))

    found = dict(int_fields(config_model()))
    assert {"train.epochs", "train.batch_size", "eval.iwae_k", "prior.sample.n", "quality.samples"} <= set(found)
    unbounded = [path for path, field in found.items() if not any(hasattr(m, "le") for m in field.metadata)]
    assert not unbounded, unbounded


def test_every_count_in_every_plugins_options_has_an_upper_bound():
    """Each int option of every registered component (list, tuple and dict items included) is bounded above."""
    from pydantic.fields import FieldInfo

    from vaeflow.core.registry import get_registry

    def bounded(metadata) -> bool:
        """An upper bound among the constraints (an item's Annotated[int, Field(...)] holds them in a FieldInfo)."""
        flat = [c for m in metadata for c in (m.metadata if isinstance(m, FieldInfo) else [m])]
        return any(hasattr(c, "le") or hasattr(c, "lt") for c in flat)

    def unbounded_ints(annotation, metadata=(), where=""):
        """Paths of the int values an annotation holds without an upper bound."""
        if annotation is int:
            return [] if bounded(metadata) else [where]
        args = get_args(annotation)
        if args and get_args(annotation)[0] is int and hasattr(annotation, "__metadata__"):  # Annotated[int, ...]
            return unbounded_ints(int, annotation.__metadata__, where)
        found = []
        for arg in args:
            if arg is bool or arg is type(None):
                continue
            if isinstance(arg, type) and hasattr(arg, "model_fields"):
                found += options_without_bounds(arg, where)
            elif arg is int or get_args(arg):
                found += unbounded_ints(arg, metadata if arg is int else (), f"{where}[]")
        return found

    def options_without_bounds(options, path):
        found = []
        for name, field in options.model_fields.items():
            found += unbounded_ints(field.annotation, field.metadata, f"{path}.{name}")
        return found

    registry = get_registry()
    unbounded, checked = [], 0
    for family, entries in registry.entries.items():
        for name, entry in entries.items():
            if entry.package == "vaeflow":  # the built-ins; a third-party plugin bounds its own
                unbounded += options_without_bounds(entry.cls.Options, f"{family}:{name}")
                checked += 1
    assert checked >= 30, checked  # the built-ins were found
    assert not unbounded, unbounded


@pytest.mark.parametrize("field, value", [
    ("data.dataset.n_train", "1.0e+29"), ("data.dataset.image_size", str(10**9)),
    ("model.encoder.channels", "[16, 4000000]"), ("model.latent_dim", str(10**8)),
    ("model.prior.components", str(10**12)),
])
def test_absurd_plugin_options_are_refused_naming_the_field(field, value):
    from vaeflow.core.config import load_config
    from vaeflow.core.errors import ConfigError

    sets = [f"{field}={value}"] + (["model.prior.name=vamp"] if field.startswith("model.prior") else [])
    with pytest.raises(ConfigError) as info:
        load_config(TINY, sets)
    (path, msg), = info.value.problems
    assert path.startswith(field) and ("upper bound" in msg or "too large" in msg), (path, msg)


def test_fsq_levels_that_multiply_past_the_codebook_bound_are_refused():
    """Each level is small, but K = prod(levels) sizes the code counts: 8^9 = 134,217,728 codes is refused with
    the product named, 8^8 = 16,777,216 (the bound itself) is accepted."""
    from pydantic import ValidationError

    from vaeflow.core.bounds import MAX_CODES
    from vaeflow.plugins.fsq import FSQOptions

    assert FSQOptions(levels=[8] * 8).codebook_size == 8**8 == MAX_CODES
    with pytest.raises(ValidationError, match="134,217,728 codes"):
        FSQOptions(levels=[8] * 9)


# --- output paths ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("bad-input") / "run"
    proc = vaeflow("train", TINY, "--out", run, "--set", "train.epochs=1", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture
def broken(trained, tmp_path):
    """A copy of the trained run whose weights are corrupt: a command that loads it before checking its output
    path fails with 'corrupt', one that checks first names the path."""
    run = tmp_path / "broken"
    run.mkdir()
    for name in ("config.yaml", "plugins.json"):
        (run / name).write_bytes((trained / name).read_bytes())
    (run / WEIGHTS_FILE).write_bytes(b"not safetensors")
    return run


def test_output_paths_that_cannot_be_written_fail_before_any_work(broken, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (["generate", "--model", broken, "--out", "/proc/nope/s.png"], ["/proc/nope/s.png", "no such folder"]),
        (["generate", "--model", broken, "--out", a_file / "s.png"], [f"{a_file} is a file"]),
        (["interpolate", "--model", broken, "--out", "/proc/nope/i.png"], ["/proc/nope/i.png", "no such folder"]),
        (["evaluate", "--model", broken, "--out", "/proc/nope/e.json"], ["/proc/nope/e.json", "no such folder"]),
        (["evaluate", "--model", broken, "--out", a_file / "e.json"], [f"{a_file} is a file"]),
        (["evaluate", "--model", broken, "--out", tmp_path], [f"--out {tmp_path} is a folder"]),
        (["render", "--model", broken, "--out", a_file], [f"--out {a_file} is a file, not a folder"]),
        (["render", "--model", broken, "--out", "/proc/nope/r"], ["/proc/nope/r", "no such folder"]),
        (["train", TINY, "--out", a_file, *SMALL], [f"--out {a_file} is a file, not a folder"]),
        (["train", TINY, "--out", "/proc/nope/run", *SMALL], ["/proc/nope/run", "no such folder"]),
        (["init", a_file / "sub"], [f"{a_file} is a file"]),
        (["bench", "train", "--out", "/proc/nope/t.json"], ["/proc/nope/t.json", "no such folder"]),
        (["bench", "contention", "--out", a_file / "c.json"], [f"{a_file} is a file"]),
        (["bench", "zoo", "--out", tmp_path, "--no-pythae"], [f"--out {tmp_path} is a folder"]),
    ]
    for args, words in cases:
        err = user_error(vaeflow(*args), "cannot write" if "no such folder" in words[-1] else "", *words)
        assert "corrupt" not in err, (args, err)  # the model was not even loaded
    assert a_file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["broken", "file.txt"]
    assert not leftovers(tmp_path)


def test_a_read_only_place_is_named_as_such(broken, disk):
    """Root writes through every mode bit, but not into a read-only mount."""
    mount_tmpfs(disk, "size=1m,ro")
    for args in (["generate", "--model", broken, "--out", disk / "s.png"],
                 ["evaluate", "--model", broken, "--out", disk / "sub" / "e.json"],
                 ["render", "--model", broken, "--out", disk / "r"],
                 ["train", TINY, "--out", disk / "run", *SMALL]):
        err = user_error(vaeflow(*args), f"{disk} is on a read-only file system")
        assert "corrupt" not in err
    assert not list(disk.iterdir())


def test_check_writable_leaves_nothing_behind(tmp_path):
    target = tmp_path / "a" / "b" / "out.png"
    assert check_writable(target) == target
    assert not list(tmp_path.iterdir())  # neither the probe nor the missing folders


# --- a full disk ----------------------------------------------------------------------------------------------
def test_a_short_write_by_torch_save_is_a_disk_full_error_with_no_temp_file(disk):
    """torch.save reports a full disk as `RuntimeError: [enforce fail ...] unexpected pos`: it must come out as
    ENOSPC in words, naming the file."""
    mount_tmpfs(disk, "size=2m")
    path = disk / "big.pt"
    with pytest.raises(DiskFullError) as info:
        atomic_write(path, lambda tmp: torch.save(torch.zeros(MIB), tmp))  # 4 MiB into 2 MiB, no size given
    assert "no space left on device" in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value, OSError) and info.value.errno == 28
    assert info.value.__context__ is None  # torch's failed writer (and its open temp file) is not kept alive
    assert not list(disk.iterdir())
    atomic_write(disk / "small.pt", lambda tmp: torch.save(torch.zeros(1000), tmp))  # the space came back


def test_disk_full_mid_training_is_exit_2_and_resume_logs_each_epoch_once(disk):
    """The first checkpoint (6.3 MiB) fits in 10 MiB, the second's temp file beside it does not: exit 2 at the end
    of epoch 2 naming the file and the space, epoch 2 already logged. With room again, the resume cuts the log back
    to its checkpoint (epoch 1) and logs 2 and 3 once each."""
    mount_tmpfs(disk, "size=10m")
    run = disk / "run"
    proc = vaeflow("train", TINY, "--out", run, "--set", "train.epochs=3", *SMALL)
    user_error(proc, "no space left on device", str(run / CHECKPOINT_FILE), "MiB")
    assert epochs_logged(run) == [1, 2] and not leftovers(disk) and not (run / WEIGHTS_FILE).exists()
    resize(disk, "size=40m")
    again = vaeflow("train", "--resume", run, "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert epochs_logged(run) == [1, 2, 3] and json.loads(again.stdout.splitlines()[-1])["epochs"] == 3
    assert not leftovers(disk)


def test_disk_full_at_the_first_checkpoint_then_a_rerun_logs_each_epoch_once(disk):
    """No checkpoint was ever written: the failed start removes the run folder it made (the epoch it had logged
    with it), so the rerun starts afresh and logs each epoch once."""
    mount_tmpfs(disk, "size=4m")
    run = disk / "run"
    user_error(vaeflow("train", TINY, "--out", run, "--set", "train.epochs=2", *SMALL), "no space left on device",
               str(run / CHECKPOINT_FILE))
    assert not run.exists() and not leftovers(disk)
    resize(disk, "size=40m")
    again = vaeflow("train", TINY, "--out", run, "--set", "train.epochs=2", *SMALL)
    assert again.returncode == 0, again.stderr[-3000:]
    assert epochs_logged(run) == [1, 2]


# --- user errors in a pipeline stage --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A single user's folder: the sqlite store, and Prefect's temporary server in one PREFECT_HOME."""
    folder = tmp_path_factory.mktemp("bad-input-project")
    env = {"VAEFLOW_HOME": str(folder), "PREFECT_HOME": str(folder / "prefect-home")}
    return folder, env


def pipeline_run(project, *sets: str) -> subprocess.CompletedProcess:
    folder, env = project
    args = [a for s in ("data.dataset.n_train=256", "data.dataset.n_test=64", "train.progress=false",
                        "quality.enabled=false", f"tracking.model_name=bad-{uuid.uuid4().hex[:6]}", *sets)
            for a in ("--set", s)]
    proc = subprocess.run([VAEFLOW, "run", str(TINY), *args], capture_output=True, text=True, cwd=folder,
                          env={k: v for k, v in {**os.environ, **env}.items()
                               if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}, timeout=600)
    return proc


def test_a_user_error_in_a_stage_prints_its_message_once_without_a_stack(project):
    proc = pipeline_run(project, "train.lr=1e6", "train.epochs=1")
    text = user_error(proc, "error: training diverged")
    assert text.count("training diverged") == 1, text  # not in Prefect's task and flow lines as well
    assert "Retry" not in text and 'File "' not in text
    assert "Finished in state Failed: NonFiniteError" in text


def test_a_full_disk_in_the_pipeline_is_not_retried_and_prints_once(project, disk):
    mount_tmpfs(disk, "size=4m")
    proc = pipeline_run(project, f"tracking.workspace={disk}", "train.epochs=2")
    text = user_error(proc, "error: no space left on device", str(CHECKPOINT_FILE), "MiB")
    assert text.count("no space left on device") == 1, text
    assert "Retry" not in text and 'File "' not in text and "unexpected pos" not in text
    assert not leftovers(disk)
