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
    assert "data" not in sidecar and not png.with_suffix(".csv").exists()


def test_save_figure_writes_the_table_it_shows_beside_it():
    """figures/<preset>/<name>.csv: the tidy rows behind the figure, named in the sidecar (figures/smol/ is
    committed with them)."""
    import pandas as pd

    cfg = config.load("tiny")
    table = pd.DataFrame({"label": ["base", "sft-0064"], "rule": ["ood", "ood"], "success_rate": [0.25, 0.125]})
    fig, ax = plt.subplots()
    ax.plot(table["success_rate"])
    png = plots.save_figure(fig, "fig_table", cfg, notebook="04_eval", data=table)
    plt.close(fig)
    assert json.loads(png.with_suffix(".json").read_text())["data"] == "fig_table.csv"
    pd.testing.assert_frame_equal(pd.read_csv(png.with_suffix(".csv")), table)
    assert not list(png.parent.glob("*.tmp-*"))


def test_a_figure_of_other_settings_is_kept_not_overwritten(caplog):
    """Re-running a notebook with a changed parameter keeps the figure the earlier settings drew (png, pdf,
    sidecar, csv) under earlier/<their config hash>/; the same settings redraw in place."""
    import pandas as pd

    def draw(cfg, level, data=None):
        fig, ax = plt.subplots()
        ax.axhline(level)
        png = plots.save_figure(fig, "fig1_success", cfg, notebook="04_eval", data=data)
        plt.close(fig)
        return png

    first, second = config.load("tiny"), config.load("tiny", eval__max_attempts=2)
    png = draw(first, 0.25, data=pd.DataFrame({"success_rate": [0.25]}))
    drawn_first = png.read_bytes()
    assert draw(first, 0.25) == png and not (png.parent / plots.EARLIER).exists(), "same settings: in place"
    draw(first, 0.25, data=pd.DataFrame({"success_rate": [0.25]}))
    with caplog.at_level("WARNING"):
        draw(second, 0.75)
    kept = png.parent / plots.EARLIER / first.section_hash()
    assert kept.name in caplog.text
    assert (kept / png.name).read_bytes() == drawn_first
    assert json.loads((kept / "fig1_success.json").read_text())["config_hash"] == first.section_hash()
    assert pd.read_csv(kept / "fig1_success.csv")["success_rate"].tolist() == [0.25]
    assert sorted(p.name for p in kept.iterdir()) == ["fig1_success.csv", "fig1_success.json", "fig1_success.pdf",
                                                      "fig1_success.png"]
    assert json.loads(png.with_suffix(".json").read_text())["config_hash"] == second.section_hash()
    assert not png.with_suffix(".csv").exists(), "no csv of the earlier settings beside the new figure"
    png.with_suffix(".json").unlink()  # a figure without its sidecar is kept too, named by its file time
    draw(first, 0.25)
    assert len(list((png.parent / plots.EARLIER).iterdir())) == 2


# ------------------------------------------------------------------------- cache keys from the imports
STAGE_MODULES = {"data": "data", "sft": "sft", "ppo": "ppo", "evaluation": "evaluate", "spectra": "spectra",
                 "restore": "restore"}


def _stage_hashes(package_dir):
    return {stage: artifacts.code_hash(module, package_dir=package_dir) for stage, module in STAGE_MODULES.items()}


def _package_copy(tmp_path):
    import shutil

    package = tmp_path / "paper_lib"
    shutil.copytree(config.PROJECT_ROOT / "paper_lib", package, ignore=shutil.ignore_patterns("__pycache__"))
    return package


def test_a_changed_reward_makes_every_stage_that_plays_the_game_stale_and_spectra_not(tmp_path):
    package = _package_copy(tmp_path)
    before = _stage_hashes(package)
    assert before == _stage_hashes(config.PROJECT_ROOT / "paper_lib")  # the copy is keyed as the original
    cards_py = package / "cards.py"
    source = cards_py.read_text()
    assert '"CORRECT": 5.0' in source
    cards_py.write_text(source.replace('"CORRECT": 5.0', '"CORRECT": 6.0'))
    after = _stage_hashes(package)
    stale = {stage for stage in STAGE_MODULES if before[stage] != after[stage]}
    assert stale >= {"data", "sft", "ppo", "evaluation"}
    # a restored checkpoint's weights do not depend on the game: its evaluation is redone, its weights kept
    assert "spectra" not in stale and "restore" not in stale
    # a plot is no stage's input
    (package / "plots.py").write_text((package / "plots.py").read_text() + "\n# restyled\n")
    assert _stage_hashes(package) == after


def test_a_changed_statistic_rebuilds_no_stage(tmp_path):
    """The bootstrap and the headline quantities (recovery) are read from cached episodes: changing them
    re-evaluates no checkpoint and rewrites no restored one, though the notebooks that tabulate them use both."""
    package = _package_copy(tmp_path)
    before = _stage_hashes(package)
    recovery_py = package / "recovery.py"
    recovery_py.write_text(recovery_py.read_text().replace("n_boot: int = 2000", "n_boot: int = 4000"))
    assert _stage_hashes(package) == before
    assert "recovery" in artifacts.imported_modules("restore_eval", package)  # the sweeps' tables do use it


def test_imported_modules_follow_imports_inside_functions_too(tmp_path):
    package = tmp_path / "paper_lib"
    package.mkdir()
    (package / "a.py").write_text("import os\nfrom . import b\n")
    (package / "b.py").write_text("def f():\n    from .c import g\n    return g\n")
    (package / "c.py").write_text("from paper_lib.d import x\n")
    (package / "d.py").write_text("x = 1\n")
    (package / "e.py").write_text("y = 2\n")
    assert artifacts.imported_modules("a", package) == ["a", "b", "c", "d"]


def test_a_rebuilt_input_stage_changes_the_key_of_its_readers(tmp_path):
    def build(out):
        (out / "x").write_text("1")

    first = artifacts.stage_key(artifacts.cached_stage(tmp_path / "data", {"stage": "data", "seed": 0}, build))
    again = artifacts.stage_key(artifacts.cached_stage(tmp_path / "data", {"stage": "data", "seed": 0}, build,
                                                       force=True))
    assert again == first  # same settings and code: the provenance (time, git) does not count
    other = artifacts.stage_key(artifacts.cached_stage(tmp_path / "data", {"stage": "data", "seed": 1}, build))
    assert other != first
    with pytest.raises(FileNotFoundError, match="no finished stage"):
        artifacts.stage_key(tmp_path / "missing")


def test_a_copy_without_git_names_its_commit_from_the_environment(tmp_path, monkeypatch):
    """The GPU machine gets the tree without .git: figure sidecars and manifests take PAPER_CODE_VERSION
    there, and a checkout's own `git describe` wins over it."""
    copy = tmp_path / "copy"
    copy.mkdir()
    monkeypatch.setattr(artifacts, "PROJECT_ROOT", copy)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above the copy either
    monkeypatch.delenv("PAPER_CODE_VERSION", raising=False)
    assert artifacts.git_version() == "unknown"
    monkeypatch.setenv("PAPER_CODE_VERSION", "abc1234")
    assert artifacts.git_version() == "abc1234"
    monkeypatch.setattr(artifacts, "PROJECT_ROOT", config.PROJECT_ROOT)
    assert artifacts.git_version() not in ("abc1234", "unknown")
