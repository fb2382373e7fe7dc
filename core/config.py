"""The run config: pydantic models, YAML loading, overrides, canonical hash.

Static sections are declared here; the component fields (``data.dataset``,
``model.encoder`` ...) become discriminated unions on ``name`` once plugins are
discovered (:func:`config_model`), so validation and the JSON schema both know
every plugin's options.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel, ConfigDict, Discriminator, Field, PositiveInt, Tag, ValidationError, create_model, field_validator,
    model_validator,
)

from vaeflow.core.bounds import (  # noqa: F401  (re-exported: the config's bounds)
    MAX_BATCH, MAX_EPOCHS, MAX_IMAGES, MAX_SEED, MAX_SIDE, MAX_STEPS, MAX_WORKERS,
)
from vaeflow.core.errors import ConfigError
from vaeflow.core.interfaces import TAGS
from vaeflow.core.registry import Registry, get_registry

ENV_PREFIX = "VAEFLOW_"


class Section(BaseModel):
    """Base of every config section: typos are errors with their field path, and a float is finite (inf and nan are
    typos too: `lr: inf` is not a learning rate)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ComponentSpec(Section):
    """A component chosen by `name` (`vaeflow plugins` lists them), with that plugin's options."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(description="registered component name (see `vaeflow plugins`)")


class ScheduleSpec(Section):
    """The weight schedule of the model's scheduled term (a VAE's KL), chosen by `schedule` (`vaeflow plugins` lists
    them: constant, linear, cyclical, capacity), with that schedule's options."""

    model_config = ConfigDict(extra="allow")
    schedule: str = Field("constant", description="registered schedule name (see `vaeflow plugins`)")


class DataConfig(Section):
    """Which dataset, and how it reaches the model."""

    dataset: ComponentSpec = Field(description="dataset plugin and its options")
    pad_to: Optional[int] = Field(None, gt=0, le=MAX_SIDE,
                                  description="zero-pad images to pad_to x pad_to (e.g. 28 -> 32)")
    loader: Literal["memory", "stream"] = Field(
        "memory", description="memory: whole split as tensors on the device; stream: DataLoader with workers"
    )
    num_workers: int = Field(2, ge=0, le=MAX_WORKERS, description="DataLoader workers for loader=stream")


DEFAULT_KIND = "vae"  # model.kind when the config leaves it out (if a model of that name is registered)


class ModelSection(Section):
    """The model: its kind (`vaeflow plugins` lists the kinds), that kind's options and the components it needs.

    After discovery, `model` is a union over the registered kinds, selected by `kind`: each member holds the
    kind's own options and one field per slot (encoder, decoder, likelihood, ...), typed by the plugins."""

    model_config = ConfigDict(extra="allow")
    kind: str = Field(DEFAULT_KIND, description="the model kind (see `vaeflow plugins`)")


class ModelMethods:
    """What every typed `model:` section answers, by asking its kind's plugin class."""

    model_cls: ClassVar[Any] = None

    @property
    def capabilities(self):
        """The kind's Capabilities (continuous, discrete, sampling, log_likelihood)."""
        return self.model_cls.capabilities

    @property
    def levels(self) -> tuple[str, ...]:
        """The code levels of a discrete model, in sampling order; () for a continuous one."""
        return self.model_cls.levels_of(self)


class TrainConfig(Section):
    """Optimization: AdamW, optional clipping, seeding, device and precision."""

    epochs: int = Field(10, gt=0, le=MAX_EPOCHS)
    max_steps: Optional[int] = Field(None, gt=0, le=MAX_STEPS, description="stop after this many steps in total (smoke runs)")
    batch_size: int = Field(128, gt=0, le=MAX_BATCH)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="after warm-up: constant or cosine to 0")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="linear learning-rate warm-up steps")
    grad_clip: Optional[float] = Field(None, gt=0, description="clip the global grad norm to this (off: null)")
    seed: int = Field(0, ge=-MAX_SEED, le=MAX_SEED, description="seeds init, shuffling and sampling; same seed, same run on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU")
    bf16: bool = Field(False, description="bf16 autocast (CUDA first; works on CPU)")
    compile: bool = Field(False, description="torch.compile the model")
    num_threads: Optional[int] = Field(None, gt=0, le=MAX_WORKERS,
                                       description="CPU threads (null: this job's share of the usable CPUs among the "
                                                   "CPU jobs running at its start, kept for the whole run and on "
                                                   "resume; set it for reruns that match bit for bit under any load)")
    nproc: int = Field(1, ge=1, le=MAX_WORKERS, description="data-parallel processes for the pipeline's train stage (torchrun: NCCL on "
                       "GPUs, gloo on CPU); each takes batch_size / nproc of every global batch")
    log_every: int = Field(50, gt=0, le=MAX_STEPS, description="steps between progress/metric syncs")
    checkpoint_every: Optional[int] = Field(None, gt=0, le=MAX_STEPS, description="steps between checkpoints; always at epoch end")
    beta: ScheduleSpec = Field(default_factory=ScheduleSpec, description="KL weight schedule")
    progress: bool = Field(True, description="show a progress bar")


class EvalConfig(Section):
    """Test-split metrics."""

    iwae_k: int = Field(1000, gt=0, le=10**7, description="importance samples for the IWAE bound (Burda et al. 2016)")
    max_examples: Optional[int] = Field(None, gt=0, le=MAX_IMAGES, description="evaluate on the first N test images (null: all)")
    batch_size: int = Field(100, gt=0, le=MAX_BATCH)
    active_threshold: float = Field(0.01, gt=0, description="a unit is active if Cov_x E_q[z_i] exceeds this")
    disentanglement: bool = Field(True, description="MIG, SAP and DCI of the posterior means when the dataset "
                                                    "has known factors (e.g. shapes)")
    seed: int = Field(0, ge=-MAX_SEED, le=MAX_SEED)


class QualityConfig(Section):
    """Offline sample quality: FID- and KID-style distances in the features of a classifier trained on the data."""

    enabled: bool = Field(True, description="train the feature network and score samples (datasets with labels)")
    feature_epochs: int = Field(3, gt=0, le=MAX_EPOCHS, description="epochs of the feature network (a small conv classifier)")
    feature_batch_size: int = Field(256, gt=0, le=MAX_BATCH)
    feature_lr: float = Field(1e-3, gt=0)
    samples: int = Field(1000, gt=1, le=MAX_IMAGES, description="generated images scored against as many test images")
    kid_subsets: int = Field(10, gt=0, le=10**6, description="random subsets averaged for KID")
    kid_subset_size: int = Field(500, gt=1, le=MAX_IMAGES, description="images per KID subset (capped by the set sizes)")
    seed: int = Field(0, ge=-MAX_SEED, le=MAX_SEED)


DEFAULT_RENDERERS = ({"name": "traversal"}, {"name": "phase"}, {"name": "interpolation"}, {"name": "discrete"})


class RenderConfig(Section):
    """Images of the trained model: latent traversals, phase diagrams, interpolations, discrete traversals."""

    renderers: list[ComponentSpec] = Field(
        default_factory=lambda: [dict(r) for r in DEFAULT_RENDERERS], validate_default=True,
        description="renderer plugins with their options; those that do not apply to the model kind are skipped",
    )
    max_examples: int = Field(1000, gt=0, le=MAX_IMAGES, description="test images used for orderings and ranges (KL, quantiles)")
    seed: int = Field(0, ge=-MAX_SEED, le=MAX_SEED, description="seeds which images and samples are shown")


class TrackingConfig(Section):
    """Where runs go and what they are called."""

    runs_dir: str = Field("runs", description="parent folder of run directories")
    model_name: str = Field("vae", description="name in the MLflow model registry")
    experiment: str = Field("vaeflow", description="MLflow experiment of the pipeline runs")
    workspace: str = Field(".vaeflow", description="folder for the pipeline's cached stage outputs")
    promote_metric: str = Field("iwae_nll_nats", description="eval metric that decides promotion to champion")
    promote_lower_is_better: bool = Field(True, description="direction of promote_metric")

    @field_validator("model_name")
    @classmethod
    def _registry_name(cls, name: str) -> str:
        """A name the MLflow registry takes (no '/' or ':', not blank) and that reads the same in a models:/ URI."""
        if not name.strip() or name != name.strip() or any(c in name for c in "/:@") or name in (".", ".."):
            raise ValueError(f"{name!r} is not a registry name: MLflow names cannot be blank or contain '/' or ':', "
                             f"and '@' or spaces at the ends break models:/NAME@ALIAS; e.g. vae-fashion-mnist")
        return name


class PriorSampleConfig(Section):
    """Ancestral sampling from the priors, top then bottom."""

    n: int = Field(64, gt=0, le=10**6, description="images in the sample grid")
    temperature: float = Field(1.0, gt=0, description="divides the prior logits; < 1 sharpens")
    top_k: Optional[int] = Field(None, gt=0, le=2**31, description="sample among the k most likely codes only (null: all)")
    seed: int = Field(0, ge=-MAX_SEED, le=MAX_SEED, description="seeds the CPU generator the draws come from")


class PriorConfig(Section):
    """Autoregressive priors over the codes of a VQ model, and how they are trained and sampled.

    One field per code level that a registered model names (top, bottom, ...), added after discovery."""

    epochs: int = Field(10, gt=0, le=MAX_EPOCHS)
    max_steps: Optional[int] = Field(None, gt=0, le=MAX_STEPS, description="stop after this many steps (smoke runs)")
    batch_size: int = Field(128, gt=0, le=MAX_BATCH)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = Field("cosine")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="clip the global grad norm (off: null)")
    seed: int = Field(0, ge=-MAX_SEED, le=MAX_SEED)
    log_every: int = Field(50, gt=0, le=MAX_STEPS, description="steps between metric syncs")
    sample: PriorSampleConfig = Field(default_factory=PriorSampleConfig)


class AnyPriorConfig(PriorConfig):
    """The prior section before discovery (the static Config): level fields are accepted as they are."""

    model_config = ConfigDict(extra="allow")


class ScheduleConfig(Section):
    """When `vaeflow serve` runs the pipeline deployment: a cron expression or an interval."""

    cron: Optional[str] = Field(None, description="cron expression, e.g. '0 3 * * *' (03:00 daily)")
    interval_seconds: Optional[int] = Field(None, gt=0, le=366 * 24 * 3600, description="run every N seconds (at most a year)")
    timezone: Optional[str] = Field(None, description="IANA timezone of the cron expression, e.g. Europe/Paris")

    @model_validator(mode="after")
    def _one_kind(self) -> "ScheduleConfig":
        if (self.cron is None) == (self.interval_seconds is None):
            raise ValueError("give exactly one of cron or interval_seconds")
        return self


class Config(Section):
    """A whole vaeflow run."""

    data: DataConfig
    model: ModelSection
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    prior: AnyPriorConfig = Field(default_factory=AnyPriorConfig, description="code priors of a VQ model")
    render: RenderConfig = Field(default_factory=RenderConfig, description="rendered images of the trained model")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="offline FID/KID of generated samples")
    schedules: list[ScheduleConfig] = Field(default_factory=list, description="schedules for `vaeflow serve`")


STATIC_COMPONENT_FIELDS = {  # (section, field) -> family, besides the model's slots and the code levels
    ("data", "dataset"): "dataset",
    ("train", "beta"): "schedule",
    ("render", "renderers"): "renderer",
}
DEFAULT_SCHEDULE = "constant"  # train.beta.schedule when left out
LIST_COMPONENTS = {"renderers"}


def model_classes(registry: Registry) -> list:
    """The registered model classes, sorted by kind."""
    return [registry.get("model", name).cls for name in registry.names("model")]


def code_levels(registry: Registry) -> list[str]:
    """Every code level a registered model names, in first-seen order: the prior section's fields."""
    levels: list[str] = []
    for cls in model_classes(registry):
        levels += [lv for lv in cls.level_names if lv not in levels]
    return levels


def component_fields(registry: Registry | None = None) -> dict[tuple[str, str], str]:
    """(section, field) -> family of every plugin-selected field: data.dataset, each model slot, each code level's
    prior, render.renderers."""
    registry = registry or get_registry()
    out = dict(STATIC_COMPONENT_FIELDS)
    for cls in model_classes(registry):
        for fname, slot in cls.slots.items():
            out.setdefault(("model", fname), slot.family)
    for level in code_levels(registry):
        out[("prior", level)] = "prior"
    return out


def _component_type(registry: Registry, family: str) -> Any:
    """A discriminated union on `name` (TAGS[family] for a schedule) over the options models of one family."""
    key = TAGS.get(family, "name")
    members = []
    for name in registry.names(family):
        opts = registry.get(family, name).cls.Options
        default = name if key == "schedule" else ...  # the schedule tag may be left out (constant): keep it in dumps
        tag = (Literal[name], Field(default, description=f"{family} {name!r}"))
        ident = "".join(c if c.isalnum() else "_" for c in name)
        members.append(create_model(f"{family.title()}_{ident}", __base__=opts, **{key: tag}))
    if not members:
        return ScheduleSpec if key == "schedule" else ComponentSpec
    if len(members) == 1:
        return members[0]
    if key == "schedule":  # `schedule` may be left out for the constant default
        return Annotated[Union[tuple(Annotated[m, Tag(n)] for m, n in zip(members, registry.names(family)))],
                         Discriminator(lambda v: v.get(key, DEFAULT_SCHEDULE) if isinstance(v, dict)
                                       else getattr(v, key, None))]
    return Annotated[Union[tuple(members)], Field(discriminator="name")]


def config_model(registry: Registry | None = None) -> type[Config]:
    """Build the full Config model with each component field typed by the discovered plugins."""
    return _config_model(registry or get_registry())


def _model_member(registry: Registry, cls: type) -> type:
    """The typed `model:` section of one kind: kind tag, the kind's Options, one field per slot."""
    fields: dict[str, Any] = {"kind": (Literal[cls.name], Field(cls.name, description=f"model kind {cls.name!r}"))}
    for fname, slot in cls.slots.items():
        t = _component_type(registry, slot.family)
        if slot.required:
            fields[fname] = (t, Field(description=slot.description or None))
        elif slot.default is not None:
            fields[fname] = (t, Field(default_factory=lambda d=slot.default: dict(d), validate_default=True,
                                      description=slot.description or None))
        else:
            fields[fname] = (Optional[t], Field(None, description=slot.description or None))

    def forms(section):
        from vaeflow.core.model import form_mismatch  # vaeflow.core.model builds on this module

        for fname in cls.slots:
            spec = getattr(section, fname, None)
            if spec is not None and hasattr(spec, "name"):
                problem = form_mismatch(cls, fname, registry.get(cls.slots[fname].family, spec.name).cls, registry)
                if problem:
                    raise ValueError(f"model.{fname}: {problem}")
        return section

    def unset(data):
        """`field: null` means "not set": dropped when this kind has no such field (e.g. noise: null on a vae)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in fields or k in cls.Options.model_fields}
        return data

    ident = "".join(c if c.isalnum() else "_" for c in cls.name)
    member = create_model(f"Model_{ident}", __base__=(cls.Options, ModelMethods), __doc__=cls.__doc__,
                          __validators__={"_forms": model_validator(mode="after")(forms),
                                          "_unset": model_validator(mode="before")(unset)}, **fields)
    member.model_cls = cls
    return member


def _model_type(registry: Registry) -> Any:
    """A union over the registered model kinds, selected by `kind` (default DEFAULT_KIND when registered)."""
    classes = model_classes(registry)
    if not classes:
        return ModelSection
    default = DEFAULT_KIND if DEFAULT_KIND in registry.names("model") else None

    def tag(value: Any) -> str | None:
        if isinstance(value, dict):
            return value.get("kind", default)
        return getattr(value, "kind", None)

    members = [Annotated[_model_member(registry, cls), Tag(cls.name)] for cls in classes]
    if len(members) == 1:
        return get_args(members[0])[0]
    return Annotated[Union[tuple(members)], Discriminator(tag)]


@lru_cache(maxsize=8)
def _config_model(registry: Registry) -> type[Config]:
    sections: dict[str, Any] = {}
    fields_by_section: dict[str, dict] = {}
    for (section, fname), family in component_fields(registry).items():
        if section == "model":
            continue
        t = _component_type(registry, family)
        if fname in LIST_COMPONENTS:
            info = RenderConfig.model_fields[fname]
            field = (list[t], Field(default_factory=info.default_factory, validate_default=True,
                                    description=info.description))
        elif section == "prior":
            field = (Optional[t], Field(None, description=f"prior over the {fname} codes (null: none)"))
        elif family == "schedule":
            field = (t, Field(default_factory=lambda: {"schedule": DEFAULT_SCHEDULE}, validate_default=True,
                              description=TrainConfig.model_fields[fname].description))
        else:
            field = (t, Field(description=DataConfig.model_fields[fname].description))
        fields_by_section.setdefault(section, {})[fname] = field
    for section, base in (("data", DataConfig), ("train", TrainConfig), ("prior", PriorConfig),
                          ("render", RenderConfig)):
        typed = create_model(base.__name__, __base__=base, **fields_by_section.get(section, {}))
        sections[section] = (typed, ... if section == "data" else Field(default_factory=typed))
    sections["model"] = (_model_type(registry), Field(description=ModelSection.model_fields["kind"].description))
    return create_model("Config", __base__=Config, **sections)


# --- loading, overrides, errors -----------------------------------------------------------------
def _set_path(tree: dict, dotted: str, value: Any, origin: str) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        nxt = node.setdefault(key, {})
        if nxt is None:
            nxt = node[key] = {}
        if not isinstance(nxt, dict):
            raise ConfigError([(".".join(keys[: i + 1]), f"is not a section, cannot set {dotted} ({origin})")])
        node = nxt
    node[keys[-1]] = value


def parse_set(items: list[str]) -> list[tuple[str, Any]]:
    """Parse `--set a.b=value` items; values are YAML scalars (3, 1e-3, true, [1, 2], null)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([(item, "expected --set section.field=value, e.g. --set train.epochs=3")], "--set")
        try:
            out.append((key.strip(), load_yaml_text(raw)))
        except yaml.YAMLError as exc:
            raise ConfigError([(key, f"value {raw!r} is not valid YAML: {exc}")], "--set") from None
    return out


def env_overrides(environ: dict[str, str] | None = None) -> list[tuple[str, Any]]:
    """VAEFLOW_SECTION__FIELD=value -> (section.field, value); variables without '__' are not config."""
    environ = os.environ if environ is None else environ
    out = []
    for var, raw in sorted(environ.items()):
        if var.startswith(ENV_PREFIX) and "__" in var:
            dotted = var[len(ENV_PREFIX):].lower().replace("__", ".")
            out.append((dotted, yaml.safe_load(raw) if raw else raw))
    return out


TEMPLATES_PACKAGE = "vaeflow.configs"  # configs/ in the repository, package data in the wheel


def templates() -> dict[str, Path]:
    """The starter configs shipped with vaeflow, by name (the file's stem): {"vae-shapes-tiny": path, ...}."""
    from importlib.resources import files

    folder = Path(str(files(TEMPLATES_PACKAGE)))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def config_path(path: str | Path) -> Path:
    """The YAML file `path` names: an existing file, else a shipped template's name (with or without .yaml), else a
    ConfigError that says what exists."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = templates()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if path.is_dir():
        raise ConfigError([(str(path), directory_hint(path, name in shipped))])
    if len(path.parts) == 1 and name in shipped:
        return shipped[name]
    raise ConfigError([(str(path), f"file not found, and no template has that name; pass a YAML file, or one of "
                                   f"the templates: {', '.join(shipped)} (`vaeflow init --template NAME` copies "
                                   f"one to edit)")])


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last and drops the first)."""

    def construct_document(self, node):
        """Check every mapping of the document for duplicate keys, then construct it as SafeLoader does."""
        problems = duplicate_keys(node)
        if problems:
            raise DuplicateKeyError(problems)
        return super().construct_document(node)


class DuplicateKeyError(yaml.YAMLError):
    """Keys given twice: (dotted key path, message naming both lines) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in problems))


def duplicate_keys(node: yaml.Node, path: tuple = (), seen: set | None = None) -> list[tuple[str, str]]:
    """(dotted key, message with both lines) for each key given twice in a mapping, at any depth."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias to a node already walked
        return []
    seen.add(id(node))
    problems = []
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            line = key.start_mark.line + 1
            if name is not None and name != "<<":
                dotted = ".".join((*path, str(name)))
                if name in first:
                    problems.append((dotted, f"duplicate key {name!r} at lines {first[name]} and {line}; YAML would "
                                             f"keep only the second and silently drop the first: merge them into one"))
                else:
                    first[name] = line
            problems += duplicate_keys(value, (*path, str(name)), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += duplicate_keys(item, (*path, str(i)), seen)
    return problems


def load_yaml_text(text: str) -> Any:
    """yaml.safe_load that refuses duplicate keys (DuplicateKeyError, a yaml.YAMLError)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def directory_hint(folder: Path, template: bool) -> str:
    """What a directory given as the config is, and what to pass instead (its YAML files, a run dir's --resume)."""
    msg = "is a directory, not a YAML config file"
    if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
        msg += (f"; it is a run directory: `vaeflow train --resume {folder}` continues it, and {folder / 'config.yaml'}"
                f" is its config")
    else:
        found = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if found:
            msg += f"; pass one of the YAML files in it: {', '.join(str(p) for p in found[:5])}"
        else:
            msg += "; pass a YAML config file (it holds none), or a template name (`vaeflow init --list`)"
    if template:
        msg += f"; for the shipped template of that name, pass {folder.name.removesuffix('.yaml')}.yaml"
    return msg


def read_text_utf8(path: Path) -> str:
    """The file's text; a ConfigError naming the line, column and byte offset when it is not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([(str(path), f"cannot be read: {exc.strerror or exc}")]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([(f"{path}:{line}:{column}", f"byte 0x{raw[exc.start]:02x} at line {line}, column {column} "
                                                       f"(byte offset {exc.start}) is not UTF-8: the file must be "
                                                       f"UTF-8; save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")],
                          str(path)) from None


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping (a file, or a shipped template by name) with errors that name the file and the line."""
    path = config_path(path)
    try:
        data = load_yaml_text(read_text_utf8(path))
    except DuplicateKeyError as exc:
        raise ConfigError(exc.problems, str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError([(str(path), f"not valid YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise ConfigError([(str(path), "must be a YAML mapping with sections data, model, train, eval, tracking")])
    return data


TAG_KEYS = ("name", "schedule", "kind")  # the keys that select a union member


def _walk(model: Any, data: Any, loc: tuple) -> Any:
    """The pydantic model class that validates the value at `loc`, following union tags in `data`."""
    for part in loc:
        model = _resolve(model, data)
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = model.model_fields[part].annotation
        data = data.get(part) if isinstance(data, dict) else None
    return _resolve(model, data)


def _resolve(tp: Any, data: Any) -> Any:
    """Unwrap Optional/Annotated/Union to the member model that `data` selects."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) is Union:
        members = [m for m in get_args(tp) if m is not type(None)]
        for m in members:
            m = _resolve(m, data)
            if isinstance(m, type) and issubclass(m, BaseModel) and isinstance(data, dict):
                for key in TAG_KEYS:
                    f = m.model_fields.get(key)
                    value = data.get(key, DEFAULT_KIND if key == "kind" else None)
                    if f is not None and get_args(f.annotation) and value in get_args(f.annotation):
                        return m
        return members[0] if len(members) == 1 else None
    return tp


def format_validation_error(exc: ValidationError, model: type[BaseModel], data: dict, registry: Registry) -> list:
    """(field path, message with what is allowed) for each pydantic error."""
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        clean = _strip_tags(loc, data)
        path = ".".join(str(p) for p in clean) or "(top level)"
        msg, kind = err["msg"], err["type"]
        family = next((fam for key, fam in component_fields(registry).items() if tuple(clean[:2]) == key), None)
        if kind == "union_tag_invalid" and clean == ["model"]:
            bad = (err.get("ctx") or {}).get("tag")
            path = "model.kind"
            msg = f"unknown model kind {bad!r}; known kinds: {', '.join(registry.names('model')) or 'none'}"
        elif kind == "union_tag_not_found" and clean == ["model"]:
            got, kinds = err.get("input"), ", ".join(registry.names("model")) or "none"
            yaml_repr = lambda v: "null" if v is None else repr(v)  # noqa: E731 (as the user wrote it)
            if isinstance(got, dict):
                path, msg = "model.kind", f"{yaml_repr(got.get('kind'))} is not a model kind; choose one of: {kinds}"
            else:
                msg = (f"give a mapping with a kind, e.g. `model: {{kind: vae, latent_dim: 10}}`, not "
                       f"{yaml_repr(got)}; kinds: {kinds}")
        elif kind == "union_tag_invalid" and family:
            bad = (err.get("ctx") or {}).get("tag")
            msg = f"unknown {family} {bad!r}; known {family}s: {', '.join(registry.names(family)) or 'none'}"
        elif kind == "union_tag_not_found" and family:
            msg = f"missing `name`; choose one of: {', '.join(registry.names(family))}"
        elif kind == "literal_error" and family and clean[-1] == "name":
            msg = f"unknown {family} {err['input']!r}; known {family}s: {', '.join(registry.names(family))}"
        elif kind == "extra_forbidden":
            allowed = sorted(_fields_at(model, data, tuple(clean[:-1])))
            msg = f"unknown key {clean[-1]!r}; allowed keys here: {', '.join(allowed)}"
            if len(clean) == 2 and clean[0] == "model":  # a field of another model kind
                kinds = [c.name for c in model_classes(registry) if clean[1] in {*c.slots, *c.Options.model_fields}]
                if kinds:
                    msg += f" ({clean[1]!r} applies to kind {' or '.join(kinds)})"
        elif kind == "missing":
            msg = "required field is missing"
        elif kind == "less_than_equal":
            bound = (err.get("ctx") or {}).get("le")
            msg = f"{err['input']!r} is above the upper bound {bound}; use at most {bound}"
            if isinstance(bound, int) and bound >= 1000:  # a count, a size or a seed, not a fraction
                msg += " (a value that large is most likely a typo: as a count it would never end or never fit)"
        elif kind == "int_parsing_size":
            msg = f"{err['input']!r} is far too large for a count (a run that long would never end); give a sane integer"
        elif kind == "int_from_float":
            msg = f"{err['input']!r} is not a whole number; give an integer, e.g. 10"
        elif kind == "int_parsing" and isinstance(err["input"], str) and _is_number(err["input"]):
            msg = f"{err['input']!r} is not an integer (YAML reads it as text); give a whole number, e.g. 10"
        elif kind == "value_error":
            msg = msg.removeprefix("Value error, ")
            inner, sep, rest = msg.partition(": ")
            if sep and inner.startswith(f"{path}.") and " " not in inner:  # a validator naming the field at fault
                path, msg = inner, rest
        problems.append((path, msg))
    return problems


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _strip_tags(loc: tuple, data: Any) -> list:
    """Drop the union tags pydantic puts in error paths (model.encoder.conv.x -> model.encoder.x)."""
    clean, node = [], data
    for part in loc:
        if isinstance(node, dict) and part not in node and part in (node.get("name"), node.get("schedule"),
                                                                     node.get("kind", DEFAULT_KIND)):
            continue  # a discriminator tag, not a key the user wrote
        clean.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return clean


def _fields_at(model: type[BaseModel], data: dict, loc: tuple) -> set[str]:
    target = _walk(model, data, loc)
    if isinstance(target, type) and issubclass(target, BaseModel):
        return set(target.model_fields)
    return set()


def validate(raw: dict, registry: Registry | None = None, source: str = "config") -> Config:
    """Validate a config mapping against the discovered plugins, or raise ConfigError."""
    registry = registry or get_registry()
    model = config_model(registry)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, raw, registry), source) from None


def load_config(
    path: str | Path, sets: list[str] | tuple[str, ...] = (), environ: dict[str, str] | None = None
) -> Config:
    """Read YAML, apply VAEFLOW_* env overrides then --set overrides, and validate."""
    raw = read_yaml(path)
    for dotted, value in env_overrides(environ) + parse_set(list(sets)):
        _set_path(raw, dotted, value, "override")
    return validate(raw, source=str(path))


def apply_sets(cfg: Config, sets: list[str] | tuple[str, ...]) -> Config:
    """Apply --set overrides to an already validated config (e.g. one stored in a run dir)."""
    if not sets:
        return cfg
    raw = cfg.model_dump(mode="json")
    for dotted, value in parse_set(list(sets)):
        _set_path(raw, dotted, value, "--set")
    return validate(raw, source="--set")


def canonical_json(cfg: BaseModel | dict) -> str:
    """Sorted-key JSON of a config with every default filled in."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def hashed_dump(cfg: Config) -> dict:
    """The config as JSON data for hashing: the code priors are left out of models without code grids, and
    train.nproc at its default, so configs written before those fields keep their hashes."""
    data = cfg.model_dump(mode="json")
    if data["train"].get("nproc") == 1:  # the default: configs written before the field keep their hashes
        del data["train"]["nproc"]
    if not cfg.model.capabilities.discrete:  # code priors only apply to models with code grids
        data.pop("prior", None)
    return data


NOT_IN_RUN_HASH = ("render", "quality")  # sections that never change the trained model (keyed per stage instead)


def config_hash(cfg: Config, section: str | None = None) -> str:
    """sha256 of the canonical JSON of the config, or of one section, for caching and lineage.

    The whole-config hash (resume checks, weights metadata, registry tags) leaves out NOT_IN_RUN_HASH."""
    data = hashed_dump(cfg)
    if section is not None:
        data = data.get(section, {})
    else:
        data = {k: v for k, v in data.items() if k not in NOT_IN_RUN_HASH}
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML, every default filled in."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
