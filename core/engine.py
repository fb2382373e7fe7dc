"""The training engine: AdamW on the model's objective (its named loss terms, one scheduled by train.beta), exact
resume, NaN guard, atomic checkpoints. It knows nothing of KL or VQ: the model kind owns its objective."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vaeflow.core.beta import BetaSchedule
from vaeflow.core.checkpoint import (
    CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, append_metrics, begin_run, load_checkpoint, read_metrics,
    read_run_config, save_checkpoint, save_weights, weights_metadata, write_text,
)
from vaeflow.core.config import Config, config_hash
from vaeflow.core.data import Batches
from vaeflow.core.cpu import cpu_share
from vaeflow.core.errors import CheckpointError, NonFiniteError
from vaeflow.core.interfaces import Model
from vaeflow.core.model import build_model

ENGINE_TERMS = ("loss", "grad_norm")  # recorded every step with the model's terms and stats, checked at every sync
log = logging.getLogger("vaeflow.train")


def init_distributed() -> tuple[int, int]:
    """(rank, world size): joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; under torchrun, cuda means this process's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    device = torch.device(name)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW, fused where the build supports it (one kernel for all parameters)."""
    t = cfg.train
    try:
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, foreach=True)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int):
    """Linear warm-up, then constant or cosine decay to zero, per optimizer step."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "cosine":
            progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainResult:
    """What a finished `fit` returns."""

    run_dir: Path
    steps: int
    epochs: int
    img_per_s: float  # over the last epoch's step loop
    final: dict  # the last epoch's metric record


class Trainer:
    """Owns the model, optimizer, beta schedule, data and RNG streams of one run directory."""

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False,
                 train_images: torch.Tensor | None = None, callbacks: list | None = None):
        """`train_images`: a prepared train split (N, C, H, W); `callbacks`: objects with optional
        on_log(step, record) (every sync) and on_epoch(record) methods, e.g. an MLflow logger."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        t = cfg.train
        self.rank, self.world = init_distributed()
        self.main = self.rank == 0  # only rank 0 writes checkpoints, weights, metrics and logs
        self.device = resolve_device(t.device)
        torch.manual_seed(t.seed)  # model init: identical on every rank
        self.model: Model = build_model(cfg).to(self.device)
        step_model = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            step_model = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.step_model = torch.compile(step_model) if t.compile else step_model
        self.optimizer = make_optimizer(self.model, cfg)
        self.beta = BetaSchedule(t.beta)
        self.data = Batches(cfg, "train", self.device, images=train_images)
        self.callbacks = (callbacks or []) if self.main else []
        self.total_steps = t.epochs * len(self.data) if t.max_steps is None else min(t.max_steps, t.epochs * len(self.data))
        self.scheduler = make_scheduler(self.optimizer, cfg, self.total_steps)
        self.shuffle = torch.Generator().manual_seed(t.seed + 1)  # epoch permutations, CPU
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.epoch_shuffle_state = self.shuffle.get_state()
        self.hash = config_hash(cfg)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if t.bf16 else nullcontext())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.model_terms: tuple[str, ...] = ()  # the model's loss terms and stats, named at the first step
        self.scheduled = self.model.scheduled  # the term train.beta weights (e.g. kl), or None
        self.warned: set[str] = set()
        self.resumed_threads: int | None = None  # the CPU thread count the checkpoint was trained with
        self._no_norm = torch.zeros((), device=self.device)  # grad_norm term when clipping is off
        if resume:
            self._restore()
        elif self.main:
            begin_run(self.run_dir, cfg)

    # --- checkpoints -------------------------------------------------------------------------
    def _state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "shuffle": self.shuffle.get_state(),
               "shuffle_epoch_start": self.epoch_shuffle_state}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": "vaeflow-checkpoint-1", "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "beta": self.beta.state_dict(), "rng": rng,
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
            "config_hash": self.hash, "config": json.dumps(self.cfg.model_dump(mode="json"), sort_keys=True),
            "threads": torch.get_num_threads() if self.device.type == "cpu" else None,
        }

    def save(self) -> None:
        """Write checkpoints/last.pt atomically (rank 0 only)."""
        if self.main:
            save_checkpoint(self.run_dir / CHECKPOINT_FILE, self._state())

    def _restore(self) -> None:
        state = load_checkpoint(self.run_dir / CHECKPOINT_FILE, self.device)
        if state.get("config_hash") != self.hash:
            raise CheckpointError(f"{self.run_dir / CHECKPOINT_FILE} was written for another config "
                                  f"(hash {str(state.get('config_hash'))[:12]} != {self.hash[:12]}); start a new run dir")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.beta.load_state_dict(state["beta"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        threads = state.get("threads")  # None: trained on an accelerator, or a checkpoint from before it was kept
        self.resumed_threads = threads if isinstance(threads, int) and threads > 0 else None
        self.shuffle.set_state(state["rng"]["shuffle"])  # at an epoch boundary, the next epoch's order
        self.epoch_shuffle_state = state["rng"]["shuffle_epoch_start"]  # mid-epoch, this epoch's order is replayed
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        # metrics written after this checkpoint belong to the lost tail of the run, which is replayed
        if self.main and (self.run_dir / METRICS_FILE).exists():
            keep = [r for r in read_metrics(self.run_dir) if r["epoch"] <= self.epoch]
            write_text(self.run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in keep))

    # --- the hot path ------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch (B, C, H, W); returns ENGINE_TERMS then the model's terms and stats as
        one tensor, with no host sync. The loss is the weighted sum of the model's terms, its `scheduled` term
        passed through the beta schedule."""
        with self.autocast:
            out = self.step_model(x)
        loss = 0
        for name, term in out.terms.items():
            value = self.beta.penalty(term) if name == self.scheduled else term
            loss = loss + out.weights.get(name, 1.0) * value
        if not self.model_terms:
            self.model_terms = tuple(out.terms) + tuple(out.stats)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip, foreach=True)
        else:
            grad_norm = self._no_norm
        self.optimizer.step()
        self.scheduler.step()
        self.beta.step += 1
        self.step += 1
        values = [out.terms[k].detach() if k in out.terms else out.stats[k] for k in self.model_terms]
        return torch.stack([loss.detach(), grad_norm, *values])

    def _check(self, pending: list[torch.Tensor], first_step: int) -> torch.Tensor:
        """Sync the recorded terms to the host; raise NonFiniteError naming the first bad step (1-based) and term."""
        terms = torch.stack(pending).float()  # (S, 2 + model terms)
        if self.world > 1:  # every rank sees the same terms, so all stop together
            import torch.distributed as dist

            dist.all_reduce(terms)
            terms /= self.world
        terms = terms.cpu()  # the one host sync per log interval
        bad = ~torch.isfinite(terms)
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            names = ENGINE_TERMS + self.model_terms
            ckpt = self.run_dir / CHECKPOINT_FILE
            kept = f"the last good checkpoint {ckpt} is kept" if ckpt.exists() else "no checkpoint was written yet"
            raise NonFiniteError(
                f"training diverged: {names[col]} became {terms[row, col].item()} at step {first_step + row + 1} "
                f"(epoch {self.epoch + 1}); {kept}. Try a lower train.lr, set train.grad_clip, "
                f"or check the data range for the likelihood."
            )
        return terms

    def fit(self) -> TrainResult:
        """Train to cfg.train.epochs (or max_steps), checkpointing atomically, then write model.safetensors; on a
        CPU shared with other jobs, with this job's share of the threads (core.cpu)."""
        if self.device.type == "cpu":
            # denormal floats (tiny Adam moments and gradients, later in training) are slow on x86: flushing them to
            # zero keeps a later epoch as fast as the first (issue #14: 16-18k -> 20-23k img/s by epoch 3, the same
            # loss to three decimals); process-wide, like torch's thread count
            torch.set_flush_denormal(True)
        with cpu_share("train", self.cfg.train.num_threads) as self.cpu:
            self.cpu.resume(self.resumed_threads)  # another count rounds the reductions differently
            return self._fit()

    def _fit(self) -> TrainResult:
        t = self.cfg.train
        total_steps = self.total_steps
        bar = tqdm(total=total_steps, initial=self.step, unit="step", disable=not (t.progress and self.main),
                   dynamic_ncols=True)
        record, img_per_s = {}, 0.0
        self.model.train()
        try:
            while self.epoch < t.epochs and self.step < total_steps:
                if self.batch_in_epoch == 0:
                    self.epoch_shuffle_state = self.shuffle.get_state()
                else:  # resumed mid-epoch: replay this epoch's permutation
                    self.shuffle.set_state(self.epoch_shuffle_state)
                perm = torch.randperm(self.data.n, generator=self.shuffle)  # (N,)
                bar.set_description(f"epoch {self.epoch + 1}/{t.epochs}", refresh=False)
                sums, n_seen, pending, first = 0, 0, [], self.step
                epoch_start_step = self.step
                loop_time, t0 = 0.0, time.perf_counter()
                for x in self.data.epoch(perm, self.batch_in_epoch, self.rank, self.world):
                    pending.append(self.train_step(x))
                    self.batch_in_epoch += 1
                    n_seen += len(x) * self.world  # images across all ranks
                    last = self.batch_in_epoch == len(self.data) or self.step >= total_steps
                    ckpt_due = t.checkpoint_every is not None and self.step % t.checkpoint_every == 0
                    if len(pending) == t.log_every or last or ckpt_due:
                        terms = self._check(pending, first)
                        sums = sums + terms.sum(0)  # 0 + tensor on the epoch's first sync
                        rate = n_seen / max(loop_time + time.perf_counter() - t0, 1e-9)
                        bar.update(len(pending))
                        bar.set_postfix(loss=f"{terms[-1, 0]:.2f}", img_s=f"{rate:.0f}")
                        record = self._record(terms.mean(0), rate)
                        self._health(record)
                        if self.callbacks:
                            self._notify("on_log", self.step, record)
                        pending, first = [], self.step
                    if last:
                        break
                    if ckpt_due:
                        loop_time += time.perf_counter() - t0
                        self.save()
                        t0 = time.perf_counter()
                loop_time += time.perf_counter() - t0
                img_per_s = n_seen / max(loop_time, 1e-9)
                epoch_done = self.batch_in_epoch == len(self.data)
                if epoch_done:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                record = self._epoch_record(sums, max(1, self.step - epoch_start_step), img_per_s, loop_time)
                if epoch_done and self.main:
                    # before the checkpoint: a crash in between replays the epoch and rewrites this line,
                    # while the other order could lose it
                    append_metrics(self.run_dir, record)
                self.save()
                if epoch_done:
                    self._notify("on_epoch", record)
        finally:
            bar.close()
        if self.main:
            save_weights(self.run_dir / WEIGHTS_FILE, self.model, weights_metadata(self.cfg))
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        if not record and (done := read_metrics(self.run_dir)):  # resumed when already trained: its last epoch's
            record, img_per_s = done[-1], float(done[-1].get("img_per_s", 0.0))
        return TrainResult(self.run_dir, self.step, self.epoch, img_per_s, record)

    def _notify(self, event: str, *args) -> None:
        for cb in self.callbacks:
            hook = getattr(cb, event, None)
            if hook is not None:
                hook(*args)

    def _health(self, record: dict) -> None:
        """Warn once per epoch and topic about the model's health (e.g. a collapsing codebook)."""
        check = getattr(self.model, "health_warnings", None)
        for topic, message in (check(record) if (check is not None and self.main) else {}).items():
            key = f"{self.epoch}:{topic}"
            if key not in self.warned:
                self.warned.add(key)
                tqdm.write(f"warning: step {self.step}: {message}")
                log.warning("step %d: %s", self.step, message)

    def _record(self, mean_terms: torch.Tensor, img_per_s: float) -> dict:
        """Loss terms (means), beta, lr and throughput as one flat record."""
        names = ENGINE_TERMS + self.model_terms
        rec = {k: v for k, v in zip(names, mean_terms.tolist()) if k != "grad_norm" or self.cfg.train.grad_clip}
        rec.update({"beta": self.beta.beta(), "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": img_per_s,
                    "threads": torch.get_num_threads()})
        cap = self.beta.capacity()
        if cap is not None:
            rec["capacity"] = cap
        return rec

    def _epoch_record(self, sums: torch.Tensor | int, n_steps: int, img_per_s: float, seconds: float) -> dict:
        if not isinstance(sums, torch.Tensor):  # no step ran in this epoch
            sums = torch.zeros(len(ENGINE_TERMS) + len(self.model_terms))
        return {"epoch": self.epoch, "step": self.step, **self._record(sums / n_steps, img_per_s), "seconds": seconds}


def train(cfg: Config, run_dir: str | Path) -> TrainResult:
    """Train a new run in run_dir (which must not hold a run yet)."""
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT_FILE).exists() or (run_dir / WEIGHTS_FILE).exists():
        raise CheckpointError(f"{run_dir} already holds a run; use `vaeflow train --resume {run_dir}` or another --out")
    others = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() and not (run_dir / CONFIG_FILE).exists() else []
    if others:  # `--out ''` or `--out .`: a run would mix its files with these
        raise CheckpointError(f"{run_dir.absolute()} is a folder with other files ({', '.join(others[:5])}"
                              f"{', ...' if len(others) > 5 else ''}); a run gets a folder of its own: pass a new or "
                              f"empty one, e.g. --out {run_dir / 'run'}")
    before = set(run_dir.iterdir()) if run_dir.is_dir() else None  # None: this call creates the folder
    path = run_dir.absolute()
    made = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)  # the topmost folder to make
    try:
        return Trainer(cfg, run_dir).fit()
    except BaseException:
        _discard_unstarted(run_dir, before, made)
        raise


def resume(run_dir: str | Path) -> TrainResult:
    """Continue the run in run_dir from its last checkpoint, exactly."""
    cfg = read_run_config(run_dir)
    return Trainer(cfg, run_dir, resume=True).fit()


def _discard_unstarted(run_dir: Path, before: set[Path] | None, made: Path | None) -> None:
    """After a new run failed before its first checkpoint (nothing to resume), remove what it wrote: the folder when
    it made it (and the parents it made, when empty), else the files it added. A run with a checkpoint or weights is
    kept, and a resumed run never gets here."""
    import shutil

    if int(os.environ.get("RANK", "0")) != 0 or not run_dir.is_dir():
        return  # only rank 0 writes the run folder
    if (run_dir / CHECKPOINT_FILE).exists() or (run_dir / WEIGHTS_FILE).exists():
        return
    for path in [run_dir] if before is None else sorted(set(run_dir.iterdir()) - before):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if before is None and made is not None and made != run_dir.absolute():
        for parent in run_dir.absolute().parents:  # up to the first folder this run made, while empty
            try:
                parent.rmdir()
            except OSError:
                break
            if parent == made:
                break
