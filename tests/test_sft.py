"""paper_lib.sft: checkpoints, Figure 2's loss table, completion-only loss, resume after SIGKILL, the
manifest skip, and a Mllama-shaped model. Tiny runs only; one thread per run (the box has 2 cores)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import time

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from paper_lib import artifacts, cards, config, data, launch, models, sft

# 8 steps of 8 examples; checkpoints at 3, 6 and the last step, 8; loss points every 2 steps.
SMALL = {"data.sft_size": 64, "data.test_size": 8, "data.loss_set_size": 8, "sft.per_device_batch_size": 8,
         "sft.save_steps": 3, "sft.eval_steps": 2}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # subprocess runs; in-process runs use one_thread()


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One finished tiny SFT run (through sft.run, i.e. a subprocess), shared by the tests that read it."""
    runs = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAPER_RUNS_DIR", str(runs))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("OMP_NUM_THREADS", "1")
        cfg = config.load("tiny", **SMALL)
        out = sft.run(cfg, stream=False)
    return runs, cfg, out


def test_a_two_process_config_run_in_one_process_stops_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPER_RUNS_DIR", str(tmp_path))
    cfg = config.load("tiny", **{**SMALL, "sft.num_processes": 2, "sft.accelerate_config": "multi_cpu"})
    with pytest.raises(launch.StageError, match=r"running 1 process\(es\) but sft.num_processes is 2"):
        sft.train(cfg)
    assert not sft.checkpoints(cfg)


def test_run_writes_loadable_checkpoints_at_the_save_steps(tiny_run, monkeypatch):
    runs, cfg, out = tiny_run
    monkeypatch.setenv("PAPER_RUNS_DIR", str(runs))
    found = sft.checkpoints(cfg)
    assert list(found) == [3, 6, 8]  # every save step and the last step
    assert all(sft.checkpoint_step(path) == step for step, path in found.items())
    assert sft.checkpoint(cfg) == found[8] and sft.checkpoint(cfg, 6) == found[6]
    assert sft.checkpoint(cfg, "full_sft") == found[8]  # tiny's full_sft_step 64 is past its last step
    with pytest.raises(FileNotFoundError, match=r"saved steps: \[3, 6, 8\]"):
        sft.checkpoint(cfg, 5)
    base, _ = models.load(cfg)
    for path in found.values():
        model, tokenizer = models.load(cfg, checkpoint=path)
        assert type(model).__name__ == "Qwen2ForCausalLM"
        assert (path / "tokenizer.json").is_file() and tokenizer.eos_token == "<|im_end|>"
        assert json.loads((path / "trainer_state.json").read_text())["global_step"] == sft.checkpoint_step(path)
        assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    # only the newest keeps the optimizer state a resume needs
    assert [(p / "optimizer.pt").is_file() for p in found.values()] == [False, False, True]
    manifest = artifacts.read_manifest(out)
    assert manifest["provenance"]["final_step"] == 8 and manifest["provenance"]["resumed_from"] is None


def test_manifest_records_the_tokens_trained_and_the_seconds_training(tiny_run, monkeypatch):
    runs, cfg, out = tiny_run
    monkeypatch.setenv("PAPER_RUNS_DIR", str(runs))
    with one_thread():
        examples = sft.build_trainer(cfg).train_dataset  # one epoch, tokenized as the run saw it, no padding
    done = artifacts.read_manifest(out)["provenance"]
    assert done["train_tokens"] == sum(len(ids) for ids in examples["input_ids"])
    assert 0 < done["train_seconds"] < done["seconds"]  # the loss evaluations and the setup are left out
    assert done["device"].startswith("CPU (")


def test_loss_table_has_three_curves_and_the_loss_falls(tiny_run, monkeypatch):
    runs, cfg, out = tiny_run
    monkeypatch.setenv("PAPER_RUNS_DIR", str(runs))
    table = sft.loss_table(cfg)
    assert list(table.columns) == ["step", "curve", "loss"]
    assert not table.duplicated(["step", "curve"]).any()
    steps = {c: sorted(g["step"]) for c, g in table.groupby("curve")}
    assert steps == {"id_train": [2, 4, 6, 8], "id_test": [0, 2, 4, 6, 8], "ood": [0, 2, 4, 6, 8]}
    assert table["loss"].notna().all() and (table["loss"] > 0).all()
    curve = table.set_index(["curve", "step"])["loss"]
    assert curve["id_train", 8] < curve["id_train", 2] - 0.5
    assert curve["id_test", 8] < curve["id_test", 0] - 1.0
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))


def test_second_run_with_same_config_is_skipped(tiny_run, monkeypatch):
    runs, cfg, out = tiny_run
    monkeypatch.setenv("PAPER_RUNS_DIR", str(runs))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    def no_launch(*args, **kwargs):
        raise AssertionError("a finished run with a matching manifest must not be launched again")

    monkeypatch.setattr(launch, "run_streamed", no_launch)
    assert sft.run(config.load("tiny", **SMALL)) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # any change of the SFT settings or the data makes it stale
    assert not artifacts.manifest_matches(out, sft.manifest_spec(config.load("tiny", **SMALL, sft__learning_rate=1e-3)))
    assert not artifacts.manifest_matches(out, sft.manifest_spec(config.load("tiny", **{**SMALL, "data.seed": 1})))


def test_prompt_tokens_are_masked_in_a_collated_batch():
    cfg = config.load("tiny", **SMALL)
    with one_thread():
        trainer = sft.build_trainer(cfg)
    tok = trainer.processing_class
    rows = data.load(cfg)["sft_train"]
    answers = {row["completion"][0]["content"] for row in rows}
    prompts = {tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) for row in rows}
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        trained = labels != -100
        assert torch.equal(labels[trained], ids[trained])
        assert not trained[mask == 0].any(), "padding is masked"
        first = int(trained.nonzero()[0])
        assert trained[first:][mask[first:] == 1].all(), "the completion is one contiguous span to the end"
        prompt, answer = tok.decode(ids[:first]), tok.decode(ids[trained])
        assert prompt in prompts, "exactly the chat-templated prompt, generation prompt included, is masked"
        assert answer.endswith("<|im_end|>\n") and answer.removesuffix("<|im_end|>\n") in answers


def test_warmup_log_is_the_deepspeed_schedule_the_authors_sft_ran(tmp_path, monkeypatch):
    """Their log (RL_Heals_SFT analysis/sft_6579897_4294967294.out, 12,501 steps), which prints after each
    step the rate of the next, reads 0.0, then 1.1689632515815068e-07 = 1e-6 ln 2 / ln 376, and 1e-06 from
    step 376 on: steps 1 and 2 ran at 0, step 3 at 1e-6 ln 2 / ln 376, step 377 on at 1e-6. A run here steps
    the same rates, with the authors' AdamW beta2 and eps."""
    from transformers import TrainerCallback

    logged = [0.0] + [1e-6 * sft.warmup_log(s, 376) for s in range(1, 12501)]  # printed after steps 1, 2, ...
    assert logged[1] == pytest.approx(1.1689632515815068e-07, rel=1e-12) and logged[374] < 1e-6 == logged[375]
    used = [1e-6 * sft.warmup_log_used(s, 376) for s in range(12501)]  # what steps 1, 2, ... ran at
    assert used[0] == 0.0 and used[1:] == logged[:-1]

    class UsedRate(TrainerCallback):
        def __init__(self):
            self.rates, self.betas = [], set()

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            self.rates.append(optimizer.param_groups[0]["lr"])
            self.betas |= {(g["betas"], g["eps"]) for g in optimizer.param_groups}
    monkeypatch.setenv("PAPER_RUNS_DIR", str(tmp_path))
    cfg = config.load("tiny", **SMALL, sft__lr_scheduler="warmup_log", sft__warmup_steps=4, sft__max_steps=6,
                      sft__learning_rate=1e-3)
    seen = UsedRate()
    with one_thread():
        trainer = sft.build_trainer(cfg)
        trainer.add_callback(seen)
        trainer.train()
    assert seen.rates == pytest.approx([1e-3 * sft.warmup_log_used(s, 4) for s in range(6)])
    assert seen.rates[:3] == pytest.approx([0.0, 0.0, 1e-3 * math.log(2) / math.log(4)]) and seen.rates[-1] == 1e-3
    assert seen.betas == {((0.9, 0.98), 1e-7)}


# Llama-3.x's date logic: today's date unless the caller passes date_string
DATED_TEMPLATE = ("{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
                  "<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n"
                  "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_dated_chat_template_reads_one_fixed_date_in_sft_rollouts_and_evaluation():
    """SFT text, rollouts and evaluation render the same prompt whatever day each ran (cards.TEMPLATE_KWARGS)."""
    from paper_lib.rollout import Generator

    cfg = config.load("tiny", **SMALL)
    model, tok = models.load(cfg, dtype="float32")
    tok.chat_template = DATED_TEMPLATE
    today = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert "Today Date: 26 Jul 2024" not in today  # the template alone would take the day it runs
    with one_thread():
        trainer = sft.build_trainer(cfg, model=model, tokenizer=tok)
    trained = tok.decode(trainer.train_dataset[0]["input_ids"])
    assert "Today Date: 26 Jul 2024" in trained
    rendered = tok.decode(Generator(model, tok, max_new_tokens=1).render([{"role": "user", "content": "x"}]))
    assert "Today Date: 26 Jul 2024" in rendered


class _NewlineFusing:
    """A tokenizer that reads every run of newlines as one token and every other character as one, as
    Llama-3's pre-tokenizer fuses the header's "\n\n" with an answer's leading "\n"."""

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False, **kwargs):
        text = "".join(f"<{m['role']}>\n\n{m['content']}</s>" for m in messages)
        return text + ("<assistant>\n\n" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        import re
        return {"input_ids": [hash(piece) % 10**6 for piece in re.findall(r"\n+|.", text, re.S)]}


def test_an_answer_that_starts_with_a_newline_is_tokenized_apart_from_its_prompt():
    """data.ood_loss_format upstream: its answers begin with a newline. Tokenized apart, as the authors'
    Llama SFT did, the prompt keeps the tokens generation starts from; tokenized whole, the boundary fuses."""
    tok = _NewlineFusing()
    prompt, completion = [{"role": "user", "content": "hand"}], [{"role": "assistant", "content": "\n{1}"}]
    row = sft.chat_tokens_apart(tok, prompt, completion)
    generation_prompt = tok(tok.apply_chat_template(prompt, add_generation_prompt=True))["input_ids"]
    start = row["completion_mask"].index(1)
    assert row["input_ids"][:start] == generation_prompt and all(row["completion_mask"][start:])
    assert row["input_ids"][start:] == tok("\n{1}</s>")["input_ids"]
    whole = tok(tok.apply_chat_template(prompt + completion))["input_ids"]
    assert whole[:start] != generation_prompt and len(whole) == len(row["input_ids"]) - 1  # fused

    cfg = config.load("tiny", **SMALL, **{"data.ood_loss_format": "upstream"})
    with one_thread():
        trainer = sft.build_trainer(cfg)
    real = trainer.processing_class
    first, source = trainer.eval_dataset["ood"][0], data.load(cfg)["ood_loss"][0]
    start = next(i for i, label in enumerate(first["labels"]) if label != -100)
    assert first["input_ids"][:start] == real.apply_chat_template(source["prompt"], add_generation_prompt=True,
                                                                   tokenize=True, return_dict=False)
    assert real.decode(first["input_ids"][start:]).startswith("\n{") and first["labels"][start:] == first["input_ids"][start:]


def test_upstream_llama_text_format_trains_one_newline_past_the_end_token():
    """sft.text_format upstream_llama (llama11b): the authors' data.py wrote each answer
    "{answer}<|eot_id|>\\n" after the templated generation prompt, tokenized apart, in the training set and
    in both loss sets; the "\\n" is trained on."""
    cfg = config.load("tiny", **SMALL, sft__text_format="upstream_llama")
    with one_thread():
        trainer = sft.build_trainer(cfg)
    tok = trainer.processing_class
    splits = data.load(cfg)
    for rows, source in ((trainer.train_dataset, splits["sft_train"]), (trainer.eval_dataset["id_test"], splits["id_test"]),
                         (trainer.eval_dataset["ood"], splits["ood_loss"])):
        first, row = rows[0], source[0]  # TRL folds the completion mask into the labels
        ids, labels = first["input_ids"], first["labels"]
        start = next(i for i, label in enumerate(labels) if label != -100)
        assert ids[:start] == tok(tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False,
                                                          **cards.TEMPLATE_KWARGS), add_special_tokens=False)["input_ids"]
        whole = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False, **cards.TEMPLATE_KWARGS)
        assert tok.decode(ids[start:]) == whole[len(tok.decode(ids[:start])):] + "\n" and labels[start:] == ids[start:]


def test_sft_loss_average_and_eval_batch_are_settings():
    """qwen7b and llama11b average the loss per process (transformers 4.46.3's default, pinned upstream)
    and evaluate the loss curves 8 rows at a time; tiny keeps transformers 5's global token mean."""
    plain = sft.sft_args(config.load("tiny"))
    assert plain.average_tokens_across_devices and plain.per_device_eval_batch_size == plain.per_device_train_batch_size
    args = sft.sft_args(config.load("tiny", sft__average_tokens_across_devices=False, sft__eval_batch_size=8))
    assert not args.average_tokens_across_devices and args.per_device_eval_batch_size == 8
    for preset in ("qwen7b", "llama11b"):
        cfg = config.load(preset)
        assert not cfg.sft.average_tokens_across_devices and cfg.sft.eval_batch_size == 8
    assert config.load("llama11b").sft.text_format == "upstream_llama"


def test_upstream_qwen_text_format_trains_on_the_authors_strings():
    """sft.text_format upstream_qwen: the authors' Qwen SFT text, Llama-3 headers as plain text and a
    literal backslash-n, no chat template, no EOS added; the loss on the answer and its "<|eot_id|>\\n"."""
    cfg = config.load("tiny", **SMALL, sft__text_format="upstream_qwen")
    with one_thread():
        trainer = sft.build_trainer(cfg)
    tok = trainer.processing_class
    row = data.load(cfg)["sft_train"][0]
    prompt, answer = row["prompt"][0]["content"], row["completion"][0]["content"]
    expected = (f"<|start_header_id|>user<|end_header_id|>\\n\\n{prompt}<|eot_id|>\\n"
                f"<|start_header_id|>assistant<|end_header_id|>\\n\\n")
    first = trainer.train_dataset[0]  # TRL folds the completion mask into the labels
    ids, labels = first["input_ids"], first["labels"]
    start = next(i for i, label in enumerate(labels) if label != -100)
    assert tok.decode(ids[:start]) == expected and "\n" not in expected.replace(prompt, "")
    assert tok.decode(ids[start:]) == answer + "<|eot_id|>\\n" and labels[start:] == ids[start:]
    assert "<|im_start|>" not in tok.decode(ids)
    batch = next(iter(trainer.get_train_dataloader()))  # the collator turns the mask into labels
    for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        trained = labels != -100
        assert tok.decode(ids[trained]).endswith("<|eot_id|>\\n")
        assert tok.decode(ids[~trained & (attention == 1)]).startswith("<|start_header_id|>user<|end_header_id|>")


def test_resumes_after_sigkill(tmp_path):
    cfg = config.load("tiny", **{**SMALL, "data.sft_size": 160, "sft.save_steps": 4})  # 20 steps
    out = artifacts.sft_dir(cfg)
    cmd = sft.launch_command(cfg)
    assert cmd[1:4] == ["-m", "paper_lib.sft", "--preset"]  # one process: no accelerate wrapper
    with open(tmp_path / "killed.log", "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=config.PROJECT_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        # Wait for a complete checkpoint, not for trainer_state.json to exist: the Trainer opens it, then
        # writes it, and a kill in between leaves an empty file (which sft trims, as it should).
        while not sft.checkpoints(cfg):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert artifacts.read_manifest(out) is None
    survived = sft.checkpoints(cfg)
    last = survived[max(survived)]
    assert max(survived) < 20
    stamp = (last / "trainer_state.json").stat().st_mtime_ns

    sft.run(cfg, stream=False)
    assert list(sft.checkpoints(cfg)) == [4, 8, 12, 16, 20]
    assert json.loads((out / "checkpoint-20" / "trainer_state.json").read_text())["global_step"] == 20
    assert (last / "trainer_state.json").stat().st_mtime_ns == stamp, "the checkpoint resumed from is not redone"
    done = artifacts.read_manifest(out)["provenance"]
    assert done["resumed_from"] == last.name
    seen = json.loads((last / "trainer_state.json").read_text())["num_input_tokens_seen"]
    total = json.loads((out / "checkpoint-20" / "trainer_state.json").read_text())["num_input_tokens_seen"]
    assert 0 < seen < total and done["train_tokens"] == total - seen  # what this process trained, not the total
    assert f"resuming from {last}" in sft.log_tail(cfg, 10_000)
    table = sft.loss_table(cfg)
    assert not table.duplicated(["step", "curve"]).any()
    assert sorted(table.loc[table.curve == "id_test", "step"]) == list(range(0, 21, 2))
    assert sorted(table.loc[table.curve == "id_train", "step"]) == list(range(2, 21, 2))


def _fake_checkpoint(out, step, state="complete"):
    """state: the text of trainer_state.json, None for no such file, or "complete" for a valid one."""
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    if state is not None:
        text = json.dumps({"global_step": step}) if state == "complete" else state
        (path / "trainer_state.json").write_text(text)


# killed while saving: before trainer_state.json, or after the Trainer opened it and before it wrote
@pytest.mark.parametrize("killed_state", [None, "", '{"global_step": 6, "log_hist'])
def test_interrupted_directory_is_trimmed_to_its_last_complete_checkpoint(tmp_path, killed_state):
    out, spec = tmp_path / "sft", {"stage": "sft", "sft": {"learning_rate": 1}}
    _fake_checkpoint(out, 3)
    _fake_checkpoint(out, 6, state=killed_state)
    (out / artifacts.RUN_SPEC).write_text(json.dumps(spec))
    rows = "".join(f"{s},{c},1.0\n" for s in range(0, 7) for c in ("id_test", "ood"))
    (out / sft.LOSS_TABLE).write_text("step,curve,loss\n" + rows)
    sft._prepare_dir(out, spec, force=False)
    assert [p.name for p in sft._checkpoint_dirs(out)] == ["checkpoint-3"]
    assert sorted(set(pd.read_csv(out / sft.LOSS_TABLE)["step"])) == [0, 1, 2, 3]


@pytest.mark.parametrize("force", [False, True])
def test_stale_or_forced_directory_starts_afresh(tmp_path, force):
    out, spec = tmp_path / "sft", {"stage": "sft", "sft": {"learning_rate": 2}}
    _fake_checkpoint(out, 3)
    (out / artifacts.RUN_SPEC).write_text(json.dumps(spec if force else {"stage": "sft", "sft": {"learning_rate": 1}}))
    (out / sft.LOSS_TABLE).write_text("step,curve,loss\n0,id_test,7.0\n")
    sft._prepare_dir(out, spec, force=force)
    assert sorted(p.name for p in out.iterdir()) == [artifacts.RUN_SPEC]
    stale = sorted(tmp_path.glob("sft.stale-*"))
    if force:  # asked for: the old run is gone
        assert not stale
    else:  # a run of another config is never deleted: it is moved aside, checkpoints and loss table whole
        assert len(stale) == 1 and (stale[0] / "checkpoint-3" / "trainer_state.json").is_file()
        assert (stale[0] / sft.LOSS_TABLE).read_text().endswith("7.0\n")
    assert json.loads((out / artifacts.RUN_SPEC).read_text())["sft"] == {"learning_rate": 2}


def test_launch_command_round_trips_the_config_and_names_missing_accelerate_configs():
    cfg = config.load("qwen7b", sft__learning_rate=3e-6, model__name="/models/qwen", restore__top_ks=[4, 8])
    cmd = sft.launch_command(cfg)
    assert cmd[1:7] == ["-m", "accelerate.commands.launch", "--config_file",
                        str(config.PROJECT_ROOT / "configs" / "accelerate" / "zero3.yaml"), "--num_processes", "4"]
    items = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--override"]
    assert config.load("qwen7b", **launch.parse_overrides(items)) == cfg
    assert sft.launch_command(config.load("tiny"))[1:] == ["-m", "paper_lib.sft", "--preset", "tiny"]
    with pytest.raises(config.ConfigError, match=r"\['multi_cpu', 'multi_gpu', 'single', 'zero2', 'zero2_offload', 'zero3'\].*zero9"):  # at load time
        config.load("tiny", sft__accelerate_config="zero9")


def _tiny_mllama(path, tokenizer):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    vocab = len(tokenizer) + 1  # the last id is the image token
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    text = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, cross_attention_layers=[1], max_position_embeddings=1024, bos_token_id=pad,
                pad_token_id=pad, eos_token_id=eos, tie_word_embeddings=False)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=64,
                  vision_output_dim=64, image_size=28, patch_size=14, intermediate_layers_indices=[0])
    torch.manual_seed(0)
    MllamaForConditionalGeneration(MllamaConfig(text_config=text, vision_config=vision,
                                                image_token_index=vocab - 1)).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_mllama_shaped_model_trains_text_only(tmp_path):
    from transformers import MllamaForConditionalGeneration

    path = tmp_path / "Llama-3.2-11B-Vision-Instruct"
    _tiny_mllama(path, models.build_tiny_tokenizer(config.load("tiny")))
    cfg = config.load("tiny", model__name=str(path), **{**SMALL, "data.sft_size": 32, "sft.save_steps": 4})
    with one_thread():
        out = sft.train(cfg)
    assert list(sft.checkpoints(cfg)) == [4]
    model, _ = models.load(cfg, checkpoint=sft.checkpoint(cfg))
    assert isinstance(model, MllamaForConditionalGeneration)
    with safe_open(path / "model.safetensors", "pt") as before, \
            safe_open(sft.checkpoint(cfg) / "model.safetensors", "pt") as after:
        assert set(before.keys()) == set(after.keys())  # saved under the hub checkpoint's names
        changed = {k for k in before.keys() if not torch.equal(before.get_tensor(k), after.get_tensor(k))}
    assert changed and all("vision_model" not in k and "multi_modal_projector" not in k for k in changed)
    assert not any(".layers.1." in k for k in changed), "the cross-attention layer is frozen"
    assert any(k.startswith("language_model.model.layers.0.") for k in changed)
    assert "language_model.lm_head.weight" in changed
    table = pd.read_csv(out / sft.LOSS_TABLE)
    assert set(table["curve"]) == {"id_train", "id_test", "ood"} and table["loss"].notna().all()


def test_a_failing_run_raises_with_the_tail_of_its_log():
    cfg = config.load("tiny", **SMALL, sft__lr_scheduler="no_such_schedule")
    with pytest.raises(launch.StageError, match=r"(?s)exit code 2.*error: .*no_such_schedule"):
        sft.run(cfg, stream=False)
    assert artifacts.read_manifest(artifacts.sft_dir(cfg)) is None
