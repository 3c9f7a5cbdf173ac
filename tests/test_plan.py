"""paper_lib.plan's arithmetic against hand-computed values for a small shape, and the plan of every preset
without GPU or network."""
import pytest

from paper_lib import config, plan

SMALL = plan.Shape(layers=2, hidden=8, intermediate=16, vocab=10, heads=2, kv_heads=1)


def test_parameter_count_by_hand():
    # head_dim 4, k/v width 4: attention 8*8*2 + 8*4*2 = 192, MLP 3*8*16 = 384, norms 2*8 -> 592 a layer;
    # 2 layers 1184, embeddings and lm_head 2*10*8 = 160, final norm 8
    assert plan.count_params(SMALL) == 1352
    assert plan.count_params(plan.Shape(2, 8, 16, 10, 2, 1, tied=True)) == 1352 - 80
    assert plan.count_params(plan.Shape(2, 8, 16, 10, 2, 1, qkv_bias=True)) == 1352 + 2 * (8 + 4 + 4)


def test_qwen7b_count_matches_the_published_one():
    assert plan.count_params(plan.SHAPES["Qwen/Qwen2.5-7B-Instruct"]) == pytest.approx(7.62e9, rel=1e-3)


def test_memory_per_device_by_hand():
    # 1000 parameters on 4 processes; ZeRO-2 shards gradients (2 B) and Adam state (12 B), not the weights
    # and at each step the fp32 gradients of its partition (4 B over 4); 10 tokens of K and V cache
    m = plan.gpu_memory(1000, SMALL, stage=2, offload=False, processes=4, batch=2, seq=3, checkpointing=False,
                        kv_tokens=10)
    head_dim = SMALL.hidden // SMALL.heads
    assert m == {"weights": 2000, "gradients": 500, "optimizer": 3000, "activations": 34 * 3 * 2 * 8 * 2,
                 "step gradients": 1000, "kv cache": 2 * 2 * SMALL.kv_heads * head_dim * 2 * 10}
    assert plan.peak(m) == 2000 + 500 + 3000 + max(34 * 3 * 2 * 8 * 2, 1000, m["kv cache"])
    m = plan.gpu_memory(1000, SMALL, stage=3, offload=True, processes=4, batch=2, seq=3, checkpointing=True)
    assert m == {"weights": 500, "gradients": 500, "optimizer": 0, "activations": 2 * 3 * 2 * 8 * 2,
                 "step gradients": 0, "kv cache": 0}  # offload: the optimizer's fp32 work is on the CPU
    assert plan.checkpoint_bytes(1000, 2) == (2000, 14000)


def test_sft_checkpoints_and_disk():
    cfg = config.load("tiny", **{"data.sft_size": 100, "sft.per_device_batch_size": 10, "sft.save_steps": 3})
    p = plan.plan(cfg)
    assert plan.sft_steps(cfg) == 10
    assert p["stages"]["sft"]["checkpoints"] == 4  # 3, 6, 9 and the last step, 10
    weights, latest = plan.checkpoint_bytes(p["params"], 4)  # tiny is float32
    assert p["stages"]["sft"]["disk"] == 3 * weights + latest


@pytest.mark.parametrize("preset", ["tiny", "smol", "qwen7b", "llama11b"])
def test_every_preset_has_a_plan(preset, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = plan.render(plan.plan(config.load(preset)), free=1e9)
    assert "sft:" in text and "rl:" in text and "generations" in text
    if preset in ("qwen7b", "llama11b"):
        assert "WARNING: not enough free disk" in text and "sft.save_steps" in text


def test_sft_activation_checkpointing_is_what_fits_qwen7b_on_80gb(monkeypatch):
    """SFT recomputes activations on GPU (sft.gradient_checkpointing, on by default); without it the 7B
    preset's batch of 16 x 1024 tokens would not fit an 80 GB device."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    on = plan.plan(config.load("qwen7b"))["stages"]["sft"]["memory"]
    off = plan.plan(config.load("qwen7b", sft__gradient_checkpointing=False))["stages"]["sft"]["memory"]
    assert plan.peak(on) < plan.GPU_GB * plan.GB < plan.peak(off)
    assert off["activations"] == 17 * on["activations"]


def test_plan_counts_the_checkpoints_the_sweep_evaluates():
    # 10 SFT steps saved every 3 (3, 6, 9, 10); eval.sft_every 6 keeps 6, the named 3 and the last, 10
    cfg = config.load("tiny", **{"data.sft_size": 100, "sft.per_device_batch_size": 10, "sft.save_steps": 3,
                                 "eval.sft_every": 6, "sft.inter_sft_step": 3, "sft.full_sft_step": 10,
                                 "rl.num_updates": 4, "rl.save_every": 2})
    p = plan.plan(cfg)
    assert p["eval"]["checkpoints"] == 1 + 3 + 2 + p["restore"]["checkpoints"]  # base, SFT 3/6/10, RL 2/4, restores


def test_plan_counts_the_restored_checkpoints_and_their_disk():
    # qwen7b: 4 variants x (layers 0-9, 10-19, 20-27, 0-6 + 7 top-ks and 717) + causal (every rank + 3 top-ks)
    p = plan.plan(config.load("qwen7b"))
    assert p["restore"]["checkpoints"] == 4 * (4 + 8) + 4
    assert p["restore"]["disk"] == 52 * 2 * p["params"]  # bf16, as the full-SFT checkpoint under ZeRO-3
    assert plan.plan(config.load("qwen7b", restore__sources=["base"], restore__keeps=["target-sigma"],
                                 restore__causal_top_ks=[]))["restore"]["checkpoints"] == 12 + 1
    # tiny: 4 variants x (layers 0-0, 1-1 + ranks 13, 32) + causal (every rank + 32)
    assert plan.plan(config.load("tiny"))["restore"]["checkpoints"] == 4 * 4 + 2


def test_checkpoints_are_sized_as_the_stages_save_them(monkeypatch):
    """Without DeepSpeed (smol) SFT saves its float32 master weights although model.dtype is bfloat16;
    under ZeRO-3 (qwen7b) the 16-bit weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for preset, bytes_per_param, saved in (("smol", 4, 12), ("qwen7b", 2, 80)):
        p = plan.plan(config.load(preset))
        weights, latest = plan.checkpoint_bytes(p["params"], bytes_per_param)
        assert p["stages"]["sft"]["checkpoints"] == saved
        assert p["stages"]["sft"]["disk"] == (saved - 1) * weights + latest


def test_time_is_scaled_from_the_last_run_here(tmp_path, monkeypatch):
    """The stages' own records (manifest seconds, rl/metrics.csv) scaled to this plan by hand: SFT per
    trained example (a resumed run counts only the steps it trained), RL per update of so many attempts
    without the first update, evaluation per hand with the median checkpoint."""
    import csv

    from paper_lib import artifacts

    settings = {"data.sft_size": 200, "data.test_size": 25, "sft.per_device_batch_size": 10, "rl.steps_per_update": 16,
                "rl.num_updates": 10, "restore.sources": ["base"], "restore.keeps": ["target-sigma"],
                "restore.top_ks": [13], "restore.causal_top_ks": []}
    cfg = config.load("tiny", **settings)
    assert "no measurement" in plan.render(plan.plan(cfg), free=1e12, times=plan.measured_times(cfg, plan.plan(cfg)))
    for d in (artifacts.sft_dir(cfg), artifacts.rl_dir(cfg)):
        d.mkdir(parents=True)
    batch = {"per_device_batch_size": 5, "gradient_accumulation_steps": 2, "num_processes": 1}
    artifacts.write_manifest(artifacts.sft_dir(cfg), {"stage": "sft", "sft": batch, "base_model": {"name": "tiny"}},
                             seconds=40.0, final_step=20, resumed_from="checkpoint-10", processes=1, device="GPU X")
    artifacts.write_manifest(artifacts.rl_dir(cfg), {"stage": "rl", "rl": {"steps_per_update": 8}})
    with open(artifacts.rl_dir(cfg) / "metrics.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["update", "seconds"], [1, 30.0], [2, 2.0], [3, 4.0]])
    for label, seconds in (("a", 2.0), ("b", 4.0), ("c", 40.0)):  # 0.1, 0.2 and 2 s a hand of 20
        (artifacts.eval_dir(cfg) / label).mkdir(parents=True)
        artifacts.write_manifest(artifacts.eval_dir(cfg) / label, {"stage": "eval", "data": {"test_size": 10}},
                                 seconds=seconds)
    p = plan.plan(cfg)
    times = plan.measured_times(cfg, p)
    # 10 steps x 10 examples in 40 s; this plan: 20 steps x 10
    assert times["sft"].startswith("~80 s, scaled from the last run here (10 steps in 40 s, on GPU X, ")
    # (2 + 4) / 2 s an update of 8 attempts; this plan: 10 updates of 16
    assert times["rl"].startswith("~60 s, scaled from the last run here (3.0 s an update of 8 attempts")
    # 0.2 s a hand x 50 hands a checkpoint
    assert times["eval"].startswith(f"~{10 * p['eval']['checkpoints']:.0f} s, scaled from the last run here "
                                    "(a median 10.0 s a checkpoint over 3")
    assert times["sft"] in plan.render(p, free=1e12, times=times)
    # 4 processes, each taking whole checkpoints: a quarter of them each, rounded up
    four = config.load("tiny", **settings, **{"eval.num_processes": 4, "eval.accelerate_config": "multi_cpu"})
    quarter = plan.measured_times(four, plan.plan(four))["eval"]
    assert quarter.startswith(f"~{10 * -(-p['eval']['checkpoints'] // 4):.0f} s, scaled") and ", 4 at a time" in quarter
    # a checkpoint whose hands were split over 2 processes took half of one process's time
    artifacts.write_manifest(artifacts.eval_dir(cfg) / "b", {"stage": "eval", "data": {"test_size": 10}},
                             seconds=2.0, processes=2)
    assert plan.measured_times(cfg, p)["eval"] == times["eval"]
    other = config.load("tiny", **{"model.name": "smol"})  # same runs/tiny, another model
    assert "sft" not in plan.measured_times(other, plan.plan(other))  # another model's SFT says nothing
