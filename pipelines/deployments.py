"""Prefect deployments: vae_pipeline and each stage flow (or vqvae2_pipeline for a VQ config), served for the UI."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from core.config import ScheduleConfig


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


def build_deployments(config_path: Path, overrides: list[str], schedules: list[ScheduleConfig], name: str) -> list:
    """RunnerDeployments whose parameters (config path + overrides) the UI shows as a validated form."""
    from core.config import VQ_KINDS, load_config
    from pipelines.flows import STAGE_FLOWS, vae_pipeline

    cfg = load_config(config_path, overrides)
    # the resolved config is the default of the `config` parameter, so the UI shows its fields as a form
    params = {"config_path": str(config_path), "overrides": [], "config": cfg.model_dump(mode="json")}
    if cfg.model.kind in VQ_KINDS:
        from pipelines.vq_flows import vqvae2_pipeline

        return [vqvae2_pipeline.to_deployment(name=name, parameters=params, schedules=to_prefect_schedules(schedules),
                                              description=f"vaeflow VQ pipeline for {config_path.name}",
                                              tags=["vaeflow", "vq"])]
    deployments = [vae_pipeline.to_deployment(name=name, parameters=params, schedules=to_prefect_schedules(schedules),
                                              description=f"vaeflow pipeline for {config_path.name}", tags=["vaeflow"])]
    for stage, flow_ in STAGE_FLOWS.items():
        deployments.append(flow_.to_deployment(name=name, parameters=params, tags=["vaeflow", stage],
                                               description=f"vaeflow pipeline up to {stage}"))
    return deployments


def serve_deployments(config_path: Path, overrides: list[str], schedules: list[ScheduleConfig], name: str) -> None:
    """Register the deployments with the Prefect server and run their flow runs until interrupted."""
    from prefect import serve

    serve(*build_deployments(config_path, overrides, schedules, name))
