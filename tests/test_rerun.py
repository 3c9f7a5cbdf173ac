"""Re-running a notebook after something changed: a setting (the log says which, and going back to settings
already trained reuses that run), a runs/ directory copied elsewhere (still up to date), or a damaged cache
(computed again, or one line naming the file and the fix). Tiny checkpoints built here; no training."""
import json
import logging
import shutil

import pandas as pd
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from paper_lib import artifacts, claims, config, data, evaluate, launch, restore, rl_run, sft, spectra


def tiny_qwen(path, seed):
    torch.manual_seed(seed)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    return path


def truncate_half(path):
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


# ----------------------------------------------------------------------------- a changed setting
def test_spec_changes_names_each_setting_that_differs():
    old = {"sft": {"learning_rate": 0.01, "seed": 1}, "code": "a" * 16, "provenance": {"git": "x"}}
    new = {"sft": {"learning_rate": 0.002, "seed": 1}, "code": "b" * 16}
    assert artifacts.spec_changes(old, new) == "code, sft.learning_rate 0.01 -> 0.002"
    assert artifacts.spec_changes(old, {**old, "provenance": {"git": "y"}}) == "the same settings"
    assert artifacts.spec_changes(None, new) == "no readable record of its settings"
    many = {"sft": {f"k{i}": i for i in range(6)}}
    assert artifacts.spec_changes({"sft": {}}, many, limit=2).endswith("and 4 more")


def test_a_run_moved_aside_for_new_settings_says_which_changed(tmp_path, caplog):
    out = tmp_path / "sft"
    out.mkdir()
    (out / artifacts.RUN_SPEC).write_text(json.dumps({"stage": "sft", "sft": {"learning_rate": 0.01}}))
    with caplog.at_level(logging.WARNING, logger="paper_lib.artifacts"):
        artifacts.prepare_run_dir(out, {"stage": "sft", "sft": {"learning_rate": 0.002}}, False, "an SFT run")
    assert "sft.learning_rate 0.01 -> 0.002" in caplog.text
    assert len(list(tmp_path.glob("sft.stale-*"))) == 1


def test_data_rebuilt_without_another_notebooks_override_says_so(caplog):
    data.build(config.load("tiny", **{"data.sft_size": 512}))  # 01_data with an override
    with caplog.at_level(logging.WARNING, logger="paper_lib.artifacts"):
        data.build(config.load("tiny"))  # 02_sft without it
    assert "rebuilding" in caplog.text and "data.sft_size 512 -> 1024" in caplog.text


def _finish(out, spec, seed):
    """A finished training directory of `spec`, as prepare_run_dir and a run's last save leave it."""
    artifacts.prepare_run_dir(out, spec, False, "a run")
    tiny_qwen(out / "checkpoint-4", seed)
    artifacts.write_manifest(out, spec)


def test_going_back_to_earlier_settings_reuses_the_run_moved_aside(tmp_path):
    out = tmp_path / "rl"
    a, b, c = ({"stage": "rl", "lr": lr} for lr in (1e-4, 2e-4, 3e-4))
    _finish(out, a, 0)
    weights_a = (out / "checkpoint-4" / "model.safetensors").read_bytes()
    _finish(out, b, 1)  # moves a aside
    assert not artifacts.reuse_earlier_run(out, c, "redo it")  # nothing of c's settings: nothing moves
    assert artifacts.manifest_matches(out, b) and len(list(tmp_path.glob("rl.stale-*"))) == 1
    assert artifacts.reuse_earlier_run(out, a, "redo it")
    assert artifacts.manifest_matches(out, a)
    assert (out / "checkpoint-4" / "model.safetensors").read_bytes() == weights_a
    kept = list(tmp_path.glob("rl.stale-*"))
    assert len(kept) == 1 and artifacts.manifest_matches(kept[0], b)  # b's run is kept, not replaced


def test_a_damaged_earlier_run_is_not_reused_and_stays_where_it_is(tmp_path):
    out = tmp_path / "rl"
    a, b = {"stage": "rl", "lr": 1}, {"stage": "rl", "lr": 2}
    _finish(out, a, 0)
    _finish(out, b, 1)
    (earlier,) = tmp_path.glob("rl.stale-*")
    truncate_half(earlier / "checkpoint-4" / "model.safetensors")
    assert not artifacts.reuse_earlier_run(out, a, "redo it")
    assert earlier.is_dir() and artifacts.manifest_matches(out, b)


def test_sft_run_back_on_earlier_settings_trains_nothing(tiny_base, monkeypatch):
    shutil.copytree(tiny_base.path, artifacts.base_model_dir(config.load("tiny")))
    first, second = config.load("tiny"), config.load("tiny", **{"sft.learning_rate": 2e-3})
    out = artifacts.sft_dir(first)
    trained = []

    def fake_training(cfg, module, section, extra=(), stream=True, keep_log_in=None):  # what the stage leaves
        trained.append(cfg.sft.learning_rate)
        _finish(out, sft.manifest_spec(cfg), len(trained))

    monkeypatch.setattr(launch, "run_stage", fake_training)
    sft.run(first)
    sft.run(second)
    assert trained == [first.sft.learning_rate, 2e-3]
    assert sft.run(first) == out and trained == [first.sft.learning_rate, 2e-3]  # reused, not trained
    assert artifacts.manifest_matches(out, sft.manifest_spec(first))



def test_a_run_moved_back_shows_its_own_log_not_the_last_trained(tiny_base, monkeypatch):
    shutil.copytree(tiny_base.path, artifacts.base_model_dir(config.load("tiny")))
    first, second = config.load("tiny"), config.load("tiny", **{"sft.learning_rate": 2e-3})
    out = artifacts.sft_dir(first)

    def fake_stage(command, log_path, stream=True):  # appends to the shared stage log, as the real one does
        cfg = second if any("2e-3" in c or "0.002" in c for c in command) else first
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as fh:
            fh.write(f"trained with lr {cfg.sft.learning_rate}\n")
        _finish(out, sft.manifest_spec(cfg), 0)
        return 0, ""

    monkeypatch.setattr(launch, "run_streamed", fake_stage)
    sft.run(first)
    sft.run(second)
    assert sft.log_tail(second, 5) == "trained with lr 0.002"
    sft.run(first)  # moved back from its aside, not trained
    assert sft.log_tail(first, 5) == f"trained with lr {first.sft.learning_rate}"
    assert launch.stage_log(first, "sft").read_text().count("trained with") == 2  # the shared log keeps both

# ----------------------------------------------------------------------------- a runs/ moved whole
@pytest.fixture
def evaluated(monkeypatch):
    """(cfg, checkpoint, its first episodes, the checkpoints played so far): sft-0004 under runs/, evaluated
    once by a stand-in for the model's play (two hands per rule, the first solved)."""
    cfg = config.load("tiny")
    played = []

    def play(cfg, checkpoint, hands, state, progress=False):
        played.append(checkpoint)
        return [{"rule": rule, "hand": i, "repeat": 0, "success": i == 0, "attempts": 1}
                for rule in hands for i in range(2)]

    monkeypatch.setattr(evaluate, "_play", play)
    checkpoint = artifacts.Checkpoint("sft-0004", "sft", 4, tiny_qwen(artifacts.sft_dir(cfg) / "checkpoint-4", 0))
    return cfg, checkpoint, evaluate.evaluate_checkpoint(cfg, checkpoint), played


def test_later_notebooks_refuse_04s_results_played_under_other_settings_or_weights(evaluated):
    """05-08 set 04's episodes of the named checkpoints beside their own: under an eval override 04 did not
    share, or after another SFT run's checkpoint took a label's place, they would mix two evaluations."""
    cfg, checkpoint, _, played = evaluated
    tiny_qwen(artifacts.sft_dir(cfg) / "checkpoint-8", 1)
    evaluate.sweep(cfg)
    table, named = evaluate.load_results(cfg)
    assert (named.inter_sft, named.full_sft) == ("sft-0004", "sft-0008")
    with pytest.raises(artifacts.ArtifactError, match=r"04_eval's episodes of sft-0004 were played otherwise than "
                                                      r"this notebook would \(eval.max_new_tokens 96 -> 16\); rerun "
                                                      r"notebooks/04_eval.py .*--from 4\)"):
        evaluate.load_results(config.load("tiny", eval__max_new_tokens=16))
    with pytest.raises(artifacts.ArtifactError, match=r"sft-0004 were played otherwise .*\(hands\)"):
        evaluate.load_results(config.load("tiny", data__test_seed=7))
    shutil.rmtree(checkpoint.path)
    tiny_qwen(checkpoint.path, 2)  # another run's checkpoint-4, moved back after 04 ran
    with pytest.raises(artifacts.ArtifactError, match=r"episodes of sft-0004 were played otherwise .*\(weights\)"):
        evaluate.load_results(cfg)
    evaluate.sweep(cfg)  # 04 again
    assert evaluate.load_results(cfg)[1] == named


def test_an_rl_run_from_another_sft_run_is_named_in_a_warning(evaluated, caplog):
    cfg, checkpoint, _, _ = evaluated
    table = pd.DataFrame([{"label": "sft-0004", "stage": "sft", "step": 4, "rule": "ood", "success_rate": 0.5},
                          {"label": "rl-0002", "stage": "rl", "step": 2, "rule": "ood", "success_rate": 0.6}])
    artifacts.rl_dir(cfg).mkdir(parents=True)
    artifacts.write_manifest(artifacts.rl_dir(cfg), {"stage": "rl", "init_weights": artifacts.fingerprint(checkpoint.path)})
    with caplog.at_level(logging.WARNING, logger="paper_lib.evaluate"):
        assert evaluate.named_checkpoints(cfg, table).rl == "rl-0002"
    assert "did not start" not in caplog.text
    shutil.rmtree(checkpoint.path)
    tiny_qwen(checkpoint.path, 3)  # another SFT run's checkpoint-4 moved back after PPO ran
    with caplog.at_level(logging.WARNING, logger="paper_lib.evaluate"):
        evaluate.named_checkpoints(cfg, table)
    assert f"did not start from full SFT sft-0004 as it is now on disk ({checkpoint.path})" in caplog.text


def test_a_restore_of_other_settings_is_moved_aside_and_back_not_rewritten(tmp_path, caplog):
    cfg = config.load("tiny")
    target = artifacts.Checkpoint("t", "sft", 4, tiny_qwen(tmp_path / "target", 0))
    source = artifacts.Checkpoint("s", "base", 0, tiny_qwen(tmp_path / "source", 1))
    top, more = restore.Plan(layers=(0, 1), top=4), restore.Plan(layers=(0, 1), top=8)
    first = restore.restored_checkpoint(cfg, "r", target, source, top).path
    stamp = artifacts.fingerprint(first)
    restore.restored_checkpoint(cfg, "r", target, source, more)
    aside = sorted(first.parent.glob("r.stale-*"))
    assert len(aside) == 1 and artifacts.fingerprint(aside[0]) == stamp  # kept whole, not written over
    assert artifacts.read_manifest(first)["plan"]["top"] == 8
    back = restore.restored_checkpoint(cfg, "r", target, source, top).path  # going back: moved back
    assert artifacts.fingerprint(back) == stamp and artifacts.read_manifest(back)["plan"]["top"] == 4


def test_a_runs_dir_copied_elsewhere_is_still_up_to_date(evaluated, tmp_path, monkeypatch):
    cfg, checkpoint, first, played = evaluated
    spec_here = rl_run.run_spec(cfg, checkpoint.path)

    moved = tmp_path / "elsewhere" / "runs"
    shutil.copytree(artifacts.runs_root(), moved)  # copy2 keeps the mtimes, as cp -a, rsync -a and tar do
    monkeypatch.setenv("PAPER_RUNS_DIR", str(moved))
    ck_there = artifacts.sft_dir(cfg) / "checkpoint-4"
    again = evaluate.evaluate_checkpoint(cfg, artifacts.Checkpoint("sft-0004", "sft", 4, ck_there))
    assert len(played) == 1 and again.equals(first)
    assert rl_run.run_spec(cfg, ck_there) == spec_here  # RL from the copied SFT checkpoint is not redone



def test_going_back_to_earlier_eval_settings_reads_their_episodes(evaluated, caplog):
    cfg, checkpoint, first, played = evaluated
    other = config.load("tiny", **{"eval.max_attempts": 3})
    with caplog.at_level(logging.INFO, logger="paper_lib.artifacts"):
        evaluate.evaluate_checkpoint(other, checkpoint)
    assert len(played) == 2 and "eval.max_attempts 5 -> 3" in caplog.text
    out = evaluate.episodes_dir(cfg, checkpoint)
    assert len(list(out.parent.glob("sft-0004.stale-*"))) == 1  # kept aside, not overwritten
    assert evaluate.evaluate_checkpoint(cfg, checkpoint).equals(first) and len(played) == 2  # moved back
    evaluate.evaluate_checkpoint(other, checkpoint)
    assert len(played) == 2  # and the other settings' episodes in turn
    evaluate.evaluate_checkpoint(cfg, checkpoint, force=True)
    assert len(played) == 3  # force evaluates again, whatever was kept


def test_settings_that_leave_the_episodes_alone_keep_them(evaluated):
    """Which SFT checkpoints the sweep picks and how the SFT set is built do not change a checkpoint's
    episodes; another draw of test hands does."""
    cfg, checkpoint, first, played = evaluated
    for same in ({"eval.sft_every": 7}, {"data.sft_size": 48, "data.answer_choice": "first"}):
        assert evaluate.evaluate_checkpoint(config.load("tiny", **same), checkpoint).equals(first)
    assert len(played) == 1
    evaluate.evaluate_checkpoint(config.load("tiny", **{"data.test_seed": 7}), checkpoint)
    assert len(played) == 2


def test_going_back_to_earlier_spectra_settings_reads_them_and_the_svd_cache_stays(tmp_path, monkeypatch):
    cfg, other = config.load("tiny", **{"spectra.k": 4}), config.load("tiny", **{"spectra.k": 3})
    checkpoints = {"a": tiny_qwen(tmp_path / "a", 0), "b": tiny_qwen(tmp_path / "b", 1)}
    computed = []
    analyze = spectra.analyze_pairs
    monkeypatch.setattr(spectra, "analyze_pairs", lambda *a, **kw: computed.append(kw["k"]) or analyze(*a, **kw))
    first = spectra.run_stage(cfg, checkpoints, [("a", "b")])
    out, cache = artifacts.spectra_dir(cfg), spectra.weights.svd_cache(cfg)
    factors = sorted(cache.rglob("*"))
    spectra.run_stage(other, checkpoints, [("a", "b")])
    assert computed == [4, 3] and len(list(out.parent.glob("spectra.stale-*"))) == 1  # kept aside
    assert sorted(cache.rglob("*")) == factors  # the shared decompositions were not moved with them
    assert spectra.run_stage(cfg, checkpoints, [("a", "b")]).equals(first) and computed == [4, 3]  # moved back
    pooled = config.load("tiny", **{"spectra.k": 4, "spectra.claim_modules": ["q_proj"]})  # read by claims only
    assert spectra.run_stage(pooled, checkpoints, [("a", "b")]).equals(first) and computed == [4, 3]
    figure = config.load("tiny", **{"spectra.k": 4, "spectra.sft_before": "inter_sft"})  # picks among the pairs
    assert spectra.run_stage(figure, checkpoints, [("a", "b")]).equals(first) and computed == [4, 3]


def test_an_svd_cache_at_its_earlier_place_is_moved_not_decomposed_again():
    cfg = config.load("tiny")
    earlier = artifacts.spectra_dir(cfg) / "svd_cache"
    W = torch.randn(12, 8, dtype=torch.float64)
    spectra.weights.load_or_decompose(W, "w", earlier, device="cpu")
    files = sorted(f.relative_to(earlier) for f in earlier.rglob("*"))
    cache = spectra.weights.svd_cache(cfg)
    assert cache.parent == artifacts.run_dir(cfg) and not earlier.exists()
    assert sorted(f.relative_to(cache) for f in cache.rglob("*")) == files

# ----------------------------------------------------------------------------- a damaged cache
def test_a_damaged_episode_cache_is_evaluated_again(evaluated, caplog):
    cfg, checkpoint, first, played = evaluated
    evaluate.evaluate_checkpoint(cfg, checkpoint)
    assert len(played) == 1
    truncate_half(evaluate.episodes_dir(cfg, checkpoint) / "episodes.jsonl")
    with caplog.at_level(logging.WARNING, logger="paper_lib.evaluate"):
        again = evaluate.evaluate_checkpoint(cfg, checkpoint)
    assert len(played) == 2 and again.equals(first)
    assert "sft-0004/episodes.jsonl ends in the middle of a row" in caplog.text
    assert "evaluating sft-0004 again" in caplog.text


def test_an_episode_cache_cut_at_a_line_end_is_evaluated_again(evaluated, caplog):
    """Cut at a newline, the file reads as a valid table with fewer hands; its manifest's count tells."""
    cfg, checkpoint, first, played = evaluated
    evaluate.evaluate_checkpoint(cfg, checkpoint)
    path = evaluate.episodes_dir(cfg, checkpoint) / "episodes.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))
    with caplog.at_level(logging.WARNING, logger="paper_lib.evaluate"):
        again = evaluate.evaluate_checkpoint(cfg, checkpoint)
    assert len(played) == 2 and again.equals(first)
    assert f"holds {len(lines) - 1} episodes but its manifest counted {len(lines)}" in caplog.text
    assert "evaluating sft-0004 again" in caplog.text


def test_a_damaged_results_table_is_one_line_naming_the_fix():
    cfg = config.load("tiny")
    path = artifacts.eval_dir(cfg) / "results.parquet"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PAR1 cut short")
    with pytest.raises(artifacts.ArtifactError, match=r"results.parquet is unreadable .*--only 4") as err:
        evaluate.load_results(cfg)
    assert "\n" not in str(err.value)


def test_a_damaged_spectra_table_is_computed_again(tmp_path, monkeypatch, caplog):
    cfg = config.load("tiny", **{"spectra.k": 4})
    checkpoints = {"a": tiny_qwen(tmp_path / "a", 0), "b": tiny_qwen(tmp_path / "b", 1)}
    first = spectra.run_stage(cfg, checkpoints, [("a", "b")])
    out = artifacts.spectra_dir(cfg)
    alignment = artifacts.read_table(out / spectra.ALIGNMENT_TABLE, "")
    truncate_half(out / "a__b.parquet")
    with pytest.raises(spectra.SpectraError, match=r"a__b.parquet is unreadable .*05_spectra"):
        spectra.load_pair(out, "a", "b")
    with caplog.at_level(logging.WARNING, logger="paper_lib.spectra"):
        again = spectra.run_stage(cfg, checkpoints, [("a", "b")])
    assert "computing the spectra again" in caplog.text
    assert again.drop(columns=["seconds"], errors="ignore").equals(first.drop(columns=["seconds"], errors="ignore"))

    truncate_half(out / spectra.ALIGNMENT_TABLE)  # the table 05 shows beside the pairs heals the same way
    spectra.run_stage(cfg, checkpoints, [("a", "b")])
    assert artifacts.read_table(out / spectra.ALIGNMENT_TABLE, "").equals(alignment)

    def no_recompute(*args, **kwargs):
        raise AssertionError("an intact cache was computed again")

    monkeypatch.setattr(spectra, "analyze_pairs", no_recompute)
    spectra.run_stage(cfg, checkpoints, [("a", "b")])


def test_a_table_cut_mid_row_is_refused_not_read_short(tmp_path):
    """pandas reads the half of a last CSV row as a row of NaNs; the claims would then count fewer variants."""
    cfg = config.load("tiny")
    path = artifacts.write_table(pd.DataFrame({"variant": ["a", "b"], "success_rate": [0.5, 0.25]}),
                                 artifacts.restore_dir(cfg) / "variants.csv")
    whole = path.read_bytes()
    path.write_bytes(whole[:-4])
    with pytest.raises(artifacts.ArtifactError, match=r"variants.csv ends in the middle of a row .*--only 6"):
        claims.restore_recovery(cfg)
    path.write_bytes(whole)
    assert len(artifacts.read_table(path, "")) == 2


@pytest.mark.parametrize("in_kernel", [True, False])
def test_a_notebook_shows_that_a_stage_was_skipped(in_kernel):
    """In a Jupyter kernel without logging set up, paper_lib's INFO notes ("… is up to date") reach the cell;
    elsewhere paper_lib leaves logging to the caller."""
    import subprocess
    import sys

    fake_kernel = "import sys, types; sys.modules['ipykernel'] = types.ModuleType('ipykernel'); " if in_kernel else ""
    code = fake_kernel + "import logging, paper_lib; logging.getLogger('paper_lib.sft').info('SFT is up to date')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ("SFT is up to date" in out.stdout) is in_kernel and "up to date" not in out.stderr
