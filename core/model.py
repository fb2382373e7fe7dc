"""Building a model from the config: the model kind's plugin (`model.kind`) with the components its slots name."""

from __future__ import annotations

from vaeflow.core.beta import schedule_class
from vaeflow.core.config import Config
from vaeflow.core.errors import ConfigError
from vaeflow.core.interfaces import Model, Shape, form_of
from vaeflow.core.registry import Registry, get_registry


def data_shape(cfg: Config, registry: Registry | None = None) -> Shape:
    """(C, H, W) the model sees: the dataset's shape after data.pad_to."""
    registry = registry or get_registry()
    ds = registry.get("dataset", cfg.data.dataset.name).cls
    shape = ds(component_options(ds, cfg.data.dataset)).shape
    if cfg.data.pad_to is not None:
        c, h, w = shape
        if cfg.data.pad_to < max(h, w):
            raise ConfigError([("data.pad_to", f"{cfg.data.pad_to} is smaller than the images ({h}x{w})")])
        shape = (c, cfg.data.pad_to, cfg.data.pad_to)
    return shape


def component_options(cls: type, spec) -> object:
    """The plugin's own Options instance from a validated config spec (drops the `name` tag)."""
    return cls.Options.model_validate(spec.model_dump(exclude={"name"}))


def model_class(cfg: Config, registry: Registry | None = None) -> type[Model]:
    """The registered class of cfg.model.kind."""
    return (registry or get_registry()).get("model", cfg.model.kind).cls


def build_model(cfg: Config, shape: Shape | None = None, registry: Registry | None = None) -> Model:
    """Instantiate the model the config describes through its kind's plugin; shape errors are ConfigErrors."""
    registry = registry or get_registry()
    shape = shape or data_shape(cfg, registry)
    cls = model_class(cfg, registry)
    if cls.scheduled is None and not schedule_class(cfg.train.beta, registry).constant:
        raise ConfigError([("train.beta", f"model.kind {cls.name} has no term a beta schedule weights (no KL), so "
                            f"train.beta.schedule={cfg.train.beta.schedule} does not apply; remove train.beta")])
    if cls.scheduled is None and getattr(cfg.train.beta, "value", 1.0) != 1.0:
        raise ConfigError([("train.beta.value", f"model.kind {cls.name} has no term beta weights, so beta = "
                            f"{cfg.train.beta.value:g} would be silently ignored; remove train.beta")])

    def make(field: str, *args):
        slot = cls.slots[field]
        spec = getattr(cfg.model, field)
        if spec is None:
            return None
        comp = registry.get(slot.family, spec.name).cls
        problem = form_mismatch(cls, field, comp, registry)
        if problem:
            raise ConfigError([(f"model.{field}", problem)])
        try:
            return comp(component_options(comp, spec), *args)
        except (ValueError, RuntimeError) as exc:
            raise ConfigError([(f"model.{field}", f"{spec.name}: {exc}")]) from None

    model = cls.build(cfg.model, make, shape, cfg)
    model.check_shapes(shape)
    return model


def form_mismatch(cls: type[Model], field: str, component: type, registry: Registry) -> str | None:
    """Why `component` cannot fill the model's slot `field` (a vector encoder where a feature map is needed, or
    the reverse), naming both forms and the components that fit; None when it fits."""
    slot = cls.slots[field]
    got = form_of(component)
    if slot.form is None or got is None or got == slot.form:
        return None
    fits = [n for n in registry.names(slot.family) if form_of(registry.get(slot.family, n).cls) == slot.form]
    verb = "produces" if slot.family == "encoder" else "consumes"
    return (f"{component.name!r} is a {got.replace(' ', '-')} {slot.family} (it {verb} a {got}), but kind={cls.name} "
            f"needs a {slot.form.replace(' ', '-')} {slot.family}; choose one of: {', '.join(fits) or 'none installed'}")
