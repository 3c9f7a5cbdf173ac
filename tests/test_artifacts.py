"""Artifacts: run-dir paths, manifests, skip-if-done, atomic builds and figure provenance."""
import json

import matplotlib.pyplot as plt
import pytest

from paper_lib import artifacts, config, plots


def test_paths_live_under_the_runs_root(tmp_path):
    cfg = config.load("tiny")
    assert artifacts.run_dir(cfg) == tmp_path / "runs" / "tiny"
    assert artifacts.data_dir(cfg).parent == artifacts.run_dir(cfg)
    assert artifacts.figures_dir(cfg) == tmp_path / "figures" / "tiny"


def test_cached_stage_skips_when_the_spec_matches_and_rebuilds_when_it_changes(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        (out / "result.txt").write_text(str(len(calls)))

    out = tmp_path / "stage"
    artifacts.cached_stage(out, {"stage": "x", "lr": 1e-3}, build)
    artifacts.cached_stage(out, {"stage": "x", "lr": 1e-3}, build)
    assert len(calls) == 1
    artifacts.cached_stage(out, {"stage": "x", "lr": 2e-3}, build)
    assert len(calls) == 2 and (out / "result.txt").read_text() == "2"
    artifacts.cached_stage(out, {"stage": "x", "lr": 2e-3}, build, force=True)
    assert len(calls) == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lr"] == 2e-3 and "git" in manifest["provenance"]


def test_an_interrupted_build_leaves_the_previous_result_intact(tmp_path):
    out = tmp_path / "stage"
    artifacts.cached_stage(out, {"v": 1}, lambda d: (d / "result.txt").write_text("good"))

    def crash(d):
        (d / "result.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        artifacts.cached_stage(out, {"v": 2}, crash)
    assert (out / "result.txt").read_text() == "good"
    assert artifacts.manifest_matches(out, {"v": 1}) and not artifacts.manifest_matches(out, {"v": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]  # no partial directory left behind


def test_code_hash_follows_the_source_of_the_named_modules():
    assert artifacts.code_hash("cards") != artifacts.code_hash("data")
    assert artifacts.code_hash("cards", "data") == artifacts.code_hash("data", "cards")


def test_save_figure_writes_png_pdf_and_a_provenance_sidecar():
    cfg = config.load("tiny")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = plots.save_figure(fig, "fig_test", cfg, notebook="01_data", sources=["runs/tiny/data"])
    plt.close(fig)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert sidecar["notebook"] == "01_data" and sidecar["preset"] == "tiny"
    assert sidecar["config_hash"] == cfg.section_hash()
    assert sidecar["sources"] == ["runs/tiny/data"] and sidecar["code_version"]
