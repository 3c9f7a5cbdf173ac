"""Direction restore: the identities, σ kept, streaming equals in-memory, checkpoints that load."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from paper_lib import artifacts, restore, restore_eval, weights
from paper_lib.restore import Plan, restore_directions


def pair(m=12, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    W_tgt = torch.randn(m, n, generator=g, dtype=torch.float64)
    W_src = W_tgt + 0.3 * torch.randn(m, n, generator=g, dtype=torch.float64)
    return W_tgt, W_src


def svals(W):
    return torch.linalg.svdvals(W)


def test_top_zero_and_tail_zero_return_the_target_unchanged():
    W_tgt, W_src = pair()
    assert torch.equal(restore_directions(W_tgt, W_src, top=0, tail=0, dtype="float64"), W_tgt)


def test_full_rank_gives_source_directions_with_target_sigma():
    W_tgt, W_src = pair()
    out = restore_directions(W_tgt, W_src, top=8, dtype="float64")
    Us, _, Vhs = torch.linalg.svd(W_src, full_matrices=False)
    assert torch.allclose(out, Us @ torch.diag(svals(W_tgt)) @ Vhs, atol=1e-12)
    assert torch.allclose(svals(out), svals(W_tgt), atol=1e-12)  # σ kept exactly
    assert torch.allclose(restore_directions(W_tgt, W_src, top=99, dtype="float64"), out, atol=1e-12)  # clipped
    assert torch.allclose(restore_directions(W_tgt, W_src, top=8, keep="source", dtype="float64"), W_src, atol=1e-12)


def test_partial_restore_moves_only_the_chosen_directions():
    W_tgt, W_src = pair()
    out = restore_directions(W_tgt, W_src, top=3, tail=2, dtype="float64")
    Ut, St, Vht = torch.linalg.svd(W_tgt, full_matrices=False)
    Us, _, Vhs = torch.linalg.svd(W_src, full_matrices=False)
    keep = slice(3, 6)
    expected = (Us[:, :3] * St[:3]) @ Vhs[:3] + (Ut[:, keep] * St[keep]) @ Vht[keep] + (Us[:, 6:] * St[6:]) @ Vhs[6:]
    assert torch.allclose(out, expected, atol=1e-12)
    assert not torch.allclose(out, W_tgt) and not torch.allclose(out, W_src)


def test_bad_arguments():
    W_tgt, W_src = pair()
    with pytest.raises(ValueError, match="one shape"):
        restore_directions(W_tgt, W_src[:, :4], top=2)
    with pytest.raises(ValueError, match="keep must be one of"):
        restore_directions(W_tgt, W_src, top=2, keep="mine")


def tiny_qwen(path, seed):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(path)
    return model


def test_layer_restore_writes_a_checkpoint_that_loads_and_touches_only_those_layers(tmp_path):
    tiny_qwen(tmp_path / "tgt", 0)
    tiny_qwen(tmp_path / "src", 1)
    out = restore.write_restored(tmp_path / "tgt", tmp_path / "src", tmp_path / "out", Plan(layers=(1, 1)),
                                 dtype="float64", device="cpu", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
    before, after, src = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "tgt", out, tmp_path / "src"))
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n in before if n.startswith("model.layers.1.") and n.endswith("_proj.weight")}
    for name in changed:  # streaming equals the in-memory restore, matrix by matrix
        rank = min(before[name].shape)
        expected = restore_directions(before[name], src[name], top=rank, dtype="float64")
        assert torch.allclose(after[name], expected, atol=1e-6)
        assert torch.allclose(svals(after[name].double()), svals(before[name].double()), atol=1e-5)
    manifest = json.loads((out / "restore_manifest.json").read_text())
    assert {r["name"] for r in manifest["restored"]} == changed and manifest["plan"]["layers"] == [1, 1]


def test_top_k_restore_with_the_svd_cache(tmp_path):
    tiny_qwen(tmp_path / "tgt", 0)
    tiny_qwen(tmp_path / "src", 1)
    cache = tmp_path / "cache"
    plan = Plan(top=4)
    out = restore.write_restored(tmp_path / "tgt", tmp_path / "src", tmp_path / "out", plan, cache_dir=cache,
                                 device="cpu", progress=False)
    cached = sorted(cache.iterdir())
    assert cached  # decompositions were stored for reuse
    again = restore.write_restored(tmp_path / "tgt", tmp_path / "src", tmp_path / "out2", plan, cache_dir=cache,
                                   device="cpu", progress=False)
    assert sorted(cache.iterdir()) == cached  # ... and reused, not recomputed
    a, b = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)
    restored = json.loads((out / "restore_manifest.json").read_text())["restored"]
    assert {r["top"] for r in restored} == {4}
    assert any("embed_tokens" in r["name"] for r in restored)  # every matrix, embeddings too


@pytest.mark.parametrize("top, keep, whole", [(8, "target-sigma-reset", False), (16, "target-sigma-reset", True),
                                             (16, "target-sigma", False), (16, "source", True)])
def test_a_restore_whose_k_reaches_every_rank_is_known_as_a_reset(tmp_path, top, keep, whole):
    # ranks: k/v_proj 8, every other matrix 16, as Qwen2.5-7B's 512 and 3584 at the authors' top 3584
    tiny_qwen(tmp_path / "tgt", 0)
    tiny_qwen(tmp_path / "src", 1)
    out = restore.write_restored(tmp_path / "tgt", tmp_path / "src", tmp_path / "out", Plan(top=top, keep=keep),
                                 device="cpu", progress=False)
    assert restore.replaced_whole(out) is whole
    assert restore.replaced_whole(tmp_path / "tgt") is False  # not a restore at all


def test_mismatched_checkpoints_fail_clearly(tmp_path):
    tiny_qwen(tmp_path / "tgt", 0)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=3,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "big")
    with pytest.raises(weights.WeightsError, match="lacks or reshapes"):
        restore.write_restored(tmp_path / "tgt", tmp_path / "big", tmp_path / "out", Plan(top=2), progress=False)
    assert restore.main(["--target", str(tmp_path / "tgt"), "--source", str(tmp_path / "big"), "--top", "2",
                         "--out", str(tmp_path / "o")]) == 2


def test_layer_blocks_and_prefixes():
    assert restore_eval.layer_blocks(28, 10) == [(0, 9), (10, 19), (20, 27)]
    assert restore_eval.layer_blocks(2, 1) == [(0, 0), (1, 1)]
    assert restore_eval.layer_prefixes(40, 5) == [(0, b) for b in (4, 9, 14, 19, 24, 29, 34, 39)]  # run_batch_eval.sh's
    assert restore_eval.layer_prefixes(28, 10) == [(0, 9), (0, 19), (0, 27)]


def test_full_rank_with_keep_source_is_exactly_the_source():
    W_tgt, W_src = pair()
    assert torch.equal(restore_directions(W_tgt, W_src, top=8, keep="source"), W_src)
    assert torch.equal(restore_directions(W_tgt, W_src, top=5, tail=3, keep="source"), W_src)
    assert not torch.equal(restore_directions(W_tgt, W_src, top=7, keep="source", dtype="float64"), W_src)


def test_a_full_rank_swap_from_a_source_of_another_dtype_keeps_the_targets_dtype(tmp_path):
    """The full-rank shortcut once returned the source's own tensor, so a float32 source put float32 matrices
    into a bfloat16 checkpoint (twice its size, and a shard index whose total_size was wrong)."""
    tgt, src = tmp_path / "T", tmp_path / "S"
    tiny_qwen(tgt, 0).to(torch.bfloat16).save_pretrained(tgt)
    tiny_qwen(src, 1)
    for keep, how in (("source", Plan(top=10_000, keep="source")), ("target-sigma-reset", Plan(keep="target-sigma-reset"))):
        out = restore.write_restored(tgt, src, tmp_path / keep, how, device="cpu", progress=False)
        written = load_file(out / "model.safetensors")
        assert {t.dtype for t in written.values()} == {torch.bfloat16}
        source = load_file(src / "model.safetensors")
        name = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(written[name], source[name].to(torch.bfloat16))
        assert (out / "model.safetensors").stat().st_size == (tgt / "model.safetensors").stat().st_size


def test_target_sigma_reset_keeps_sigma_until_every_rank_then_is_the_source():
    """The authors' svd_recover_dir: the target's σ while k < rank, the source whole once k >= rank."""
    W_tgt, W_src = pair()
    for top, tail in ((3, 0), (3, 2), (7, 0)):
        assert torch.equal(restore_directions(W_tgt, W_src, top=top, tail=tail, keep="target-sigma-reset", dtype="float64"),
                           restore_directions(W_tgt, W_src, top=top, tail=tail, dtype="float64"))
    for top, tail in ((8, 0), (99, 0), (5, 3)):
        assert torch.equal(restore_directions(W_tgt, W_src, top=top, tail=tail, keep="target-sigma-reset"), W_src)


def test_causal_plans_add_the_authors_top_k_to_every_rank():
    from paper_lib import config

    plans = restore_eval.causal_plans(config.load("qwen7b"))
    assert list(plans) == ["every rank", "top 2560", "top 3072", "top 3584"]
    assert plans["every rank"] == Plan() and plans["top 3072"] == Plan(top=3072, keep="target-sigma-reset")
    assert list(restore_eval.causal_plans(config.load("smol"))) == ["every rank"]


@pytest.mark.parametrize("preset, layers, hidden, first_quarter, top20", [
    ("qwen7b", 28, 3584, (0, 6), 717),  # Qwen2.5-7B: layers 0-6, 717 ranks (PAPER_SPEC 6)
    ("llama11b", 40, 4096, (0, 9), 819),  # Llama-3.2-11B's 40 text layers, hidden 4096
    ("smol", 30, 576, (0, 6), 115),
    ("tiny", 2, 64, (0, 0), 13),
])
def test_the_claims_points_are_in_every_presets_sweeps(preset, layers, hidden, first_quarter, top20):
    from paper_lib import config

    assert restore_eval.claim_points(layers, hidden) == (first_quarter, top20)
    layer_ranges, top_ks = restore_eval.sweeps(config.load(preset), layers, hidden)
    assert first_quarter in layer_ranges and top20 in top_ks
    assert max(b for _, b in layer_ranges) == layers - 1  # the blocks still cover every layer
    prefixes, _ = restore_eval.sweeps(config.load(preset, restore__layer_sweep="prefixes"), layers, hidden)
    assert first_quarter in prefixes and {a for a, _ in prefixes} == {0} and prefixes[-1] == (0, layers - 1)


def test_claim_points_come_from_the_checkpoints_shape(tmp_path):
    path = tmp_path / "m"
    tiny_qwen(path, seed=0)
    layers, hidden = restore.model_dims(path)
    assert restore_eval.claim_points(layers, hidden) == ((0, max(1, layers // 4) - 1), round(0.2 * hidden))


def test_layer_plans_take_embeddings_only_when_asked():
    embed, head, q0 = "model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"
    assert not Plan(layers=(0, 0)).applies(embed) and Plan(layers=(0, 0)).applies(q0)
    both = Plan(layers=(0, 0), with_embeddings=True)
    assert both.applies(embed) and both.applies(head) and not both.applies("model.layers.1.mlp.up_proj.weight")


def test_variants_cross_sources_and_keeps():
    from paper_lib import config

    names = [v.name for v in restore_eval.variants(config.load("qwen7b"))]
    assert names == ["base.target-sigma", "base.source", "inter_sft.target-sigma", "inter_sft.source"]
    with pytest.raises(ValueError, match="restore.sources"):
        restore_eval.variants(config.load("tiny", restore__sources=["sft"]))


def test_missing_target_names_the_side_and_the_fix(tmp_path, capsys):
    tiny_qwen(tmp_path / "src", 1)
    assert restore.main(["--target", str(tmp_path / "nope"), "--source", str(tmp_path / "src"), "--top", "2",
                         "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint 'target': " in err and "nope does not exist; pass the directory that save_pretrained" in err


def test_out_inside_an_input_is_refused_and_the_input_untouched(tmp_path):
    tiny_qwen(tmp_path / "tgt", 0)
    tiny_qwen(tmp_path / "src", 1)
    before = sorted(p.name for p in (tmp_path / "tgt").iterdir())
    with pytest.raises(artifacts.ArtifactError, match="lies inside or contains the input"):
        restore.write_restored(tmp_path / "tgt", tmp_path / "src", tmp_path / "tgt" / "restored", Plan(top=2),
                               progress=False)
    assert sorted(p.name for p in (tmp_path / "tgt").iterdir()) == before


def test_layers_beyond_the_model_and_sources_of_another_depth_fail_clearly(tmp_path):
    tiny_qwen(tmp_path / "tgt", 0)  # layers 0-2
    tiny_qwen(tmp_path / "src", 1)
    with pytest.raises(weights.WeightsError, match="--layers 1-9 goes past the last layer .* layers 0-2"):
        restore.write_restored(tmp_path / "tgt", tmp_path / "src", tmp_path / "out", Plan(layers=(1, 9)),
                               progress=False)
    torch.manual_seed(0)  # every matrix has the target's shape, but there are 5 layers
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=5,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
                     ).save_pretrained(tmp_path / "deep")
    with pytest.raises(weights.WeightsError, match="has 3 layers, source .*deep 5; restore between checkpoints "
                                                   "of one model"):
        restore.write_restored(tmp_path / "tgt", tmp_path / "deep", tmp_path / "out", Plan(top=2), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_without_attention_layers_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "embed_only").mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(64, 16)}, str(tmp_path / "embed_only" / "model.safetensors"))
    with pytest.raises(weights.WeightsError, match="'model' .* has no attention layers"):
        restore.model_dims(tmp_path / "embed_only")


@pytest.mark.parametrize("argv, message", [
    (["--layers", "3-1"], "first <= last"),
    (["--layers", "a-b"], "layers look like 0-9"),
    (["--layers", "0-1", "--tail", "2"], "--tail goes with --top K only"),
])
def test_cli_refuses_malformed_layers_and_a_tail_it_would_ignore(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as done:
        restore.main(["--target", str(tmp_path / "t"), "--source", str(tmp_path / "s"), "--out",
                      str(tmp_path / "o"), *argv])
    assert done.value.code == 2 and message in capsys.readouterr().err


def test_top_zero_warns_that_the_output_is_a_copy_of_the_target(tmp_path, caplog):
    tiny_qwen(tmp_path / "tgt", 0)
    tiny_qwen(tmp_path / "src", 1)
    with caplog.at_level("WARNING", logger="paper_lib.restore"):
        out = restore.write_restored(tmp_path / "tgt", tmp_path / "src", tmp_path / "out", Plan(top=0), progress=False)
    assert "--top 0 restores no rank" in caplog.text
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "tgt" / "model.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in b)


def test_sweep_jobs_restore_every_variants_ranges_and_ranks_into_full_sft(tmp_path):
    """restore_eval.sweep_jobs: per variant, one restore per layer range and per k, the claim's two points
    flagged once each, every label its own directory; base's or Inter_SFT's directions by the variant."""
    from paper_lib import config, evaluate

    for name, seed in (("base", 0), ("sft-0002", 1), ("sft-0004", 2)):
        tiny_qwen(tmp_path / name, seed)
    by_label = {name: artifacts.Checkpoint(name, "sft", 0, tmp_path / name) for name in ("base", "sft-0002", "sft-0004")}
    named = evaluate.Named("base", "sft-0002", "sft-0004", None)
    cfg = config.load("tiny", restore__top_ks=[4, 16])  # 3 layers, hidden 16: 20% is 3
    jobs = restore_eval.sweep_jobs(cfg, named, by_label)
    variants = restore_eval.variants(cfg)
    layer_ranges, top_ks = restore_eval.sweeps(cfg, 3, 16)
    assert len(jobs) == len(variants) * (len(layer_ranges) + len(top_ks)) and top_ks == [3, 4, 16]
    assert len({job.label for job in jobs}) == len(jobs)
    for variant in variants:
        mine = [job for job in jobs if job.variant == variant]
        assert {job.source.label for job in mine} == {"base" if variant.source == "base" else "sft-0002"}
        assert [job.setting for job in mine if job.claim_point] == ["0-0", "3"]
        assert all(job.plan.keep == variant.keep for job in mine)
