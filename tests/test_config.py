"""Config: presets load typed and frozen; overrides apply; unknown keys fail with the valid ones listed."""
import dataclasses

import pytest

from paper_lib import config


@pytest.mark.parametrize("preset", ["tiny", "smol", "qwen7b", "llama11b"])
def test_every_preset_loads_with_typed_values(preset):
    cfg = config.load(preset)
    assert cfg.preset == preset
    assert isinstance(cfg.sft.learning_rate, float)  # YAML's 1e-6 is a string to PyYAML
    assert isinstance(cfg.restore.top_ks, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sft.learning_rate = 1.0


def test_paper_settings_in_the_large_presets():
    for preset in ("qwen7b", "llama11b"):
        sft = config.load(preset).sft
        assert (sft.learning_rate, sft.per_device_batch_size * sft.num_processes) == (1e-6, 64)
        assert (sft.weight_decay, sft.save_steps, sft.eval_steps) == (0.0, 20, 5)
        # what the authors' DeepSpeed config ran (WarmupLR over 3% of 12,501 steps), with their AdamW
        assert (sft.lr_scheduler, sft.warmup_steps, sft.adam_beta2, sft.adam_eps) == ("warmup_log", 376, 0.98, 1e-7)
    rl = config.load("qwen7b").rl
    assert (rl.gamma, rl.gae_lambda, rl.clip_eps, rl.value_coef, rl.ppo_epochs, rl.max_grad_norm) == (
        0.9, 0.95, 0.1, 0.5, 4, 0.01)
    assert (rl.temperature, rl.max_new_tokens, rl.thought_prob_coef, rl.kl_coef) == (0.2, 512, 0.5, 0.0)
    # upstream's rollouts: T 0.2 over the checkpoint's own top_p/top_k and Qwen's 1.05; 128 attempts a step
    assert (rl.sampling, rl.repetition_penalty, rl.samples_per_step) == ("model", 1.05, 128)
    assert config.load("llama11b").rl.samples_per_step == 128
    assert (rl.save_every, config.load("llama11b").rl.save_every) == (50, 5)  # upstream's RL checkpoints
    assert (rl.seed, config.load("llama11b").rl.seed) == (0, 0)  # their launch scripts' --seed=0
    # the authors' env and scheduler: a 6th ungraded answer after 5 failures; the cosine stepped per process
    assert {(config.load(p).rl.episode_end, config.load(p).rl.lr_steps_per_update) for p in ("qwen7b", "llama11b")} == {
        ("upstream", "processes")}
    assert config.load("qwen7b").sft.text_format == "upstream_qwen"  # the authors' data_qwen.py text
    # upstream's key ids were Llama-3's (Qwen always took the last-5-tokens fallback); bf16 log-probs in both
    assert (rl.thought_split, rl.logprob_dtype) == ("last_tokens", "bfloat16")
    llama = config.load("llama11b").rl
    assert (llama.thought_split, llama.logprob_dtype) == ("formula_key", "bfloat16")
    # the answer tokens upstream's slicing scored, in the paper presets only
    assert [config.load(p).rl.scored_tokens for p in ("qwen7b", "llama11b", "smol", "tiny")] == ["upstream"] * 2 + ["all"] * 2


def test_overrides_in_every_form():
    cfg = config.load("tiny", sft__learning_rate="2e-5", **{"data.sft_size": 10}, eval={"max_attempts": 3},
                      model__tiny__layers=3)
    assert (cfg.sft.learning_rate, cfg.data.sft_size, cfg.eval.max_attempts, cfg.model.tiny.layers) == (
        2e-5, 10, 3, 3)
    assert config.load("tiny").sft.learning_rate == 1e-2  # the file is untouched


def test_unknown_keys_fail_with_the_valid_ones_listed():
    with pytest.raises(config.ConfigError, match=r"unknown key\(s\) \['lr'\] in sft; valid keys: \['learning_rate'"):
        config.load("tiny", sft__lr=1e-5)
    with pytest.raises(config.ConfigError, match=r"in top level; valid keys: \['preset', 'model'"):
        config.load("tiny", training={"lr": 1})
    with pytest.raises(config.ConfigError, match=r"in model.tiny; valid keys"):
        config.load("tiny", model__tiny__depth=1)


def test_unknown_keys_in_a_file_fail_too(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("model:\n  name: tiny\nsft:\n  learning_rat: 1e-5\n")
    with pytest.raises(config.ConfigError, match="learning_rat"):
        config.load(bad)
    good = tmp_path / "mine2.yaml"
    good.write_text("model:\n  name: /models/mine\nsft:\n  learning_rate: 3e-6\n")
    cfg = config.load(good)
    assert (cfg.preset, cfg.model.name, cfg.sft.learning_rate) == ("mine2", "/models/mine", 3e-6)


def test_bad_values_and_presets_fail_clearly():
    with pytest.raises(config.ConfigError, match="sft.save_steps must be int"):
        config.load("tiny", sft__save_steps=2.5)
    with pytest.raises(config.ConfigError, match="sft.bf16 must be bool"):
        config.load("tiny", sft__bf16="maybe")
    with pytest.raises(config.ConfigError, match=r"unknown preset 'qwen70b'; choose one of \["):
        config.load("qwen70b")


def test_whole_numbers_are_read_exactly_and_seeds_fit_every_library():
    # int(float(x)) would turn 2**53 + 1 into 2**53: a different seed, silently
    assert config.load("tiny", sft__save_steps=2**53 + 1).sft.save_steps == 2**53 + 1
    assert config.load("tiny", sft__save_steps="9007199254740993").sft.save_steps == 2**53 + 1
    assert config.load("tiny", sft__save_steps=1e3).sft.save_steps == 1000  # YAML reads 1e3 as a float
    with pytest.raises(config.ConfigError, match="sft.save_steps must be int"):
        config.load("tiny", sft__save_steps=2.0**60)  # a float that far out has lost its last digits
    assert config.load("tiny", eval__seed=2**31 - 1).eval.seed == 2**31 - 1
    for key in config.SEEDS:  # transformers.set_seed refuses -1 and 2**32; rl and eval add to theirs
        for bad in (-1, 2**31):
            with pytest.raises(config.ConfigError, match=rf"{key} must be a seed in \[0, 2\*\*31\), got {bad}"):
                config.load("tiny", **{key: bad})


def test_section_hash_tracks_only_the_named_sections():
    a, b = config.load("tiny"), config.load("tiny", sft__learning_rate=1e-4)
    assert a.section_hash("data") == b.section_hash("data")
    assert a.section_hash("sft") != b.section_hash("sft")
    assert a.section_hash() != b.section_hash()


@pytest.mark.parametrize("section", ["sft", "rl", "eval"])
def test_several_processes_need_a_launcher_that_starts_several(section):
    """accelerate's simple launcher runs one process for single.yaml whatever --num_processes says."""
    assert config.launcher("single").distributed_type == "NO"
    with pytest.raises(config.ConfigError, match=rf"{section}.num_processes is 2 but {section}.accelerate_config "
                                                 r"'single' runs one process .*multi_cpu"):
        config.load("tiny", **{f"{section}.num_processes": 2})
    assert config.load("tiny", **{f"{section}.num_processes": 2, f"{section}.accelerate_config": "multi_cpu"})
    assert config.load("qwen7b", **{f"{section}.num_processes": 1}).sft.accelerate_config == "zero3"


def test_evaluation_takes_no_deepspeed_config_and_its_processes_do_not_change_its_episodes():
    """Evaluation holds a whole model per process; the process count says where episodes are played, so a
    cache made on one process stays valid on four (evaluate.episode_settings)."""
    from paper_lib import evaluate

    with pytest.raises(config.ConfigError, match=r"eval.accelerate_config 'zero3' is DeepSpeed.*multi_gpu"):
        config.load("tiny", eval__accelerate_config="zero3")
    with pytest.raises(config.ConfigError, match=r"launches several \(multi_cpu, multi_gpu\) or"):
        config.load("tiny", eval__num_processes=4)
    four = config.load("tiny", eval__num_processes=4, eval__accelerate_config="multi_gpu")
    assert evaluate.episode_settings(four) == evaluate.episode_settings(config.load("tiny"))
    assert evaluate.episode_settings(config.load("tiny", eval__max_attempts=3)) != evaluate.episode_settings(four)
    assert config.load("qwen7b").eval.num_processes == 4 and config.load("smol").eval.num_processes == 1


def test_a_launch_of_more_gpu_processes_than_gpus_stops_in_one_line(monkeypatch):
    import torch

    from paper_lib import launch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(launch.StageError, match=r"eval.num_processes is 4 but this machine shows 2 GPU\(s\).*"
                                                r"--override eval.num_processes=2"):
        launch.check_gpu_count(config.load("qwen7b"), "eval")
    launch.check_gpu_count(config.load("qwen7b", eval__num_processes=2), "eval")
    launch.check_gpu_count(config.load("tiny"), "sft")  # one process
    # multi_cpu runs its processes on the CPU whatever GPUs there are
    launch.check_gpu_count(config.load("tiny", rl__num_processes=4, rl__accelerate_config="multi_cpu"), "rl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    launch.check_gpu_count(config.load("qwen7b"), "eval")  # no CUDA: the processes run on the CPU


def test_a_stage_on_another_process_count_than_its_config_stops():
    from types import SimpleNamespace

    from paper_lib import launch
    launch.check_process_count(SimpleNamespace(num_processes=4), "sft", 4)
    with pytest.raises(launch.StageError, match=r"running 1 process\(es\) but rl.num_processes is 4: launch 4 "
                                                r".*--override rl.num_processes=1"):
        launch.check_process_count(SimpleNamespace(num_processes=1), "rl", 4)


def test_a_launcher_reads_what_its_accelerate_file_asks(tmp_path):
    """config.launcher: the one reader of configs/accelerate/*.yaml (by name) or of a user's file (by path)."""
    assert config.launcher("zero2_offload") == config.Launcher("DEEPSPEED", 2, True, False, 4)
    assert config.launcher("zero2").offload_optimizer is False
    assert config.launcher("multi_cpu") == config.Launcher("MULTI_GPU", None, False, True, 2)
    own = tmp_path / "own.yaml"
    own.write_text("distributed_type: deepspeed\ndeepspeed_config:\n  offload_optimizer_device: cpu\n")
    assert config.launcher(own) == config.Launcher("DEEPSPEED", 0, True, False, 1)
    own.write_text("")
    assert config.launcher(own) == config.Launcher("NO", None, False, False, 1)


def test_ppo_refuses_a_zero3_accelerate_config():
    """ZeRO-3 partitions the weights, and a PPO checkpoint takes them from one process."""
    assert [config.launcher(name).zero_stage for name in ("zero2", "zero3", "single")] == [2, 3, None]
    with pytest.raises(config.ConfigError, match="ZeRO-3"):
        config.load("tiny", rl__accelerate_config="zero3")
    assert config.load("tiny", sft__accelerate_config="zero3").sft.accelerate_config == "zero3"
