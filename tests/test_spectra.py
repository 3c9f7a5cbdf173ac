"""paper_lib.spectra: accurate principal angles, rotation behaviour, streaming == in-memory, name matching
for Qwen2- and Mllama-shaped checkpoints, and clear errors for checkpoints that do not match."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from scipy.linalg import subspace_angles
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from paper_lib import artifacts, restore, spectra, weights  # noqa: E402
from paper_lib.spectra import SpectraError, analyze_pairs, load_pair, principal_angles, rotation_angles  # noqa: E402

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KNOWN = torch.tensor([1e-9, 1e-6, 1e-3, 0.3, 1.0, math.pi / 2], dtype=torch.float64)


def known_pair(m=20, seed=0):
    """Orthonormal A, B (m×6) whose principal angles are exactly KNOWN, with B's basis mixed."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(m, 12, generator=g, dtype=torch.float64))
    A = Q[:, :6]
    B = Q[:, :6] * torch.cos(KNOWN) + Q[:, 6:] * torch.sin(KNOWN)
    R, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    return A, B @ R


# ------------------------------------------------------------------------------------------- angles
@pytest.mark.parametrize("m", [20, 20000])  # 20000 rows: the sines go through the blocked (TSQR) path
def test_principal_angles_known_mixed_tiny_and_large(m):
    A, B = known_pair(m)
    got = principal_angles(A, B)
    assert got.dtype == torch.float64
    assert torch.all(got[1:] >= got[:-1])  # ascending
    assert torch.max(torch.abs(got - KNOWN)) < 1e-12
    # Non-orthonormal bases of the same spaces are orthonormalised first.
    T = torch.triu(torch.rand(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))) + torch.eye(6)
    assert torch.max(torch.abs(principal_angles(A @ T, 3.0 * B) - KNOWN)) < 1e-12
    # Different dimensions: the first three columns of A against all of B give the first three angles.
    assert torch.max(torch.abs(principal_angles(A[:, :3], B) - KNOWN[:3])) < 1e-12
    assert torch.max(torch.abs(principal_angles(B, A[:, :3]) - KNOWN[:3])) < 1e-12
    # A basis of the whole space contains every subspace (k = rank of a square matrix: all angles 0).
    if m == 20:
        full = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64)).Q
        assert torch.equal(principal_angles(full, B), torch.zeros(6, dtype=torch.float64))


def test_a_rank_deficient_input_has_as_many_angles_as_its_rank():
    """A low-rank update (ΔW of rank 2 in 10 columns) spans 2 dimensions: QR alone would add 8 arbitrary
    basis vectors, and so angles of up to 90° between two equal subspaces."""
    g = torch.Generator().manual_seed(0)
    U = torch.randn(50, 2, dtype=torch.float64, generator=g)
    dA = U @ torch.randn(2, 10, dtype=torch.float64, generator=g)
    dB = U @ torch.randn(2, 10, dtype=torch.float64, generator=g)
    got = principal_angles(dA, dB)
    assert got.shape == (2,) and got.abs().max() < 1e-12
    np.testing.assert_allclose(got.numpy(), subspace_angles(dA.numpy(), dB.numpy())[::-1], atol=1e-12)
    a, b = torch.randn(50, 1, dtype=torch.float64, generator=g), torch.randn(50, 1, dtype=torch.float64, generator=g)
    assert principal_angles(torch.cat([a, 0 * a], 1), torch.cat([a, b], 1)).abs().max() < 1e-12  # a zero column
    assert principal_angles(torch.zeros(50, 3), torch.cat([a, b], 1)).numel() == 0  # no column space at all


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(half):
    A, B = (torch.randn(64, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    got = principal_angles(A.to(half), B.to(half))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), principal_angles(A.to(half).float(), B.to(half).float()).numpy())


def test_arccos_only_loses_the_tiny_angles():
    """What the sines buy: cosines alone (as in scipy's large-angle branch) return 0 for 1e-9."""
    A, B = known_pair()
    arccos_only = torch.arccos(torch.linalg.svdvals(A.T @ B).clamp(max=1)).flip(0)
    assert abs(arccos_only[0] - KNOWN[0]) > 1e-10  # arccos(1 - 5e-19) == 0 in float64
    assert abs(principal_angles(A, B)[0] - KNOWN[0]) < 1e-12


def test_rotation_angles_match_per_index_angles():
    """Column i of B is column i of A turned by KNOWN[i] (towards a vector orthogonal to A)."""
    Q, _ = torch.linalg.qr(torch.randn(20, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    A, B = Q[:, :6], Q[:, :6] * torch.cos(KNOWN) + Q[:, 6:] * torch.sin(KNOWN)
    assert torch.max(torch.abs(rotation_angles(A, B) - KNOWN)) < 1e-12
    assert torch.max(torch.abs(rotation_angles(A, -B) - KNOWN)) < 1e-12  # the sign of a vector is irrelevant


def test_right_rotation_keeps_sigma_and_rotates_right_vectors_only(tmp_path):
    """W' = W R with R orthogonal: W' = U Σ (Rᵀ V)ᵀ, so σ and U are unchanged and V becomes Rᵀ V.

    R is a Givens rotation by φ in the plane (v_1, v_n) with v_n outside the top-k: the top-k right
    subspaces then differ by exactly one principal angle φ (the rest 0), the per-index rotation of v_1
    is φ and of every other top-k vector 0; left subspaces and singular values do not move.
    """
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 24, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    v1, vn, phi, k = Vh[0], Vh[-1], 0.2, 8
    R = (torch.eye(24, dtype=torch.float64) + (math.cos(phi) - 1) * (torch.outer(v1, v1) + torch.outer(vn, vn))
         + math.sin(phi) * (torch.outer(vn, v1) - torch.outer(v1, vn)))
    assert torch.allclose(R.T @ R, torch.eye(24, dtype=torch.float64), atol=1e-14)
    U2, S2, Vh2 = torch.linalg.svd(W @ R, full_matrices=False)
    assert torch.max(torch.abs(S2 - S)) < 1e-12
    assert torch.max(principal_angles(U[:, :k], U2[:, :k], assume_orthonormal=True)) < 1e-10
    # The new right vectors span Rᵀ V exactly.
    assert torch.max(principal_angles((R.T @ Vh.T)[:, :k], Vh2[:k].T)) < 1e-10
    expected = torch.zeros(k, dtype=torch.float64)
    expected[-1] = phi
    assert torch.max(torch.abs(principal_angles(Vh[:k].T, Vh2[:k].T) - expected)) < 1e-10
    rot = rotation_angles(Vh[:k].T, Vh2[:k].T)
    assert abs(rot[0] - phi) < 1e-10 and torch.max(rot[1:]) < 1e-10
    # The same through analyze_pairs, from two one-matrix checkpoints.
    name = "model.layers.0.mlp.up_proj.weight"
    for label, M in (("w", W), ("wr", W @ R)):
        (tmp_path / label).mkdir()
        save_file({name: M.contiguous()}, tmp_path / label / "model.safetensors", metadata={"format": "pt"})
    table = analyze_pairs({"w": tmp_path / "w", "wr": tmp_path / "wr"}, [("w", "wr")], tmp_path / "out", k=k,
                          dtype="float64", device="cpu", progress=False)
    _, arrays = load_pair(tmp_path / "out", "w", "wr")
    assert table.loc[0, "dsigma_absmax"] < 1e-12 and table.loc[0, "angle_u_max_deg"] < 1e-8
    np.testing.assert_allclose(arrays[name]["angles_v"], expected.numpy(), atol=1e-10)
    # the rotations cover every index: v_1 and v_n turn by φ, the rest not at all
    full = torch.zeros(24, dtype=torch.float64)
    full[0] = full[-1] = phi
    np.testing.assert_allclose(arrays[name]["rot_v"], full.numpy(), atol=1e-10)
    np.testing.assert_allclose(arrays[name]["rot_v"][:k], rot.numpy(), atol=1e-10)
    np.testing.assert_allclose(table.loc[0, "fro_delta"], torch.linalg.matrix_norm(W @ R - W).item(), rtol=1e-12)


# ------------------------------------------------------------------------------------ checkpoints
def tiny_qwen2(path, seed=0, hidden=32, shard=None):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


def perturbed_copy(src, dst, scale=1e-2, seed=1, drop=None):
    """Copy a checkpoint shard by shard, adding scale·N(0,1) to every floating tensor (and dropping one)."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    for shard in sorted(dst.glob("*.safetensors")):
        tensors = load_file(shard)
        for name in sorted(tensors):
            if name == drop:
                del tensors[name]
            elif tensors[name].is_floating_point():
                tensors[name] = tensors[name] + scale * torch.randn(tensors[name].shape, generator=g)
        save_file(tensors, shard, metadata={"format": "pt"})
    if drop and (dst / "model.safetensors.index.json").is_file():
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        index["weight_map"].pop(drop, None)
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def all_tensors(path):
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys()})
    return out


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    base = tiny_qwen2(root / "base", shard="40KB")  # sharded, with model.safetensors.index.json
    assert (base / "model.safetensors.index.json").is_file()
    return base, perturbed_copy(base, root / "tuned")


@pytest.mark.parametrize("k", [16, 12])
def test_streaming_equals_in_memory(qwen_pair, tmp_path, k):
    """k 16: k/v_proj (16 x 32) at full rank, their top-16 left subspace is the whole space; k 12: two
    12-dimensional subspaces of 16 share at least 8 dimensions, so 8 of their 12 angles are 0 by force."""
    base, tuned = qwen_pair
    table = analyze_pairs({"base": base, "tuned": tuned}, [("base", "tuned")], tmp_path, k=k, dtype="float64",
                          device="cpu", progress=False)
    loaded, arrays = load_pair(tmp_path, "base", "tuned")
    assert len(loaded) == len(table) and list(loaded["name"]) == list(table["name"])
    before, after = all_tensors(base), all_tensors(tuned)
    for row in table.itertuples():
        Wb, Wa = before[row.name].double(), after[row.name].double()
        Ub, Sb, Vhb = torch.linalg.svd(Wb, full_matrices=False)
        Ua, Sa, Vha = torch.linalg.svd(Wa, full_matrices=False)
        kk = min(k, *Wb.shape)
        got = arrays[row.name]
        assert row.k == kk and (row.rows, row.cols) == tuple(Wb.shape)
        np.testing.assert_allclose(got["sigma_before"], Sb.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got["sigma_after"], Sa.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(row.fro_delta, torch.linalg.matrix_norm(Wa - Wb).item(), rtol=1e-10)
        np.testing.assert_allclose(row.energy_before, (Wb**2).sum().item(), rtol=1e-10)
        np.testing.assert_allclose(row.dsigma_absmax, (Sa - Sb).abs().max().item(), rtol=1e-9)
        np.testing.assert_allclose(got["angles_u"], principal_angles(Ub[:, :kk], Ua[:, :kk]).numpy(), atol=1e-10)
        np.testing.assert_allclose(got["angles_v"], principal_angles(Vhb[:kk].T, Vha[:kk].T).numpy(), atol=1e-10)
        np.testing.assert_allclose(got["rot_u"], rotation_angles(Ub, Ua).numpy(), atol=1e-9)  # every index
        np.testing.assert_allclose(got["rot_v"], rotation_angles(Vhb.T, Vha.T).numpy(), atol=1e-9)
        for side, dim in (("u", row.rows), ("v", row.cols)):
            mean, trivial = getattr(row, f"angle_{side}_mean_deg"), getattr(row, f"angle_{side}_trivial")
            angles = got[f"angles_{side}"]
            assert trivial == min(max(0, 2 * kk - dim), kk) and np.abs(angles[:trivial]).max(initial=0) < 1e-6
            if kk < dim:  # the forced zeros are left out of the mean
                np.testing.assert_allclose(mean, np.degrees(angles[trivial:]).mean())
                assert not trivial or angles[trivial:].min() > 1e-4  # and they are all the zeros there are
            else:  # the top k span the whole space: 0 by construction, undefined in the table
                assert np.isnan(mean) and not angles.any(), (row.name, side)
    assert table["angle_u_mean_deg"].notna().any()
    assert (table["angle_u_trivial"] > 0).any()  # k/v_proj's 16 rows at either k
    assert table["angle_u_mean_deg"].isna().any() == (k == 16)
    # Untied embed/lm_head: one alignment row per checkpoint.
    align = __import__("pandas").read_parquet(tmp_path / "embed_lm_head.parquet")
    assert sorted(align["checkpoint"]) == ["base", "tuned"]
    assert (align["rows_compared"] == 96).all() and align["hidden_angle_mean_deg"].between(0, 90).all()
    # hidden 32: at k 16 no angle is 0 by force; at k 12 neither (2k - 32 < 0)
    assert (align["hidden_angle_trivial"] == 0).all() and (align["token_angle_trivial"] == 0).all()


def test_alignment_means_leave_out_the_angles_forced_to_zero(qwen_pair, tmp_path):
    """embed vs lm_head in a 32-dimensional hidden space at k 24: 2k - 32 = 16 of the 24 angles are 0 by
    force, as in _compare's matrices, and the means leave them out."""
    base, tuned = qwen_pair
    analyze_pairs({"base": base, "tuned": tuned}, [("base", "tuned")], tmp_path, k=24, dtype="float64",
                  device="cpu", progress=False)
    align = pd.read_parquet(tmp_path / "embed_lm_head.parquet").set_index("checkpoint")
    arrays = np.load(tmp_path / "embed_lm_head_arrays.npz")
    for label in ("base", "tuned"):
        row, deg = align.loc[label], np.degrees(arrays[f"{label}/hidden_angles"])
        assert row["hidden"] == 32 and row["hidden_angle_trivial"] == 16 and np.abs(deg[:16]).max() < 1e-6
        np.testing.assert_allclose(row["hidden_angle_mean_deg"], deg[16:].mean())
        assert deg[16:].min() > 1e-3 and row["hidden_angle_mean_deg"] > deg.mean()


def test_cache_is_reused_and_matches(qwen_pair, tmp_path, monkeypatch):
    base, tuned = qwen_pair
    cache = tmp_path / "cache"
    first = analyze_pairs({"base": base, "tuned": tuned}, [("base", "tuned")], tmp_path / "a", k=8,
                          device="cpu", cache_dir=cache, progress=False)
    n_files = len(list(cache.glob("*.safetensors")))
    assert n_files == 2 * len(first)  # full factors of every matrix of both checkpoints
    calls = []
    monkeypatch.setattr(weights, "decompose", lambda *a, **kw: calls.append(a) or pytest.fail("recomputed"))
    second = analyze_pairs({"base": base, "tuned": tuned}, [("base", "tuned")], tmp_path / "b", k=8,
                           device="cpu", cache_dir=cache, progress=False)
    assert not calls
    np.testing.assert_array_equal(first["angle_u_mean_deg"], second["angle_u_mean_deg"])
    W = all_tensors(base)["model.layers.0.mlp.up_proj.weight"]
    U, S, Vh = weights.load_or_decompose(W, "model.layers.0.mlp.up_proj.weight", cache, device="cpu")
    assert U.shape == (64, 32) and torch.allclose((U * S) @ Vh, W, atol=1e-5)


def test_a_damaged_cache_file_is_decomposed_again_with_a_warning(qwen_pair, tmp_path, caplog):
    """A copy of runs/ cut short leaves a truncated factor file; it is redone, not a traceback in 05-07."""
    base, tuned = qwen_pair
    cache = tmp_path / "cache"
    first = analyze_pairs({"base": base, "tuned": tuned}, [("base", "tuned")], tmp_path / "a", k=8,
                          device="cpu", cache_dir=cache, progress=False)
    damaged = sorted(cache.glob("layers.0.self_attn.q_proj.*.safetensors"))[0]
    size = damaged.stat().st_size
    os.truncate(damaged, 500)
    with caplog.at_level(logging.WARNING, logger="paper_lib.weights"):
        second = analyze_pairs({"base": base, "tuned": tuned}, [("base", "tuned")], tmp_path / "b", k=8,
                               device="cpu", cache_dir=cache, progress=False)
    assert [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()] == \
        [f"SVD cache file {damaged} is damaged (500 bytes, but its header describes {size} (truncated or damaged)): "
         "decomposing layers.0.self_attn.q_proj.weight again"]
    assert damaged.stat().st_size == size and artifacts.safetensors_problem(damaged) is None
    np.testing.assert_allclose(first["angle_u_mean_deg"], second["angle_u_mean_deg"], rtol=1e-6)


def test_qwen2_names_every_projection_of_every_layer(qwen_pair, tmp_path):
    base, tuned = qwen_pair
    table = analyze_pairs({"base": base, "tuned": tuned}, [("base", "tuned")], tmp_path, k=8, progress=False)
    found = set(zip(table["layer"], table["module"]))
    assert found == {(layer, m) for layer in range(2) for m in MODULES} | {(-1, "embed_tokens"), (-1, "lm_head")}
    assert not table["name"].str.endswith("bias").any()


def test_mllama_text_weights_only(tmp_path):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(0)
    cfg = MllamaConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, cross_attention_layers=[1],
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=4, image_size=28, patch_size=14, max_num_tiles=1, vision_output_dim=64,
                           intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1]]),
    )
    MllamaForConditionalGeneration(cfg).save_pretrained(tmp_path / "base")
    names = list(all_tensors(tmp_path / "base"))
    assert any("vision_model" in n and "q_proj" in n for n in names)  # the test has vision weights to skip
    perturbed_copy(tmp_path / "base", tmp_path / "tuned")
    table = analyze_pairs({"base": tmp_path / "base", "tuned": tmp_path / "tuned"}, [("base", "tuned")],
                          tmp_path / "out", k=8, progress=False)
    assert not table["name"].str.contains("vision|projector").any()
    found = set(zip(table["layer"], table["block"], table["module"]))
    expected = {(-1, "embed", "embed_tokens"), (-1, "lm_head", "lm_head")}
    for layer in range(3):
        attn = "cross_attn" if layer == 1 else "self_attn"
        expected |= {(layer, attn, m) for m in MODULES[:4]} | {(layer, "mlp", m) for m in MODULES[4:]}
    assert found == expected
    # Every text-model projection saved by transformers is in the table.
    text = {n for n in names if "vision" not in n and n.endswith("_proj.weight")}
    assert text <= set(table["name"])
    # embed_tokens has 8 extra rows: the alignment compares the shared 128.
    align = __import__("pandas").read_parquet(tmp_path / "out" / "embed_lm_head.parquet")
    assert list(align["rows_compared"]) == [128, 128] and list(align["embed_rows"]) == [136, 136]


def test_parse_name_prefixes():
    for prefix in ["", "model.", "language_model.model.", "model.language_model."]:
        assert weights.parse_name(f"{prefix}layers.7.cross_attn.k_proj.weight")[1:] == (7, "cross_attn", "k_proj")
        assert weights.parse_name(f"{prefix}embed_tokens.weight")[0] == "embed_tokens.weight"
    assert weights.parse_name("language_model.lm_head.weight")[0] == "lm_head.weight"
    for name in ["vision_model.transformer.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
                 "model.visual.blocks.0.attn.qkv.weight", "model.layers.0.input_layernorm.weight"]:
        assert weights.parse_name(name) is None


# ------------------------------------------------------------------------------------------ errors
def test_shape_mismatch_is_a_clear_error(qwen_pair, tmp_path):
    base, _ = qwen_pair
    wide = tiny_qwen2(tmp_path / "wide", hidden=48)
    with pytest.raises(SpectraError, match=r"shape mismatch for model\.layers\.0\.self_attn\.q_proj\.weight: "
                                           r"base \(32, 32\), wide \(48, 48\)"):
        analyze_pairs({"base": base, "wide": wide}, [("base", "wide")], tmp_path / "out", progress=False)


def test_missing_tensor_is_a_clear_error(qwen_pair, tmp_path):
    base, _ = qwen_pair
    gone = "model.layers.1.mlp.up_proj.weight"
    holed = perturbed_copy(base, tmp_path / "holed", drop=gone)
    with pytest.raises(SpectraError, match=r"of 'base' are missing from 'holed'.*up_proj") as err:
        analyze_pairs({"base": base, "holed": holed}, [("base", "holed")], tmp_path / "out", progress=False)
    assert gone in str(err.value) and "names=" in str(err.value)
    # Restricting to shared tensors works.
    table = analyze_pairs({"base": base, "holed": holed}, [("base", "holed")], tmp_path / "out",
                          names=r"layers\.0\.", progress=False)
    assert set(table["layer"]) == {0}


def test_checkpoints_of_different_model_types_are_named_in_a_warning(qwen_pair, tmp_path, caplog):
    base, after = qwen_pair
    other = shutil.copytree(after, tmp_path / "other")
    config_json = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config_json, "model_type": "mistral"}))
    with caplog.at_level(logging.WARNING, logger="paper_lib.weights"):
        analyze_pairs({"base": base, "after": after}, [("base", "after")], tmp_path / "same", progress=False)
        assert "model types" not in caplog.text
        table = analyze_pairs({"base": base, "other": other}, [("base", "other")], tmp_path / "out", progress=False)
    assert "different model types (base qwen2, other mistral)" in caplog.text
    assert len(table) > 0, "a warning, not an error: converted checkpoints are compared on purpose"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="paper_lib.weights"):
        restore.write_restored(other, base, tmp_path / "restored", restore.Plan(top=2), device="cpu", progress=False)
    assert "different model types (target mistral, source qwen2)" in caplog.text


def test_a_tied_checkpoint_against_an_untied_one_says_so_and_how_to_go_on(qwen_pair, tmp_path):
    base, _ = qwen_pair  # untied
    tied = perturbed_copy(base, tmp_path / "tied", drop="lm_head.weight")
    with pytest.raises(SpectraError, match=r"'tied' ties lm_head to embed_tokens; --names '\^\(\?!\.\*lm_head\)'"):
        analyze_pairs({"base": base, "tied": tied}, [("base", "tied")], tmp_path / "out", progress=False)
    table = analyze_pairs({"base": base, "tied": tied}, [("base", "tied")], tmp_path / "out",
                          names="^(?!.*lm_head)", progress=False)  # the hint, as given, works
    assert "lm_head" not in set(table["module"]) and "embed_tokens" in set(table["module"])


def test_missing_directory_and_no_safetensors(tmp_path, qwen_pair):
    base, _ = qwen_pair
    with pytest.raises(weights.WeightsError, match=r"checkpoint 'a': .*nope does not exist; pass the directory"):
        analyze_pairs({"a": tmp_path / "nope", "b": base}, [("a", "b")], tmp_path / "out", progress=False)
    # a shard passed for its directory, and a folder that is no checkpoint: the path is wrong, not damaged
    shard = sorted(base.glob("*.safetensors"))[0]
    with pytest.raises(weights.WeightsError, match=rf"{shard.name} is a file, not a checkpoint directory; pass the "
                                                   r"directory that save_pretrained wrote"):
        analyze_pairs({"a": shard, "b": base}, [("a", "b")], tmp_path / "out", progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("")
    with pytest.raises(weights.WeightsError, match=r"no weight files .*\['readme\.txt'\]\); pass the directory"):
        analyze_pairs({"a": base, "b": tmp_path / "notes"}, [("a", "b")], tmp_path / "out", progress=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(weights.WeightsError, match=r"holds no \*\.safetensors.*pytorch_model\.bin"):
        analyze_pairs({"a": base, "b": tmp_path / "bin"}, [("a", "b")], tmp_path / "out", progress=False)
    with pytest.raises(SpectraError, match="not among"):
        analyze_pairs({"a": base}, [("a", "b")], tmp_path / "out", progress=False)


def test_cli_summary_and_exit_code(qwen_pair, tmp_path, capsys):
    base, tuned = qwen_pair
    assert spectra.main([str(base), str(tuned), "--out", str(tmp_path / "cli"), "--k", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "max |dsigma|" in out
    assert (tmp_path / "cli" / "base__target.parquet").is_file()
    # An error: message on stderr, exit code 2, no traceback (checked in a real process).
    proc = subprocess.run([sys.executable, "-m", "paper_lib.spectra", str(base), str(tmp_path / "missing"),
                           "--out", str(tmp_path / "cli2")], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_out_is_never_inside_an_input(qwen_pair, tmp_path):
    """Tables written into a checkpoint's directory would change the user's checkpoint."""
    base, tuned = qwen_pair
    before = sorted(p.name for p in tuned.iterdir())
    for out in (tuned, tuned / "spectra", tuned.parent):
        with pytest.raises(artifacts.ArtifactError, match=r"is, lies inside or contains the input .*(base|tuned); choose"):
            analyze_pairs({"base": base, "tuned": tuned}, [("base", "tuned")], out, progress=False)
    assert sorted(p.name for p in tuned.iterdir()) == before
    (tmp_path / "file").write_text("")
    with pytest.raises(artifacts.ArtifactError, match="is a file; choose a new directory"):
        analyze_pairs({"base": base, "tuned": tuned}, [("base", "tuned")], tmp_path / "file", progress=False)


def test_mistral_names_match_and_gpt2_names_are_a_clear_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
                       ).save_pretrained(tmp_path / "mistral")
    perturbed_copy(tmp_path / "mistral", tmp_path / "mistral_tuned")
    table = analyze_pairs({"base": tmp_path / "mistral", "tuned": tmp_path / "mistral_tuned"}, [("base", "tuned")],
                          tmp_path / "out", k=4, progress=False)
    assert set(zip(table["layer"], table["module"])) == ({(layer, m) for layer in range(2) for m in MODULES}
                                                         | {(-1, "embed_tokens"), (-1, "lm_head")})
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16)
                    ).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(weights.WeightsError, match=r"c_attn.*only Llama-style names are supported .*Mistral"):
        weights.LazyWeights("base", tmp_path / "gpt2")


def test_frobenius_norm_accumulates_in_float64(tmp_path):
    """‖ΔW‖F of a large float32 matrix: a float32 reduction drifts by ~1e-4 relative at 3e6 entries."""
    g = torch.Generator().manual_seed(0)
    W, Wr = torch.randn(3000, 1000, generator=g), torch.randn(3000, 1000, generator=g)
    for label, M in (("w", W), ("wr", Wr)):
        (tmp_path / label).mkdir()
        save_file({"model.embed_tokens.weight": M}, tmp_path / label / "model.safetensors")
    ckb, cka = weights.LazyWeights("w", tmp_path / "w"), weights.LazyWeights("wr", tmp_path / "wr")
    before, delta = spectra._fro_blocks(ckb, cka, weights.EMBED, 3000)
    assert abs(before / torch.linalg.matrix_norm(W.double()).item() - 1) < 1e-12
    assert abs(delta / torch.linalg.matrix_norm(Wr.double() - W.double()).item() - 1) < 1e-12


# ----------------------------------------------------------------- Gram route for tall/wide matrices
def _well_conditioned(m, n, seed=0, cond=1e3):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    return (U * torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)) @ V.T


def test_gram_svd_matches_lapack_in_float64():
    W = _well_conditioned(3000, 40)
    U, S, Vh = weights._gram_svd(lambda a, b: W[a:b], 3000, 40, torch.float64, block=256)
    Ur, Sr, Vhr = torch.linalg.svd(W, full_matrices=False)
    assert (S - Sr).abs().max() < 1e-10 * Sr[0]
    assert principal_angles(Vh.T, Vhr.T).max() < 1e-8 and principal_angles(U, Ur).max() < 1e-8
    assert rotation_angles(U, Ur).max() < 1e-8 and rotation_angles(Vh.T, Vhr.T).max() < 1e-8
    # U = W V Σ⁻¹ loses orthogonality as eps·κ² (κ = 1e3 here): why float64 requests keep the LAPACK SVD
    torch.testing.assert_close(U.T @ U, torch.eye(40, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close((U * S) @ Vh, W, atol=1e-12, rtol=0)


@pytest.mark.parametrize("wide", [False, True])
def test_decompose_float32_tall_or_wide_skips_lapack_svd(monkeypatch, wide):
    W64 = _well_conditioned(2500, 48, seed=1)
    W64 = W64.T if wide else W64
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **kw: pytest.fail("LAPACK SVD used"))
    U, S, Vh = weights.decompose(W64.float(), "float32", "cpu")
    monkeypatch.undo()
    Ur, Sr, Vhr = torch.linalg.svd(W64, full_matrices=False)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32 and U.shape == Ur.shape and Vh.shape == Vhr.shape
    assert (S.double() - Sr).abs().max() < 1e-6 * Sr[0]
    assert principal_angles(U.double()[:, :24], Ur[:, :24]).max() < 1e-4
    assert principal_angles(Vh.double().T[:, :24], Vhr.T[:, :24]).max() < 1e-4
    torch.testing.assert_close(((U * S) @ Vh).double(), W64, atol=1e-6, rtol=0)


def test_decompose_rank_deficient_tall_falls_back_to_lapack():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(400, 3, generator=g) @ torch.randn(3, 20, generator=g)  # rank 3 of 20
    U, S, Vh = weights.decompose(W, "float32", "cpu")
    torch.testing.assert_close(U.T @ U, torch.eye(20), atol=1e-5, rtol=0)  # still orthonormal
    torch.testing.assert_close((U * S) @ Vh, W, atol=1e-4, rtol=0)


def test_streamed_u_angles_match_in_memory(tmp_path):
    g = torch.Generator().manual_seed(3)
    Ub = torch.linalg.qr(torch.randn(3000, 20, generator=g, dtype=torch.float64)).Q
    Ua = torch.linalg.qr(Ub + 1e-3 * torch.randn(3000, 20, generator=g, dtype=torch.float64)).Q
    Ua[:, 5] *= -1  # a sign flip is no rotation
    pb, pa = tmp_path / "b.safetensors", tmp_path / "a.safetensors"
    for path, U in ((pb, Ub), (pa, Ua)):
        weights.save_factors(path, U, torch.ones(20, dtype=torch.float64), torch.eye(20, dtype=torch.float64))
        assert weights.load_factors(path, None, torch.device("cpu"))[0].equal(U)  # a valid safetensors file
    for k in (20, 7):
        angles, rot = spectra._streamed_u_angles(pb, pa, k, 3000, torch.device("cpu"), block=256)
        torch.testing.assert_close(angles, principal_angles(Ub[:, :k], Ua[:, :k]), atol=1e-12, rtol=0)
        torch.testing.assert_close(rot, rotation_angles(Ub, Ua), atol=1e-12, rtol=0)  # every index, any k


def test_analyze_pairs_float32_tall_embedding_matches_float64(tmp_path):
    """The whole streamed path (Gram SVD from shard blocks, block-wise ‖ΔW‖F and U angles) in float32."""
    W = _well_conditioned(2600, 32, seed=4, cond=30)
    Wr = W + 1e-3 * _well_conditioned(2600, 32, seed=5, cond=30)
    name = "model.embed_tokens.weight"
    for label, M in (("w", W), ("wr", Wr)):
        (tmp_path / label).mkdir()
        save_file({name: M.float().contiguous()}, tmp_path / label / "model.safetensors", metadata={"format": "pt"})
    table = analyze_pairs({"w": tmp_path / "w", "wr": tmp_path / "wr"}, [("w", "wr")], tmp_path / "out", k=16,
                          device="cpu", progress=False)
    _, arrays = load_pair(tmp_path / "out", "w", "wr")
    Wf, Wrf = W.float().double(), Wr.float().double()
    Ub, Sb, Vhb = torch.linalg.svd(Wf, full_matrices=False)
    Ua, Sa, Vha = torch.linalg.svd(Wrf, full_matrices=False)
    np.testing.assert_allclose(arrays[name]["sigma_before"], Sb.numpy(), atol=1e-6 * Sb[0].item())
    np.testing.assert_allclose(arrays[name]["angles_u"], principal_angles(Ub[:, :16], Ua[:, :16]).numpy(), atol=1e-5)
    np.testing.assert_allclose(arrays[name]["rot_u"], rotation_angles(Ub, Ua).numpy(), atol=1e-4)
    np.testing.assert_allclose(table.loc[0, "fro_delta"], torch.linalg.matrix_norm(Wrf - Wf).item(), rtol=1e-10)


def test_clear_svd_cache_frees_the_cache_and_a_later_stage_recomputes(tmp_path):
    from paper_lib import config

    cfg = config.load("tiny")
    cache = weights.svd_cache(cfg)
    W = torch.randn(12, 8, dtype=torch.float64)
    weights.load_or_decompose(W, "w", cache, device="cpu")
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    assert size > 0 and spectra.clear_svd_cache(cfg) == size and not cache.exists()
    assert spectra.clear_svd_cache(cfg) == 0
    U, S, Vh = weights.load_or_decompose(W, "w", cache, device="cpu")
    assert torch.allclose((U * S) @ Vh, W.to(U.dtype), atol=1e-5)


def test_an_out_from_other_checkpoints_is_refused_and_force_replaces_it_whole(qwen_pair, tmp_path, capsys):
    """A second CLI run into one --out once replaced base__target silently and left the first run's
    embed_lm_head rows, labelled as if they came from the second pair."""
    base, tuned = qwen_pair
    out = tmp_path / "cli"
    assert spectra.main([str(base), str(tuned), "--out", str(out), "--k", "4", "--quiet"]) == 0
    assert len(pd.read_parquet(out / "embed_lm_head.parquet")) == 2  # untied: base and target
    first = (out / "base__target.parquet").read_bytes()
    assert spectra.main([str(base), str(tuned), "--out", str(out), "--k", "4", "--quiet"]) == 0  # same run again
    tied = perturbed_copy(base, tmp_path / "tied", drop="lm_head.weight")
    argv = [str(tied), str(tied), "--out", str(out), "--k", "4", "--quiet", "--names", "^(?!.*lm_head)"]
    assert spectra.main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds the spectra of base -> target" in err and "--force" in err and str(tuned) in err
    assert (out / "base__target.parquet").read_bytes() == first  # nothing was changed
    assert spectra.main(argv + ["--force"]) == 0
    assert json.loads((out / "base__target.json").read_text())["after"] == str(tied.resolve())
    assert not (out / "embed_lm_head.parquet").exists()  # tied now: no alignment rows of the old pair left


@pytest.mark.parametrize("damage", ['{"bef', '{"k": 8}', '[1, 2]'])
def test_a_damaged_pair_record_asks_for_force_in_one_line(qwen_pair, tmp_path, capsys, damage):
    base, tuned = qwen_pair
    out = tmp_path / "cli"
    assert spectra.main([str(base), str(tuned), "--out", str(out), "--k", "4", "--quiet"]) == 0
    (out / "base__target.json").write_text(damage)
    assert spectra.main([str(base), str(tuned), "--out", str(out), "--k", "4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "from inputs it does not record" in err and "--force" in err, err
    assert spectra.main([str(base), str(tuned), "--out", str(out), "--k", "4", "--quiet", "--force"]) == 0


def test_an_earlier_calls_alignment_rows_of_other_labels_stay(qwen_pair, tmp_path):
    base, tuned = qwen_pair
    analyze_pairs({"base": base, "sft": tuned}, [("base", "sft")], tmp_path, k=4, progress=False)
    analyze_pairs({"sft": tuned, "rl": tuned}, [("sft", "rl")], tmp_path, k=4, progress=False)
    assert sorted(pd.read_parquet(tmp_path / "embed_lm_head.parquet")["checkpoint"]) == ["base", "rl", "sft"]
    with np.load(tmp_path / "embed_lm_head_arrays.npz") as npz:
        assert {n.split("/")[0] for n in npz.files} == {"base", "rl", "sft"}


def test_a_k_that_spans_a_whole_side_is_one_warning_and_a_zero_matrix_has_no_angle(qwen_pair, tmp_path, caplog):
    base, _ = qwen_pair
    zeroed = shutil.copytree(base, tmp_path / "zeroed")
    name = "model.layers.0.mlp.up_proj.weight"
    for shard in zeroed.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name] = torch.zeros_like(tensors[name])
            save_file(tensors, shard, metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="paper_lib.spectra"):
        table = analyze_pairs({"a": zeroed, "b": zeroed}, [("a", "b")], tmp_path / "out", k=16, progress=False)
    assert "k=16 spans a whole side" in caplog.text and "k < 16 defines every angle" in caplog.text
    zero = table[table["name"] == name].iloc[0]
    assert all(math.isnan(zero[c]) for c in ("angle_u_mean_deg", "angle_v_mean_deg", "rot_u_mean_deg"))
    other = table[table["name"] == "model.layers.0.mlp.gate_proj.weight"].iloc[0]  # 64 x 32, k < both
    assert other["angle_u_mean_deg"] < 1e-2 and other["rot_u_mean_deg"] < 1e-2


def test_figure_3_pairs_follow_spectra_sft_before_and_every_reading_is_computed():
    from paper_lib.evaluate import Named

    named = Named("base", "sft-0140", "sft-1100", "rl-0300")
    assert spectra.paper_pairs("base", named) == [("SFT", "base", "sft-1100"), ("RL", "sft-1100", "rl-0300")]
    # the authors' plots: ΔΣ(SFT − SFT_premax)
    assert spectra.paper_pairs("inter_sft", named)[0] == ("SFT", "sft-0140", "sft-1100")
    computed = spectra.analysed_pairs(named)
    assert all((a, b) in computed for reading in ("base", "inter_sft") for _, a, b in spectra.paper_pairs(reading, named))
    assert len(computed) == len(set(computed)) == 5
    short = Named("base", "sft-0004", "sft-0004", None)  # Inter_SFT is full SFT: no self-pair, a clear error
    assert spectra.analysed_pairs(short) == [("base", "sft-0004")]
    with pytest.raises(SpectraError, match="spectra.sft_before base"):
        spectra.paper_pairs("inter_sft", short)
