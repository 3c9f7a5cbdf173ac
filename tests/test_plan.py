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
    m = plan.gpu_memory(1000, SMALL, stage=2, offload=False, processes=4, batch=2, seq=3, checkpointing=False)
    assert m == {"weights": 2000, "gradients": 500, "optimizer": 3000, "activations": 34 * 3 * 2 * 8 * 2}
    m = plan.gpu_memory(1000, SMALL, stage=3, offload=True, processes=4, batch=2, seq=3, checkpointing=True)
    assert m == {"weights": 500, "gradients": 500, "optimizer": 0, "activations": 2 * 3 * 2 * 8 * 2}
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
