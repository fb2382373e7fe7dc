"""The stage graph: which stages a config runs, what each key covers, --until and --force, and the docs'
diagram and table, all derived from the graph (no pipeline run here)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, TINY, VAEFLOW

VQ_TINY = ROOT / "configs" / "vqvae2-shapes-tiny.yaml"


def graph_of(config: Path, sets: list[str] | None = None):
    from vaeflow.core.config import load_config
    from vaeflow.pipelines.pipeline import stage_graph

    cfg = load_config(config, sets or [])
    return cfg, stage_graph(cfg)


def test_a_vq_kind_adds_its_stages_after_train_one_prior_per_level():
    _, vae = graph_of(TINY)
    assert [s.id for s in vae.stages] == ["prepare_data", "train", "train_features", "evaluate", "render", "register"]
    _, vq = graph_of(VQ_TINY)
    assert [s.id for s in vq.stages] == ["prepare_data", "train", "extract_codes", "train_prior_top",
                                         "train_prior_bottom", "sample", "train_features", "evaluate", "render",
                                         "register"]
    # the priors reach evaluate, render and register as their optional input; one level's prior never needs another's
    assert vq.needs["train_prior_bottom"] == ["extract_codes"]
    assert {"train_prior_top", "train_prior_bottom"} <= set(vq.needs["evaluate"]) & set(vq.needs["register"])
    _, one_level = graph_of(VQ_TINY, ["model.kind=vqvae", "model.vq.strides=[4]", "prior.bottom=null"])
    assert [s.id for s in one_level.stages if s.name == "train_prior"] == ["train_prior_top"]


def test_until_takes_a_stage_and_what_it_needs_and_force_adds_what_depends_on_it():
    from vaeflow.pipelines.pipeline import plan

    cfg, _ = graph_of(VQ_TINY)
    assert plan(cfg, "render")[0] == ["prepare_data", "train", "extract_codes", "train_prior_top",
                                      "train_prior_bottom", "render"]
    assert plan(cfg, "train_prior")[0][-2:] == ["train_prior_top", "train_prior_bottom"]
    assert plan(cfg, "train_prior_bottom")[0] == ["prepare_data", "train", "extract_codes", "train_prior_bottom"]
    ids, forced = plan(cfg, None, ["train_prior_top"])
    assert forced == {"train_prior_top", "sample", "evaluate", "render", "register"}
    ids, forced = plan(cfg, "train", ["all"])
    assert ids == ["prepare_data", "train"] and forced == set(ids)  # forced stages outside `until` do not run


def test_every_key_covers_each_input_and_nothing_it_does_not_read(tmp_path):
    """Change one input's identity: exactly that stage's key changes among those reading it; change one section:
    only the stages that declare it change."""
    from vaeflow.core.config import apply_sets

    cfg, graph = graph_of(TINY)
    results = {s.id: {"sha256": f"{s.id}-0"} for s in graph.stages}

    def keys(cfg_, results_):
        return {s.id: graph.key(s, cfg_, graph.inputs_of(s, results_)) for s in graph.stages}

    base = keys(cfg, results)
    assert base == keys(cfg, results)  # deterministic
    for changed in results:
        other = {**results, changed: {"sha256": f"{changed}-1"}}
        moved = {i for i, k in keys(cfg, other).items() if k != base[i]}
        assert moved == {i for i in graph.by_id if changed in graph.needs[i]}, changed
    for override, expect in [("tracking.model_name=x", {"register"}), ("render.seed=9", {"render"}),
                             ("eval.iwae_k=3", {"evaluate"}), ("quality.samples=7", {"evaluate"}),
                             ("quality.feature_epochs=9", {"train_features", "evaluate"}),
                             ("train.lr=0.5", {"train"}), ("train.log_every=3", set())]:
        moved = {i for i, k in keys(apply_sets(cfg, [override]), results).items() if k != base[i]}
        assert moved == expect, override


def test_bad_until_or_force_exit_2_naming_the_stages_before_any_run(tmp_path):
    import os

    env = {**os.environ, "VAEFLOW_HOME": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    for args in (["--until", "bogus"], ["--force", "train_prior"]):
        proc = subprocess.run([VAEFLOW, "run", str(TINY), *args], capture_output=True, text=True, timeout=120,
                              env=env, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "prepare_data, train, train_features, evaluate, render, register" in proc.stderr
        assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())  # no store, no workspace


def test_a_bare_force_means_every_stage():
    from vaeflow.pipelines.cli import bare_force

    config = str(TINY)
    assert bare_force(["run", config, "--force"]) == ["run", config, "--force", "all"]
    assert bare_force(["run", "--force", config]) == ["run", "--force", "all", config]
    assert bare_force(["run", config, "--force", "--until", "train"])[3] == "all"
    assert bare_force(["run", config, "--force", "train"]) == ["run", config, "--force", "train"]


@pytest.mark.parametrize("config", ["vae-fashion-mnist", "vqvae2-fashion-mnist"])
def test_the_docs_show_the_graph_and_what_runs_again_as_the_code_derives_them(config):
    """docs/concepts/stages.md renders each graph from the code when the site is built (docs/_hooks/vaeflow_docs.py),
    so it cannot drift; `vaeflow stages CONFIG --markdown` prints the same graph as a mermaid diagram."""
    from vaeflow.core.config import load_config
    from vaeflow.pipelines.pipeline import describe

    from vaeflow.pipelines.pipeline import stage_graph

    assert f"<!-- vaeflow:stage-graph {config} -->" in (ROOT / "docs" / "concepts" / "stages.md").read_text()
    cfg = load_config(config)
    text, graph = describe(cfg), stage_graph(cfg)
    assert text.startswith("```mermaid")
    for stage in graph.stages:  # every stage and every edge of the graph is drawn
        assert stage.id in text
        for need in graph.needs[stage.id]:
            assert f"{need} --> {stage.id}" in text.replace('"', "")
