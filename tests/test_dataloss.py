"""Issue 10: nothing is deleted that the user did not ask to delete, and bad input ends in one clear line.

Each test reproduces one report of the issue on tiny checkpoints built here (no training)."""
import json
import shutil

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from paper_lib import artifacts, cards, config, evaluate, ppo, restore, rl_run, sft, spectra
from paper_lib.restore import Plan


def tiny_qwen(path, seed, vocab=64):
    torch.manual_seed(seed)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    return path


def truncate(path, size=400):
    with open(path, "r+b") as fh:
        fh.truncate(size)


def restore_cli(tgt, src, out, *extra):
    return restore.main(["--target", str(tgt), "--source", str(src), "--top", "4", "--out", str(out), *extra])


# ------------------------------------------------------------------------------------ 1. data loss
def test_restore_refuses_an_out_that_holds_other_files_or_the_inputs(tmp_path, capsys):
    work = tmp_path / "mywork"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("notes")
    tgt, src = tiny_qwen(work / "T", 0), tiny_qwen(work / "S", 1)
    assert restore_cli(tgt, src, work) == 2  # the parent of both inputs
    assert "contains the input" in capsys.readouterr().err
    assert restore_cli(tgt, src, tgt) == 2  # an input itself
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "notes.txt").write_text("notes")
    assert restore_cli(tgt, src, other) == 2
    assert "not a previous restore output" in capsys.readouterr().err
    assert (work / "notes.txt").read_text() == "notes" and (work / "sub").is_dir()
    assert (other / "notes.txt").read_text() == "notes" and (other / "sub").is_dir()
    assert (tgt / "model.safetensors").is_file() and not list(tmp_path.rglob("*.partial"))


def test_restore_replaces_its_own_previous_output_only_with_force(tmp_path, capsys):
    tgt, src, out = tiny_qwen(tmp_path / "T", 0), tiny_qwen(tmp_path / "S", 1), tmp_path / "out"
    assert restore_cli(tgt, src, out) == 0
    assert restore_cli(tgt, src, out) == 2 and "--force" in capsys.readouterr().err
    assert restore_cli(tgt, src, out, "--force") == 0
    assert (out / "restore_manifest.json").is_file()


def test_restore_force_keeps_what_the_user_put_in_its_previous_output(tmp_path, capsys):
    """A restored checkpoint used as a working folder: --force replaces the restore, never the user's files."""
    tgt, src, out = tiny_qwen(tmp_path / "T", 0), tiny_qwen(tmp_path / "S", 1), tmp_path / "out"
    assert restore_cli(tgt, src, out) == 0
    (out / "my_notes.txt").write_text("notes")
    (out / "evals").mkdir()
    (out / "evals" / "a.csv").write_text("x")
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert restore_cli(tgt, src, out, "--force") == 2
    err = capsys.readouterr().err
    assert "files restore did not write (evals/, my_notes.txt)" in err and "nothing was changed" in err
    assert (out / "my_notes.txt").read_text() == "notes" and (out / "evals" / "a.csv").read_text() == "x"
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    (out / "my_notes.txt").unlink()
    shutil.rmtree(out / "evals")
    assert restore_cli(tgt, src, out, "--force") == 0  # once they are moved out, the restore is replaced
    manifest = json.loads((out / "restore_manifest.json").read_text())
    assert "my_notes.txt" not in manifest["files"] and "model.safetensors" in manifest["files"]
    # an output of an earlier version, whose manifest lists no files: its shards and side files are its own
    (out / "restore_manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "files"}))
    (out / "mine.bin").write_bytes(b"0")
    assert restore_cli(tgt, src, out, "--force") == 2 and "(mine.bin)" in capsys.readouterr().err


def test_restore_rejects_negative_top_without_leaving_a_partial_dir(tmp_path, capsys):
    tgt, src = tiny_qwen(tmp_path / "T", 0), tiny_qwen(tmp_path / "S", 1)
    code = restore.main(["--target", str(tgt), "--source", str(src), "--top", "-3", "--out", str(tmp_path / "o")])
    assert code == 2 and ">= 0" in capsys.readouterr().err
    assert not list(tmp_path.glob(".o.partial*")) and not (tmp_path / "o").exists()


def test_a_device_torch_does_not_know_is_one_line(tmp_path, capsys):
    tgt, src = tiny_qwen(tmp_path / "T", 0), tiny_qwen(tmp_path / "S", 1)
    argv = ["--target", str(tgt), "--source", str(src), "--top", "3", "--out", str(tmp_path / "o"), "--quiet"]
    assert restore.main(argv + ["--device", "tpu"]) == 2
    assert "device must be 'auto', 'cpu' or 'cuda' (or 'cuda:N'), got 'tpu'" in capsys.readouterr().err
    assert spectra.main([str(src), str(tgt), "--out", str(tmp_path / "s"), "--device", "tpu", "--quiet"]) == 2
    assert "got 'tpu'" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_evaluate_label_needs_a_checkpoint(capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--preset", "tiny", "--label", "mine"])
    assert exit.value.code == 2 and "--label names a --checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("failure", ["cuda", "interrupt"])
def test_a_restore_that_stops_leaves_no_scratch_checkpoint(tmp_path, capsys, monkeypatch, failure):
    """A missing CUDA once failed after the scratch directory was made, and a Ctrl-C left a half-written
    checkpoint (gigabytes at 7B) beside --out until the next run."""
    tgt, src = tiny_qwen(tmp_path / "T", 0), tiny_qwen(tmp_path / "S", 1)
    argv = ["--target", str(tgt), "--source", str(src), "--top", "3", "--out", str(tmp_path / "o"), "--quiet"]
    if failure == "cuda":
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
        assert restore.main(argv + ["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    else:
        calls = []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:  # a few matrices in: the first shard is half done
                raise KeyboardInterrupt
            return args[0].clone()

        monkeypatch.setattr(restore, "restore_directions", interrupted)
        assert restore.main(argv) == 130
        assert "interrupted" in capsys.readouterr().err
    assert not list(tmp_path.glob(".o.partial*")) and not (tmp_path / "o").exists()


def test_restore_says_what_top_was_clamped_to(tmp_path, caplog):
    tgt, src = tiny_qwen(tmp_path / "T", 0), tiny_qwen(tmp_path / "S", 1)
    restore.write_restored(tgt, src, tmp_path / "o", Plan(top=10_000), device="cpu", progress=False)
    assert "clamped" in caplog.text and "rank 16" in caplog.text


def test_evaluate_label_is_a_single_safe_name(tmp_path, monkeypatch, capsys):
    cfg = config.load("tiny")
    keep = artifacts.sft_dir(cfg)
    keep.mkdir(parents=True)
    (keep / "precious").write_text("x")
    ck = tiny_qwen(tmp_path / "my-ckpt", 0)
    seen = []
    monkeypatch.setattr(evaluate, "sweep", lambda cfg, force, checkpoints, table_name, here: seen.append(checkpoints) or _no_table())
    for bad in ("../sft", "..", "a/b", ""):
        assert evaluate.main(["--preset", "tiny", "--checkpoint", str(ck), "--label", bad]) == 2
        assert "single name" in capsys.readouterr().err
    assert not seen and (keep / "precious").is_file()
    monkeypatch.chdir(ck)  # --checkpoint . is labelled by the directory's real name, not ""
    evaluate.main(["--preset", "tiny", "--checkpoint", "."])
    assert seen[0][0].label == "my-ckpt"
    with pytest.raises(ValueError, match="single name"):
        evaluate.evaluate_checkpoint(cfg, evaluate.Checkpoint("", "other", 0, ck))


def test_evaluating_an_own_checkpoint_leaves_the_pipeline_results_alone(tmp_path, monkeypatch, capsys):
    """`python -m paper_lib.evaluate --checkpoint` once rewrote eval/results.parquet with its one row, and a
    label such as "base" replaced the pipeline's cached episodes: every later notebook then failed."""
    import pandas as pd

    cfg = config.load("tiny")
    results = artifacts.eval_dir(cfg) / "results.parquet"
    results.parent.mkdir(parents=True)
    pd.DataFrame({"label": ["sft-0016"], "rule": ["ood"]}).to_parquet(results)
    before = results.read_bytes()
    played = []

    def fake_episodes(cfg, checkpoint, force=False):
        played.append(evaluate.episodes_dir(cfg, checkpoint))
        return pd.DataFrame({"rule": ["id", "ood"], "success": [True, False], "attempts": [1, 5], "repeat": [0, 0]})

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", fake_episodes)
    ck = tiny_qwen(tmp_path / "mine", 0)
    assert evaluate.main(["--preset", "tiny", "--checkpoint", str(ck), "--label", "base"]) == 0
    assert results.read_bytes() == before
    assert played == [artifacts.eval_dir(cfg) / "own" / "base"]
    assert played[0] != evaluate.episodes_dir(cfg, evaluate.Checkpoint("base", "base", 0, ck))
    assert set(pd.read_parquet(artifacts.eval_dir(cfg) / "own" / "base.parquet")["rule"]) == {"id", "ood"}
    out = capsys.readouterr().out
    assert "base" in out and f"written to {artifacts.eval_dir(cfg) / 'own' / 'base.parquet'}" in out


def _no_table():
    import pandas as pd

    return pd.DataFrame(columns=["label", "rule", "success_rate", "ci_low", "ci_high"])


def _finished_rl_run(cfg):
    """A stand-in for a finished RL run of days: it must survive whatever goes wrong upstream."""
    out = artifacts.rl_dir(cfg)
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "value_head.pt").write_text("weights")
    (out / "run_spec.json").write_text(json.dumps({"stage": "rl", "old": True}))
    return out


def test_a_truncated_sft_checkpoint_stops_ppo_before_the_rl_run_is_touched(tiny_base):
    cfg = config.load("tiny")
    init = artifacts.sft_dir(cfg) / "checkpoint-4"
    shutil.copytree(tiny_base.path, init)
    out = _finished_rl_run(cfg)
    truncate(init / "model.safetensors", 400_000 if (init / "model.safetensors").stat().st_size > 400_000 else 100)
    for entry in (ppo.train, ppo.run):  # in-process, and the notebook's launcher
        with pytest.raises(artifacts.ArtifactError, match=r"checkpoint-4/model.safetensors.*paper_lib.sft"):
            entry(cfg)
    assert (out / "checkpoint-1" / "value_head.pt").read_text() == "weights"


def test_ppo_moves_a_run_of_another_spec_aside_and_tolerates_a_truncated_run_spec(tmp_path):
    out = _finished_rl_run(config.load("tiny"))
    (out / "run_spec.json").write_text('{"stage": "r')  # truncated by a kill
    assert rl_run.prepare_run(out, {"stage": "rl", "new": True}, force=False, processes=1)
    stale = list(out.parent.glob("rl.stale-*"))
    assert len(stale) == 1 and (stale[0] / "checkpoint-1" / "value_head.pt").read_text() == "weights"
    assert json.loads((out / "run_spec.json").read_text())["new"] is True
    (out / artifacts.MANIFEST).write_text("{trunc")  # a truncated manifest is "not finished", not a crash
    assert rl_run.prepare_run(out, {"stage": "rl", "new": True}, force=False, processes=1)


def test_a_truncated_base_model_stops_sft_before_the_sft_run_is_touched(tiny_base):
    cfg = config.load("tiny")
    shutil.copytree(tiny_base.path, artifacts.base_model_dir(cfg))
    out = artifacts.sft_dir(cfg)
    (out / "checkpoint-64").mkdir(parents=True)
    (out / "checkpoint-64" / "model.safetensors").write_text("finished weights")
    (out / artifacts.RUN_SPEC).write_text("{}")
    truncate(artifacts.base_model_dir(cfg) / "model.safetensors")
    with pytest.raises(artifacts.ArtifactError, match=r"models/base/model.safetensors.*rerun"):
        sft.manifest_spec(cfg)  # what sft.train computes before it prepares its directory
    assert (out / "checkpoint-64" / "model.safetensors").read_text() == "finished weights"


# ------------------------------------------------------------------------------ 2. silent corruption
def test_a_finished_stage_with_a_truncated_output_is_not_up_to_date(tmp_path):
    out = tmp_path / "sft"
    ck = tiny_qwen(out / "checkpoint-64", 0)
    spec = {"stage": "sft", "x": 1}
    artifacts.write_manifest(out, spec)
    assert artifacts.up_to_date(out, spec, "redo it")
    truncate(ck / "model.safetensors", (ck / "model.safetensors").stat().st_size - 10)
    with pytest.raises(artifacts.ArtifactError, match=r"checkpoint-64/model.safetensors.*redo it"):
        artifacts.up_to_date(out, spec, "redo it")


def test_a_finished_sft_run_with_a_truncated_checkpoint_is_not_skipped(tiny_base):
    cfg = config.load("tiny")
    shutil.copytree(tiny_base.path, artifacts.base_model_dir(cfg))
    out = artifacts.sft_dir(cfg)
    ck = tiny_qwen(out / "checkpoint-64", 0)
    artifacts.write_manifest(out, sft.manifest_spec(cfg))
    truncate(ck / "model.safetensors", 1000)
    with pytest.raises(artifacts.ArtifactError, match=r"checkpoint-64/model.safetensors.*paper_lib.sft.*--force"):
        sft.run(cfg)  # today: "up to date", and 02_sft's checks pass
    assert (ck / "model.safetensors").stat().st_size == 1000  # left for the user to inspect


def test_a_checkpoint_without_tokenizer_and_another_vocabulary_is_refused(tiny_base):
    from paper_lib import models

    cfg = config.load("tiny")
    shutil.copytree(tiny_base.path, artifacts.base_model_dir(cfg))
    foreign = tiny_qwen(artifacts.run_dir(cfg) / "foreign", 0, vocab=77)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.*\(77\).*save_pretrained"):
        models.load(cfg, checkpoint=foreign)


# ----------------------------------------------------------------------------------- 3. clear errors
def test_spectra_and_restore_name_a_truncated_shard_or_index(tmp_path, capsys):
    a, b = tiny_qwen(tmp_path / "a", 0), tiny_qwen(tmp_path / "b", 1)
    truncate(b / "model.safetensors", 1000)
    assert spectra.main([str(a), str(b), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    assert "b/model.safetensors" in capsys.readouterr().err
    assert restore_cli(a, b, tmp_path / "r") == 2 and "b/model.safetensors" in capsys.readouterr().err
    c = tiny_qwen(tmp_path / "c", 2)
    (c / "model.safetensors.index.json").write_text('{"weight_map": {"x": "mod')
    assert spectra.main([str(a), str(c), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    assert "index" in capsys.readouterr().err


def test_spectra_bad_names_regex_and_unwritable_out(tmp_path, capsys):
    a, b = tiny_qwen(tmp_path / "a", 0), tiny_qwen(tmp_path / "b", 1)
    assert spectra.main([str(a), str(b), "--out", str(tmp_path / "s"), "--names", "([", "--quiet"]) == 2
    assert "regular expression" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert spectra.main([str(a), str(b), "--out", str(tmp_path / "afile" / "s"), "--quiet"]) == 2


def test_a_truncated_arrow_file_is_one_clear_error(tmp_path):
    from paper_lib import data

    cfg = config.load("tiny", data__sft_size=8, data__test_size=4, data__loss_set_size=4)
    path = data.build(cfg)
    arrow = sorted(path.rglob("*.arrow"))[0]
    truncate(arrow, arrow.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"unreadable.*01_data"):
        data.load(cfg)


@pytest.mark.parametrize("override, message", [
    ({"sft__max_steps": float("inf")}, "sft.max_steps must be int"),
    ({"sft__learning_rate": float("inf")}, "finite"),
    ({"sft__learning_rate": -1e-5}, "sft.learning_rate must be > 0"),
    ({"sft__per_device_batch_size": 0}, "> 0"),
    ({"rl__learning_rate": -1.0}, "> 0"),
    ({"model__dtype": "float8"}, "model.dtype must be one of"),
    ({"rl__algo": "dpo"}, "rl.algo must be one of"),
    ({"data__answer_choice": "last"}, "data.answer_choice must be one of"),
    ({"sft__accelerate_config": "zero9"}, "sft.accelerate_config must be one of"),
    ({"restore__sources": ["sft"]}, "restore.sources must be one of"),
    ({"eval__decoding": "beam"}, "eval.decoding must be one of"),
    ({"restore__top_ks": [4, -8]}, "restore.top_ks must be > 0"),
    ({"data__loss_set_size": 0}, "data.loss_set_size must be > 0"),
    ({"sft__warmup_ratio": 1.5}, r"sft.warmup_ratio must be in \[0, 1\)"),
    ({"sft__adam_beta2": 1.0}, r"sft.adam_beta2 must be in \[0, 1\)"),
])
def test_bad_settings_fail_at_load_time(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load("tiny", **override)


def test_malformed_and_empty_preset_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  learning_rate: [1e-5\n")
    with pytest.raises(config.ConfigError, match=r"bad.yaml is not valid YAML"):
        config.load(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(config.ConfigError, match="empty.yaml is empty"):
        config.load(empty)


def test_verify_formula_rejects_a_bad_hand():
    for numbers in ([], [1.5, 2, 3, 4], ["x", 2, 3, 4]):
        with pytest.raises(ValueError, match="integers"):
            cards.verify_formula("", numbers)
    assert cards.verify_formula("4*6", [4, 6]).status == "CORRECT"  # integers as floats still count
    assert cards.verify_formula("4*6", [4.0, 6]).status == "CORRECT"


def test_no_paper_lib_code_deletes_an_unchecked_path():
    """Every rmtree/unlink under paper_lib/ is one of the audited sites below (project-owned paths)."""
    root = config.PROJECT_ROOT / "paper_lib"
    sites = sorted((p.name, line.strip()) for p in root.glob("*.py") for line in p.read_text().splitlines()
                   if ("rmtree(" in line or ".unlink(" in line or "os.remove(" in line) and "def " not in line)
    audited = {"artifacts.py", "restore.py", "sft.py", "ppo.py", "grpo.py", "spectra.py"}  # grpo: its metrics.csv
    assert {name for name, _ in sites} <= audited, sites
    restore_sites = [line for name, line in sites if name == "restore.py"]
    assert not any("rmtree(out" in line for line in restore_sites), restore_sites


def test_atomic_dir_never_replaces_a_directory_the_project_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("notes")
    with pytest.raises(artifacts.ArtifactError, match="not written by this project"):
        with artifacts.atomic_dir(mine):
            pass
    assert (mine / "notes.txt").read_text() == "notes"
    artifacts.cached_stage(tmp_path / "stage", {"a": 1}, lambda out: (out / "x").write_text("1"))
    artifacts.cached_stage(tmp_path / "stage", {"a": 2}, lambda out: (out / "x").write_text("2"))  # its own: replaced
    assert (tmp_path / "stage" / "x").read_text() == "2"


def test_restore_out_that_cannot_be_written_is_one_line(tmp_path, capsys):
    tgt, src = tiny_qwen(tmp_path / "T", 0), tiny_qwen(tmp_path / "S", 1)
    (tmp_path / "afile").write_text("x")
    assert restore_cli(tgt, src, tmp_path / "afile" / "out") == 2
    assert "afile" in capsys.readouterr().err


def test_an_interrupted_file_write_keeps_the_previous_file_and_leaves_no_scratch(tmp_path):
    table = tmp_path / "pair.parquet"
    table.write_text("previous")
    with pytest.raises(KeyboardInterrupt):
        with artifacts.atomic_file(table) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert table.read_text() == "previous" and sorted(tmp_path.iterdir()) == [table]
    with artifacts.atomic_file(table) as tmp:
        assert not tmp.name.endswith(".parquet")  # a leftover is never globbed as a table
        tmp.write_text("new")
    assert table.read_text() == "new" and sorted(tmp_path.iterdir()) == [table]


def test_replace_dir_swaps_in_the_finished_directory_and_drops_the_old_one(tmp_path):
    final, finished = tmp_path / "checkpoint-4", tmp_path / ".checkpoint-4.partial"
    final.mkdir()
    (final / "stale.bin").write_text("old")
    finished.mkdir()
    (finished / "model.safetensors").write_text("new")
    artifacts.replace_dir(finished, final)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]
    assert [p.name for p in final.iterdir()] == ["model.safetensors"]


def test_keep_rows_drops_later_rows_and_a_failed_rewrite_keeps_the_table(tmp_path, monkeypatch):
    """What a killed run logged after its last checkpoint goes; the rewrite replaces the table in one step."""
    table = tmp_path / "metrics.csv"
    artifacts.append_rows(table, [{"update": u, "reward": u / 10} for u in range(1, 6)])
    artifacts.keep_rows(table, "update", 3)
    assert table.read_text().splitlines() == ["update,reward", "1,0.1", "2,0.2", "3,0.3"]

    def killed(self, rows):
        raise KeyboardInterrupt
    monkeypatch.setattr(artifacts.csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        artifacts.keep_rows(table, "update", 1)
    assert table.read_text().splitlines() == ["update,reward", "1,0.1", "2,0.2", "3,0.3"]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_an_empty_table_left_by_a_kill_is_kept_and_gets_its_header(tmp_path):
    """open() creates the file before the first rows are flushed, so a kill can leave it empty."""
    table = tmp_path / "loss_table.csv"
    table.write_text("")
    artifacts.keep_rows(table, "step", 3)
    artifacts.append_rows(table, [{"step": 1, "loss": 0.5}])
    assert table.read_text().splitlines() == ["step,loss", "1,0.5"]


def test_a_table_an_older_version_began_is_widened_for_a_new_column(tmp_path):
    """A run resumed by a newer version logs a column the table lacks: the old rows are kept, blank there,
    and no value lands under another column's name."""
    table = tmp_path / "metrics.csv"
    artifacts.append_rows(table, [{"update": 1, "reward": 0.1}])
    artifacts.append_rows(table, [{"reward": 0.2, "nonfinite_steps": 0, "update": 2}])
    artifacts.append_rows(table, [{"update": 3, "reward": 0.3}])
    assert table.read_text().splitlines() == ["update,reward,nonfinite_steps", "1,0.1,", "2,0.2,0", "3,0.3,"]
