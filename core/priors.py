"""Code grids and their priors: extract a VQ model's codes, train an autoregressive prior per level, check lineage.

A codes folder holds `codes.safetensors` ({split}/{level} -> (N, h, w) int16, int32 for K > 32768)
and `codes.json`, which names the stage-1 model (weights sha256, config hash, run) and its codebook hash.
A prior folder holds `prior.safetensors` and `prior.json` with the same lineage; loading a
prior next to a stage-1 model whose codebook hash differs is refused.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from vaeflow.core.checkpoint import atomic_write, load_checkpoint, read_record, save_checkpoint, write_text
from vaeflow.core.config import PriorConfig
from vaeflow.core.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from vaeflow.core.interfaces import Prior, file_sha256
from vaeflow.core.registry import Registry, get_registry

CODES_FILE, CODES_MANIFEST = "codes.safetensors", "codes.json"
PRIOR_WEIGHTS, PRIOR_INFO, PRIOR_CHECKPOINT = "prior.safetensors", "prior.json", "checkpoints/last.pt"
LN2 = math.log(2.0)


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")  # what loading does not read is kept as it is


class PriorLevel(_Record):
    """One level of a prior.json's `levels`: its code grid, codebook size and the level it is conditioned on."""

    grid: list[int]
    codebook_size: int
    condition: Optional[str] = None


class PriorSpec(_Record):
    """A prior.json's `spec`: the prior plugin's name and its options."""

    name: str


class PriorLineage(_Record):
    """A prior.json's `lineage`: the stage-1 model whose codes it was trained on."""

    codebook_sha256: str
    stage1_weights_sha256: str


class PriorInfo(_Record):
    """What loading a prior reads from its prior.json."""

    level: str
    levels: dict[str, PriorLevel]
    spec: PriorSpec
    lineage: PriorLineage
    package: Optional[str] = None


# --- codes -----------------------------------------------------------------------------------
@torch.no_grad()
def extract_codes(model, images: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Code indices of every image, per level: (N, C, H, W) in [0, 1] -> {level: (N, h, w) int64} on the CPU."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {level: [] for level in model.levels}
    for batch in images.split(batch_size):
        for level, codes in model.encode_codes(batch.to(model.device)).items():
            parts[level].append(codes.cpu())
    return {level: torch.cat(chunks) for level, chunks in parts.items()}


def write_codes(folder: str | Path, model, splits: dict[str, torch.Tensor], stage1: dict) -> dict:
    """Extract and write the codes of each split with their manifest; returns the manifest."""
    folder = Path(folder)
    tensors, levels = {}, {}
    for split, images in splits.items():
        for level, codes in extract_codes(model, images).items():
            small = model.codebook_sizes[level] <= torch.iinfo(torch.int16).max + 1
            tensors[f"{split}/{level}"] = codes.to(torch.int16 if small else torch.int32).contiguous()  # (N, h, w)
            counts = torch.bincount(codes.flatten(), minlength=model.codebook_sizes[level])  # (K,)
            levels.setdefault(level, {"grid": list(model.grids[level]), "codebook_size": model.codebook_sizes[level],
                                      "condition": model.condition_of(level)})
            levels[level][f"{split}_codes_used"] = int((counts > 0).sum())
    atomic_write(folder / CODES_FILE, lambda tmp: safetensors.torch.save_file(tensors, tmp))
    stage1 = {**stage1, "state_sha256": model.state_hash()}
    manifest = {
        "version": 1, "stage1": stage1, "codebook_sha256": model.codebook_hash(), "levels": levels,
        "splits": {split: len(images) for split, images in splits.items()},
        "codes_sha256": file_sha256(folder / CODES_FILE),
    }
    write_text(folder / CODES_MANIFEST, json.dumps(manifest, indent=2))  # last: marks the folder complete
    return manifest


def load_codes(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, {split/level: (N, h, w) int64}) after checking the file's sha256."""
    folder = Path(folder)
    mpath, tpath = folder / CODES_MANIFEST, folder / CODES_FILE
    if not mpath.is_file() or not tpath.is_file():
        raise DataError(f"{folder} holds no extracted codes (missing {CODES_MANIFEST} or {CODES_FILE}); "
                        "run the extract_codes stage")
    manifest = json.loads(mpath.read_text())
    if file_sha256(tpath) != manifest.get("codes_sha256"):
        raise DataError(f"{tpath}: checksum mismatch with {mpath}; the codes are corrupt: delete {folder}")
    return manifest, {k: v.long() for k, v in safetensors.torch.load_file(tpath).items()}


# --- priors ----------------------------------------------------------------------------------
def condition_level(level: str, levels: dict) -> str | None:
    """The level whose codes condition this level's prior, as the model named it in the codes manifest (manifests
    written before it was recorded: the VQ-VAE-2 rule, bottom on top)."""
    info = levels[level]
    if "condition" in info:
        return info["condition"]
    return "top" if level == "bottom" and "top" in levels else None


def prior_shapes(level: str, levels: dict) -> tuple[int, tuple[int, int], tuple[int, tuple[int, int]] | None]:
    """(K, grid, condition) of a level's prior; condition = (K, grid) of the conditioning level, or None."""
    info = levels[level]
    given = condition_level(level, levels)
    condition = None if given is None else (levels[given]["codebook_size"], tuple(levels[given]["grid"]))
    return info["codebook_size"], tuple(info["grid"]), condition


def build_prior(spec: dict, level: str, levels: dict, registry: Registry | None = None) -> Prior:
    """A prior plugin for one level from its config spec ({name, **options}); bad options are ConfigErrors."""
    registry = registry or get_registry()
    cls = registry.get("prior", spec["name"]).cls
    k, grid, condition = prior_shapes(level, levels)
    try:
        return cls(cls.Options.model_validate({k2: v for k2, v in spec.items() if k2 != "name"}), k, grid, condition)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError([(f"prior.{level}", f"{spec['name']}: {exc}")]) from None


def _condition(level: str, levels: dict, codes: dict[str, torch.Tensor], split: str) -> torch.Tensor | None:
    given = condition_level(level, levels)
    return None if given is None else codes[f"{split}/{given}"]


@torch.no_grad()
def prior_metrics(prior: Prior, codes: torch.Tensor, condition: torch.Tensor | None, batch_size: int = 500) -> dict:
    """NLL in bits per code and next-code accuracy of a prior on held-out codes (N, h, w)."""
    prior.eval()
    device = next(prior.parameters()).device
    nll, correct, n = 0.0, 0, codes.numel()
    for i in range(0, len(codes), batch_size):
        x = codes[i:i + batch_size].to(device)  # (B, h, w)
        c = None if condition is None else condition[i:i + batch_size].to(device)
        logits = prior(x, c).float()  # (B, K, h, w)
        nll += torch.nn.functional.cross_entropy(logits, x, reduction="sum").item()
        correct += int((logits.argmax(1) == x).sum())
    k = prior.codebook_size
    return {"nll_bits_per_code": nll / n / LN2, "accuracy": correct / n, "uniform_bits_per_code": math.log2(k),
            "nll_over_uniform": nll / n / LN2 / math.log2(k), "codes": n}


def train_prior(spec: dict, level: str, manifest: dict, codes: dict[str, torch.Tensor], pcfg: PriorConfig,
                run_dir: str | Path, device: torch.device, callbacks: list | None = None, progress: bool = True) -> dict:
    """Train one level's prior by cross-entropy on the train codes; writes prior.safetensors and prior.json
    (lineage + held-out metrics) atomically. A checkpoint is written at every epoch end, and a re-run resumes
    from it (a crash mid-epoch repeats that epoch)."""
    run_dir = Path(run_dir)
    torch.manual_seed(pcfg.seed)
    prior = build_prior(spec, level, manifest["levels"]).to(device)
    train_codes, train_cond = codes[f"train/{level}"], _condition(level, manifest["levels"], codes, "train")
    optimizer = torch.optim.AdamW(prior.parameters(), lr=pcfg.lr, weight_decay=pcfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_codes) / pcfg.batch_size)
    total = pcfg.epochs * steps_per_epoch if pcfg.max_steps is None else min(pcfg.max_steps, pcfg.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total))))
        if pcfg.lr_schedule == "cosine" else 1.0)
    shuffle = torch.Generator().manual_seed(pcfg.seed + 1)
    epoch, step = 0, 0
    ckpt = run_dir / PRIOR_CHECKPOINT
    if ckpt.exists():
        state = load_checkpoint(ckpt, device)
        prior.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        shuffle.set_state(state["shuffle"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        epoch, step = state["epoch"], state["step"]
    prior.train()
    bar = tqdm(total=total, initial=step, unit="step", desc=f"{level} prior", disable=not progress, dynamic_ncols=True)
    while epoch < pcfg.epochs and step < total:
        perm = torch.randperm(len(train_codes), generator=shuffle)  # (N,)
        pending, t0, seen = [], time.perf_counter(), 0
        for i in range(0, len(perm), pcfg.batch_size):
            idx = perm[i:i + pcfg.batch_size]
            x = train_codes[idx].to(device)  # (B, h, w)
            c = None if train_cond is None else train_cond[idx].to(device)
            loss = torch.nn.functional.cross_entropy(prior(x, c), x)  # nats per code
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if pcfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(prior.parameters(), pcfg.grad_clip, foreach=True)
            optimizer.step()
            scheduler.step()
            step, seen = step + 1, seen + len(idx)
            pending.append(loss.detach())
            if len(pending) == pcfg.log_every or step >= total or i + pcfg.batch_size >= len(perm):
                losses = torch.stack(pending).cpu()  # the one host sync per log interval
                if not torch.isfinite(losses).all():
                    raise NonFiniteError(f"the {level} prior diverged at step {step}: loss {losses.tolist()[-1]}; "
                                         f"try a lower prior.lr or set prior.grad_clip")
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.update(len(losses))
                bar.set_postfix(bits_per_code=f"{float(losses[-1]) / LN2:.3f}")
                for cb in callbacks or []:
                    if hasattr(cb, "on_log"):
                        cb.on_log(step, {f"prior_{level}/nll_bits_per_code": float(losses.mean()) / LN2,
                                         f"prior_{level}/codes_per_s": rate * train_codes[0].numel(),
                                         f"prior_{level}/lr": optimizer.param_groups[0]["lr"]})
                pending = []
            if step >= total:
                break
        epoch += 1
        state = {"model": prior.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "shuffle": shuffle.get_state(),
                 "rng": torch.get_rng_state(), "epoch": epoch, "step": step}
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        save_checkpoint(ckpt, state)
    bar.close()
    metrics = prior_metrics(prior, codes[f"test/{level}"], _condition(level, manifest["levels"], codes, "test"))
    tensors = {k: v.detach().contiguous().cpu() for k, v in prior.state_dict().items()}
    atomic_write(run_dir / PRIOR_WEIGHTS, lambda tmp: safetensors.torch.save_file(tensors, tmp))
    info = {"format": "vaeflow-prior-1", "level": level, "spec": spec, "levels": manifest["levels"],
            "lineage": lineage_of(manifest), "steps": step, "epochs": epoch, "test": metrics,
            "weights_sha256": file_sha256(run_dir / PRIOR_WEIGHTS), "package": _package(spec["name"])}
    write_text(run_dir / PRIOR_INFO, json.dumps(info, indent=2))
    return info


def lineage_of(codes_manifest: dict) -> dict:
    """The stage-1 identity a prior is tied to: its weights, config and codebook hashes."""
    return {"stage1_weights_sha256": codes_manifest["stage1"]["weights_sha256"],
            "stage1_state_sha256": codes_manifest["stage1"].get("state_sha256", ""),
            "stage1_config_hash": codes_manifest["stage1"].get("config_hash", ""),
            "codebook_sha256": codes_manifest["codebook_sha256"]}


def _package(name: str) -> str:
    return get_registry().get("prior", name).package


def load_prior(folder: str | Path, model=None, device: str | torch.device = "cpu", level: str | None = None) -> Prior:
    """Rebuild a trained prior; with `model`, refuse it unless it was trained on that model's codebooks;
    with `level`, refuse a prior for another level."""
    folder = Path(folder)
    path = folder / PRIOR_INFO
    if not folder.is_dir():
        raise CheckpointError(f"prior folder {folder} does not exist; pass the run folder of a train_prior stage "
                              f"(a folder under .vaeflow/priors where `vaeflow run` ran), one per level, top first")
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a trained prior (no {PRIOR_INFO}); train it with `vaeflow run`")
    info = read_record(path, PriorInfo, "the train_prior stage writes it; run that stage again (`vaeflow run CONFIG "
                                        "--force train_prior_LEVEL`) or use the registered model's priors").model_dump()
    if level is not None and info["level"] != level:
        raise CheckpointError(f"{folder} is the {info['level']} prior, but it was given for the {level} level "
                              f"(pass the priors top first)")
    if model is not None:
        check_lineage(info, model, str(folder))
    if info["spec"]["name"] not in get_registry().entries.get("prior", {}):
        raise CheckpointError(f"the prior in {folder} needs the prior plugin {info['spec']['name']!r} from the "
                              f"package {info.get('package')!r}, which is not installed here")
    prior = build_prior(info["spec"], info["level"], info["levels"])
    try:
        prior.load_state_dict(safetensors.torch.load_file(folder / PRIOR_WEIGHTS))
    except Exception as exc:
        raise CheckpointError(f"{folder / PRIOR_WEIGHTS} is missing, corrupt or does not match {PRIOR_INFO}: "
                              f"{str(exc).splitlines()[0][:200]}") from None
    return prior.to(device).eval()


def load_priors(model, priors: dict) -> dict:
    """{level: trained code prior} from train_prior stage results {level: result}, each checked against `model`."""
    return {level: load_prior(p["run_dir"], model, model.device, level) for level, p in priors.items()}


def check_lineage(info: dict, model, where: str) -> None:
    """A CheckpointError unless the prior was trained on this exact stage-1 model (its state hash; the codebook
    hash explains a mismatch of the code space)."""
    lineage = info["lineage"]
    if info["level"] not in model.levels:
        raise CheckpointError(f"{where} is a prior for the {info['level']} level, but the model has levels {model.levels}")
    advice = ("Use the priors registered with this model version, or retrain them (`vaeflow run` re-runs "
              "extract_codes and train_prior)")
    want, got = lineage["codebook_sha256"], model.codebook_hash()
    if want != got:
        raise CheckpointError(
            f"the {info['level']} prior in {where} was trained on the codes of another stage-1 model "
            f"(codebook sha256 {want[:12]}..., weights {lineage['stage1_weights_sha256'][:12]}...), "
            f"but this model's codebook sha256 is {got[:12]}...; its samples would be meaningless. {advice}")
    state = lineage.get("stage1_state_sha256")
    if state and state != model.state_hash():
        raise CheckpointError(
            f"the {info['level']} prior in {where} was trained with another version of this stage-1 model: the "
            f"codebooks match but the encoder or decoder weights differ (state sha256 {state[:12]}... vs "
            f"{model.state_hash()[:12]}...). {advice}")
