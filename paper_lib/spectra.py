"""Spectral comparison of two or more checkpoints, one weight matrix at a time (PAPER_SPEC 5).

For every attention/MLP projection, embed_tokens and lm_head matched by name across checkpoints, and for
every requested (before, after) pair: singular values and Δσ, energy ‖W‖F², ‖ΔW‖F, principal angles
between the top-k left and right singular subspaces, and per-index rotation angles of the singular
vectors. Where embed_tokens and lm_head are untied, each checkpoint also gets an embed/lm_head alignment.

    df = analyze_pairs({"base": b, "sft": s, "rl": r}, [("base", "sft"), ("sft", "rl")], "runs/x/spectra")
    table, arrays = load_pair("runs/x/spectra", "base", "sft")
    python -m paper_lib.spectra BASE TARGET --out DIR [--k 768] [--device auto] [--dtype float32]

Memory: tensors are read from the safetensors shards one at a time; each checkpoint's matrix is
decomposed once and its top-k factors go to a file (the cache when `cache_dir` is given, else a scratch
file deleted as soon as that matrix is done), never a whole model. Tall or wide float32 matrices (the
embedding) are decomposed on CPU through their Gram matrix from row blocks of the shard (`_gram_svd`:
no LAPACK workspace, only U is held whole), and a pair's ‖ΔW‖F and U angles are streamed in row blocks
from the shards and factor files, so a comparison holds two V factors but no whole U or W.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from . import artifacts, launch, weights

log = logging.getLogger(__name__)

_BLOCK_ORDER = {"self_attn": 0, "cross_attn": 1, "mlp": 2}
_MODULE_ORDER = {m: i for i, m in enumerate(
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])}
ARRAYS = ("sigma_before", "sigma_after", "angles_u", "angles_v", "rot_u", "rot_v")
ALIGNMENT_TABLE = "embed_lm_head.parquet"  # per checkpoint with untied embeddings: embedding vs output rows


class SpectraError(weights.WeightsError):
    """Checkpoints or arguments that cannot be compared; the message says which and what to do."""


# --------------------------------------------------------------------------------------------- maths
def principal_angles(A: torch.Tensor, B: torch.Tensor, *, assume_orthonormal: bool = False) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of A (m×ka) and B (m×kb).

    Knyazev & Argentati (2002): cosines are the singular values of QaᵀQb, sines those of
    Qb − Qa(QaᵀQb); arccos loses every angle below ~1e-8 (float64), so angles under π/4 come from the
    sines. Both lists are sorted by ascending angle, so index i of each belongs to the same angle (scipy's
    subspace_angles picks sine or cosine with a mask ordered opposite to the values, and so returns 0
    for a tiny angle beside large ones).
    Inputs are orthonormalised unless `assume_orthonormal` (e.g. singular vectors), with a rank cut-off
    as scipy's orth: a column space of rank r < k (a low-rank update, a zero column) has r basis vectors,
    not k with k − r arbitrary ones. Returns min(rank A, rank B) angles: min(ka, kb) at full column rank.
    Half-precision inputs are computed in float32 (no QR kernel takes them), integers in float64.
    """
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[0]:
        raise SpectraError(f"principal_angles needs two matrices with equal row counts, got {tuple(A.shape)} "
                           f"and {tuple(B.shape)}")
    dtype = torch.promote_types(A.dtype, B.dtype)
    dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    dtype = dtype if dtype.is_floating_point or dtype.is_complex else torch.float64
    A, B = A.to(dtype), B.to(dtype=dtype, device=A.device)
    if not assume_orthonormal:
        A, B = column_basis(A), column_basis(B)
    if A.shape[1] < B.shape[1]:  # the residual is taken of the smaller basis, so there are kb sines
        A, B = B, A
    if B.shape[1] == 0 or A.shape[1] >= A.shape[0]:  # A spans the whole space: every angle is 0
        return B.new_zeros(B.shape[1])
    M = A.mH @ B
    cos = torch.linalg.svdvals(M).clamp(max=1.0)  # descending cosines = ascending angles
    return _combine_angles(cos, _residual_svdvals(A, B, M))


def column_basis(A: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of A's column space (m×r, r its numerical rank): Q of A's QR, rotated by the
    left singular vectors of R that have σ above max(m, k)·eps·σ₁ (scipy.linalg.orth's cut-off). The SVD
    is of the k×k R, so this costs a QR and a small SVD."""
    Q, R = torch.linalg.qr(A)
    if R.numel() == 0:
        return Q
    U, S, _ = torch.linalg.svd(R)
    rank = int((S > max(A.shape) * torch.finfo(S.dtype).eps * S[0]).sum()) if S[0] > 0 else 0
    return Q @ U[:, :rank]


def _combine_angles(cos: torch.Tensor, sin_desc: torch.Tensor) -> torch.Tensor:
    """Angles from descending cosines and descending sines: arcsin below π/4, arccos above."""
    sin = sin_desc.flip(0).clamp(max=1.0)  # ascending sines = ascending angles
    return torch.where(cos**2 > 0.5, torch.arcsin(sin), torch.arccos(cos))


def _residual_svdvals(A: torch.Tensor, B: torch.Tensor, M: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """Singular values of B − A M (m×k) without holding it when m is large (an embedding's 150k rows):
    the R factors of its row blocks are stacked and re-factored (TSQR), and R has the same singular values."""
    block = max(block, 2 * B.shape[1])
    R = None
    for i in range(0, B.shape[0], block):
        part = torch.addmm(B[i:i + block], A[i:i + block], M, alpha=-1)
        if B.shape[0] <= block:
            return torch.linalg.svdvals(part)
        R = torch.linalg.qr(part if R is None else torch.cat([R, part]), mode="r").R
    return torch.linalg.svdvals(R)


def rotation_angles(U_a: torch.Tensor, U_b: torch.Tensor) -> torch.Tensor:
    """Per-index angle arccos|⟨u_i, u'_i⟩| (radians) between matching unit columns of U_a and U_b.

    Computed as 2·atan2(‖u − s·u'‖, ‖u + s·u'‖) with s the sign of ⟨u, u'⟩, which equals the arccos
    form but keeps tiny angles. Singular vectors are defined up to sign (hence |·|); within a cluster of
    (near-)equal singular values they may mix, so a large per-index angle there is not a rotation.
    """
    k = min(U_a.shape[1], U_b.shape[1])
    out = []
    for j in range(0, k, 32):  # column blocks: temporaries of m×32, not m×k (tall embedding matrices)
        a, b = U_a[:, j:min(j + 32, k)], U_b[:, j:min(j + 32, k)].to(U_a.dtype)
        b = b * torch.where((a * b).sum(0) < 0, -1.0, 1.0).to(a.dtype)
        out.append(2 * torch.atan2(torch.linalg.vector_norm(a - b, dim=0), torch.linalg.vector_norm(a + b, dim=0)))
    return torch.cat(out) if out else U_a.new_zeros(0)


def _select_keys(ckpts: dict[str, weights.LazyWeights], names: Iterable[str] | str | None) -> list[str]:
    """Canonical keys to analyse, ordered embed, lm_head, then by layer; checks names and shapes agree."""
    first, *rest = ckpts.values()
    problems = []
    for ck in rest:
        for a, b in ((first, ck), (ck, first)):
            missing = sorted(set(a.names) - set(b.names))
            if missing:
                shown = ", ".join(a.names[k] for k in missing[:6]) + (" ..." if len(missing) > 6 else "")
                tied = missing == [weights.HEAD] and weights.EMBED in b.names  # its lm_head is embed_tokens
                hint = f" ({b.label!r} ties lm_head to embed_tokens; --names '^(?!.*lm_head)' compares the rest)"
                problems.append(f"{len(missing)} tensor(s) of {a.label!r} are missing from {b.label!r} "
                                f"({b.path}): {shown}" + (hint if tied else ""))
    common = [k for k in first.names if all(k in ck.names for ck in rest)]
    mismatched = [k for k in common if len({ck.shapes[k] for ck in ckpts.values()}) > 1]
    for k in mismatched[:6]:
        shapes = ", ".join(f"{ck.label} {ck.shapes[k]}" for ck in ckpts.values())
        problems.append(f"shape mismatch for {first.names[k]}: {shapes}")
    if len(mismatched) > 6:
        problems.append(f"... and {len(mismatched) - 6} more shape mismatches")
    if isinstance(names, str):  # a regular expression over names and canonical keys
        try:
            pattern = re.compile(names)
        except re.error as err:
            raise SpectraError(f"names={names!r} is not a valid regular expression ({err})") from None
        keys = [k for k in common if pattern.search(k) or pattern.search(first.names[k])]
        if not keys:
            raise SpectraError(f"names={names!r} matches none of the analysable tensors, e.g. {common[:3]}")
    elif names is not None:
        by_name = {n: k for ck in ckpts.values() for k, n in ck.names.items()} | {k: k for k in common}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise SpectraError(f"names not found (or not analysable 2-D weights): {unknown[:6]}; "
                               f"analysable names look like {[first.names[k] for k in common[:3]]}")
        keys = list(dict.fromkeys(by_name[n] for n in names))
    else:
        keys = common
    weights.warn_if_model_types_differ(list(ckpts.values()), "their angles mean a fine-tuning's rotation")
    if problems and (names is None or any(k not in common or k in mismatched for k in keys)):
        raise SpectraError("checkpoints do not match:\n  " + "\n  ".join(problems) + "\nCompare checkpoints "
                           "of one architecture, or pass names=[...] (CLI: --names REGEX) to analyse the "
                           "tensors they share.")

    def order(k: str) -> tuple:
        if k in (weights.EMBED, weights.HEAD):
            return (-1, k != weights.EMBED)
        _, layer, block, module = weights.parse_name(k)
        return (layer, _BLOCK_ORDER[block], _MODULE_ORDER[module])

    return sorted(keys, key=order)


# ----------------------------------------------------------------------------------------- analysis
def _compare(ckb: weights.LazyWeights, cka: weights.LazyWeights, key: str, factors: dict[str, Path], k: int,
             device: torch.device) -> tuple[dict, dict[str, np.ndarray]]:
    """The row of the pair table and the arrays of one matrix, for before=ckb, after=cka."""
    rows, cols = ckb.shapes[key]
    fro_before, fro_delta = _fro_blocks(ckb, cka, key, rows)
    # Vᵀ (rank×cols) is small; U (rows×rank, an embedding's 49152 rows) is streamed in row blocks from both files.
    # Principal angles compare the top-k subspaces (the authors' k); the per-index rotations cover every
    # singular vector, since claim 4 asks about the bottom of the spectrum too.
    (Sb, Vhb), (Sa, Vha) = (_load_sv(factors[ck.label], device) for ck in (ckb, cka))
    angles_u, rot_u = _streamed_u_angles(factors[ckb.label], factors[cka.label], k, rows, device)
    arrays = {
        "sigma_before": Sb, "sigma_after": Sa, "angles_u": angles_u,
        "angles_v": principal_angles(Vhb[:k].mT, Vha[:k].mT, assume_orthonormal=True),
        "rot_u": rot_u, "rot_v": rotation_angles(Vhb.mT, Vha.mT),
    }
    arrays = {n: a.double().cpu().numpy() for n, a in arrays.items()}
    sb, sa = arrays["sigma_before"], arrays["sigma_after"]
    dsigma = sa - sb
    _, layer, block, module = weights.parse_name(key)
    row = {
        "pair": f"{ckb.label}__{cka.label}", "before": ckb.label, "after": cka.label, "name": ckb.names[key],
        "key": key, "layer": layer, "block": block, "module": module, "rows": rows, "cols": cols,
        "rank": min(rows, cols), "k": k,
        "energy_before": float(np.sum(sb**2)), "energy_after": float(np.sum(sa**2)),
        "fro_delta": fro_delta, "rel_fro_delta": fro_delta / fro_before if fro_before else float("nan"),
        "sigma_max_before": float(sb[0]),
        "dsigma_mean": float(dsigma.mean()), "dsigma_std": float(dsigma.std()),
        "dsigma_absmax": float(np.abs(dsigma).max()),
        # relative to σ_max, not to σ_i: near-zero tail singular values would blow a per-index ratio up
        "rel_dsigma_absmax": float(np.abs(dsigma).max() / sb[0]) if sb[0] else float("nan"),
    }
    for name in ("rot_u", "rot_v"):
        row[f"{name}_mean_deg"] = float(np.degrees(arrays[name]).mean())
    for side, dim in (("u", rows), ("v", cols)):
        row |= _angle_summary(f"angle_{side}", arrays[f"angles_{side}"], dim)
    if not (sb[0] and sa[0]):  # a zero matrix has no singular directions: no angle is defined
        for column in [c for c in row if c.endswith("_deg")]:
            row[column] = float("nan")
    return row, arrays


def _angle_summary(prefix: str, radians: np.ndarray, dim: int) -> dict[str, float]:
    """Mean and max (degrees) of principal angles between two k-dimensional subspaces of a dim-dimensional
    space, leaving out the first max(0, 2k - dim), which are 0 whatever training did: the two subspaces
    share at least that many dimensions (Llama's k/v_proj, 1024 rows at k 768: 512 of them). <prefix>_trivial
    counts them; where they are all (k >= dim) mean and max are NaN, undefined, and the means over matrices
    leave the matrix out. The arrays keep the zeros, as the authors' script did."""
    deg = np.degrees(radians)
    trivial = min(max(0, 2 * len(deg) - dim), len(deg))
    rotated = deg[trivial:]
    return {f"{prefix}_trivial": trivial,
            f"{prefix}_mean_deg": float(rotated.mean()) if len(rotated) else float("nan"),
            f"{prefix}_max_deg": float(rotated.max()) if len(rotated) else float("nan")}


def _alignment(ck: weights.LazyWeights, factors: dict[str, dict[str, Path]], k: int, device: torch.device,
               dtype: torch.dtype) -> tuple[dict, dict[str, np.ndarray]] | None:
    """embed_tokens vs lm_head of one checkpoint; None when they are tied (the same tensor)."""
    E, L = ck.load(weights.EMBED).to(device=device, dtype=dtype), ck.load(weights.HEAD).to(device=device, dtype=dtype)
    if E.shape == L.shape and torch.equal(E, L):
        return None
    n = min(E.shape[0], L.shape[0])  # Mllama's embedding has 8 extra (image) rows: compare shared tokens
    row_cos = torch.nn.functional.cosine_similarity(E[:n], L[:n], dim=1)
    rows_e, rows_l, hidden = E.shape[0], L.shape[0], E.shape[1]
    del E, L
    Ue, _, Vhe = weights.load_factors(factors[weights.EMBED][ck.label], k, device)
    Ul, _, Vhl = weights.load_factors(factors[weights.HEAD][ck.label], k, device)
    arrays = {
        # hidden space: the top-k right singular subspaces (directions a token vector lives in)
        "hidden_angles": principal_angles(Vhe.mT, Vhl.mT, assume_orthonormal=True),
        # token space: top-k left singular subspaces over the shared rows (re-orthonormalised if cut)
        "token_angles": principal_angles(Ue[:n], Ul[:n], assume_orthonormal=rows_e == rows_l),
        "row_cos": row_cos,
    }
    arrays = {name: a.double().cpu().numpy() for name, a in arrays.items()}
    row = {"checkpoint": ck.label, "embed_name": ck.names[weights.EMBED], "lm_head_name": ck.names[weights.HEAD],
           "embed_rows": rows_e, "lm_head_rows": rows_l, "rows_compared": n, "hidden": hidden, "k": k}
    row |= _angle_summary("hidden_angle", arrays["hidden_angles"], hidden)
    row |= _angle_summary("token_angle", arrays["token_angles"], n)
    row |= {"row_cos_mean": float(arrays["row_cos"].mean()), "row_cos_median": float(np.median(arrays["row_cos"])),
            "row_cos_min": float(arrays["row_cos"].min())}
    return row, arrays


def _fro_blocks(ckb: weights.LazyWeights, cka: weights.LazyWeights, key: str, rows: int, block: int = weights.BLOCK_ROWS) -> tuple[float, float]:
    """(‖W_before‖F, ‖W_after − W_before‖F) from row blocks read from the shards, so neither matrix is ever
    whole in memory; in float64, as a float32 norm of an embedding (~3e7 entries) is off by ~1e-3."""
    before = delta = 0.0
    for a in range(0, rows, block):
        Wb, Wa = ckb.read(key, a, a + block).double(), cka.read(key, a, a + block).double()
        before += Wb.square().sum().item()
        delta += (Wa - Wb).square().sum().item()
    return before**0.5, delta**0.5


def _load_sv(path: Path, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """σ and the whole Vᵀ (rank × cols, small beside U) of a factor file."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("S").clone().to(device), f.get_tensor("Vh").clone().to(device)


def _read_ut_block(path: Path, k: int, a: int, b: int) -> torch.Tensor:
    """Columns a:b of the first k rows of a factor file's Uᵀ (k×(b−a)), read row segment by row segment.
    Not through safetensors' memory map: a column block touches every row of Uᵀ, and the kernel maps
    ~64 KB around each touched page, so one block would make ~k·64 KB of the file resident per file."""
    with open(path, "rb", buffering=0) as f:
        n = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(n))["Ut"]
        out = torch.empty(k, b - a, dtype={"F32": torch.float32, "F64": torch.float64}[info["dtype"]])
        rows, size, start = info["shape"][1], out.element_size(), 8 + n + info["data_offsets"][0]
        buf = out.numpy()
        for j in range(k):
            f.seek(start + (j * rows + a) * size)
            f.readinto(memoryview(buf[j]).cast("B"))
    return out


def _streamed_u_angles(path_b: Path, path_a: Path, k: int, rows: int, device: torch.device,
                       block: int = weights.BLOCK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """principal_angles(Ub, Ua) of the top-k left singular vectors of two factor files and rotation_angles
    (Ub, Ua) of all of them, reading row blocks of U (columns of the stored Uᵀ) so that neither U is ever
    whole in memory.

    Pass 1 sums M = UbᵀUa over the top k and, per column, ⟨ub, ua⟩, ‖ub − ua‖² and ‖ub + ua‖²; pass 2
    stacks the R factors of the blocks of Ua − Ub M (TSQR, as _residual_svdvals).
    """
    with safe_open(str(path_b), framework="pt") as f:
        rank = f.get_slice("Ut").get_shape()[0]

    def blocks(width):
        for a in range(0, rows, block):
            b = min(a + block, rows)
            yield (_read_ut_block(path_b, width, a, b).mT.to(device),
                   _read_ut_block(path_a, width, a, b).mT.to(device))

    M = dot = minus = plus = 0
    for ub, ua in blocks(rank):
        M = M + ub[:, :k].mT @ ua[:, :k]
        dot = dot + (ub * ua).sum(0)
        minus, plus = minus + (ub - ua).square().sum(0), plus + (ub + ua).square().sum(0)
    # the sign of ⟨ub, ua⟩ flips ua (rotation_angles): then ‖ub − s·ua‖ and ‖ub + s·ua‖ swap
    flip = dot < 0
    rot = 2 * torch.atan2(torch.where(flip, plus, minus).sqrt(), torch.where(flip, minus, plus).sqrt())
    if k >= rows:  # U spans the whole space: every principal angle is 0
        return M.new_zeros(k), rot
    R = None
    for ub, ua in blocks(k):
        part = torch.addmm(ua, ub, M, alpha=-1)
        R = torch.linalg.qr(part if R is None else torch.cat([R, part]), mode="r").R
    return _combine_angles(torch.linalg.svdvals(M).clamp(max=1.0), torch.linalg.svdvals(R)), rot


def _write_arrays(arrays: dict[str, np.ndarray], path: Path) -> None:
    with artifacts.atomic_file(path) as tmp, open(tmp, "wb") as fh:  # a file object: savez adds no suffix
        np.savez(fh, **arrays)


def analyze_pairs(checkpoints: dict[str, str | os.PathLike], pairs: list[tuple[str, str]],
                  out_dir: str | os.PathLike, k: int = 768, device: str = "auto", dtype: str = "float32",
                  names: Iterable[str] | str | None = None, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True, svd_driver: str | None = None, replace: bool = False) -> pd.DataFrame:
    """Compare every (before, after) pair of labelled checkpoints, matrix by matrix; return the tidy table.

    k: top-k singular vectors for the principal angles (min(k, rank) is used per matrix); the per-index
    rotation angles (rot_u, rot_v) cover every singular vector.
    names: None (every analysable weight), a list of tensor names, or a regex over names.
    Writes, under out_dir, `<before>__<after>.parquet` (one row per matrix), `<before>__<after>_arrays.npz`
    (`<name>/<array>` for the arrays in ARRAYS, angles in radians) and, where embed_tokens and lm_head
    are untied, `embed_lm_head.parquet` (+ `_arrays.npz`, `<checkpoint>/<array>`) for each checkpoint.
    Each pair's `<before>__<after>.json` names the checkpoints (absolute paths), k, dtype and names it was
    computed from. A pair already in out_dir from other inputs or settings is an error unless replace=True,
    so results under one label never silently mix two runs.
    """
    device, dtype = weights.resolve_device(device), weights.resolve_dtype(dtype)
    if not pairs:
        raise SpectraError("no pairs given; pass e.g. pairs=[('base', 'sft')]")
    unknown = sorted({c for pair in pairs for c in pair} - set(checkpoints))
    if unknown:
        raise SpectraError(f"pairs name checkpoints {unknown} that are not among {sorted(checkpoints)}")
    if k < 1:
        raise SpectraError(f"k must be at least 1, got {k}")
    used = list(dict.fromkeys(c for pair in pairs for c in pair))
    bad = [c for c in used if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", c) or "__" in c]
    if bad:
        raise SpectraError(f"checkpoint labels {bad} must be letters, digits, '.', '-', '_' without '__' "
                           f"(they become file names)")
    ckpts = {c: weights.LazyWeights(c, checkpoints[c]) for c in used}
    keys = _select_keys(ckpts, names)
    artifacts.check_out_apart(out_dir, [checkpoints[c] for c in used])  # tables and scratch go in out_dir
    out_dir = Path(out_dir)
    names_given = names if names is None or isinstance(names, str) else sorted(names)
    inputs = {(before, after): {"before": str(Path(checkpoints[before]).resolve()),
                                "after": str(Path(checkpoints[after]).resolve()),
                                "k": k, "dtype": str(dtype).removeprefix("torch."), "names": names_given}
              for before, after in pairs}
    if not replace:
        _check_earlier_pairs(out_dir, inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[tuple[str, str], list[dict]] = {p: [] for p in pairs}
    arrays: dict[tuple[str, str], dict[str, np.ndarray]] = {p: {} for p in pairs}
    align_rows, align_arrays = [], {}
    with tempfile.TemporaryDirectory(prefix=".spectra-scratch-", dir=out_dir) as scratch:
        kept: dict[str, dict[str, Path]] = {}  # factor files of embed_tokens, kept until lm_head is done
        for key in tqdm(keys, desc="spectra", unit="matrix", disable=not progress):
            rows_, cols_ = next(iter(ckpts.values())).shapes[key]
            k_eff = min(k, rows_, cols_)
            factors = {}
            for label, ck in ckpts.items():  # each checkpoint's matrix is decomposed exactly once
                if cache_dir is not None:  # the cache key hashes the whole tensor
                    factors[label] = weights.ensure_cached(ck.load(key), key, cache_dir, dtype, device, svd_driver)[0]
                else:
                    U, S, Vh = weights.decompose_streamed(ck, key, dtype, device, svd_driver)
                    factors[label] = Path(scratch) / f"{label}.{key}.safetensors"
                    weights.save_factors(factors[label], U, S, Vh)  # whole: rotations cover every index
                    del U, S, Vh
            for before, after in pairs:
                row, arr = _compare(ckpts[before], ckpts[after], key, factors, k_eff, device)
                rows[(before, after)].append(row)
                arrays[(before, after)].update({f"{row['name']}/{n}": a for n, a in arr.items()})
            kept[key] = factors
            if key == weights.HEAD and weights.EMBED in kept:
                for ck in ckpts.values():
                    if (found := _alignment(ck, kept, k_eff, device, dtype)) is not None:
                        align_rows.append(found[0])
                        align_arrays.update({f"{ck.label}/{n}": a for n, a in found[1].items()})
            for done in [d for d in kept if d != weights.EMBED or key != weights.EMBED]:
                if cache_dir is None:
                    for path in kept[done].values():
                        path.unlink(missing_ok=True)
                del kept[done]
    tables = []
    for before, after in pairs:
        table = pd.DataFrame(rows[(before, after)])
        artifacts.write_table(table, out_dir / f"{before}__{after}.parquet")
        _write_arrays(arrays[(before, after)], out_dir / f"{before}__{after}_arrays.npz")
        with artifacts.atomic_file(out_dir / f"{before}__{after}.json") as tmp:
            tmp.write_text(json.dumps(inputs[(before, after)], indent=1))
        tables.append(table)
    _write_alignment(out_dir, used, align_rows, align_arrays)
    table = pd.concat(tables, ignore_index=True)
    _warn_undefined_angles(table, k)
    log.info("spectra of %d matrices x %d pairs written to %s", len(keys), len(pairs), out_dir)
    return table


def _check_earlier_pairs(out_dir: Path, inputs: dict[tuple[str, str], dict]) -> None:
    """SpectraError where out_dir already holds one of the pairs, computed from other inputs or settings."""
    for (before, after), wanted in inputs.items():
        if not (out_dir / f"{before}__{after}.parquet").is_file():
            continue
        earlier = artifacts.read_json(out_dir / f"{before}__{after}.json")  # None if missing or damaged
        if earlier != wanted:
            recorded = isinstance(earlier, dict) and {"before", "after", "k"} <= earlier.keys()
            was = (f"{earlier['before']} -> {earlier['after']}, k={earlier['k']}" if recorded
                   else "inputs it does not record")
            raise SpectraError(f"{out_dir} already holds the spectra of {before} -> {after} from {was}; choose a "
                               f"new --out, or pass --force (replace=True from Python) to replace them (nothing was changed)")


def _write_alignment(out_dir: Path, labels: list[str], rows: list[dict], arrays: dict[str, np.ndarray]) -> None:
    """embed_lm_head tables: this call's checkpoints replace their own earlier rows (a checkpoint now tied
    has none), and the rows of other labels an earlier call wrote into out_dir stay."""
    table_path, arrays_path = out_dir / ALIGNMENT_TABLE, out_dir / "embed_lm_head_arrays.npz"
    earlier, kept = pd.DataFrame({"checkpoint": []}), {}
    try:
        if table_path.is_file():
            earlier = pd.read_parquet(table_path)
        if arrays_path.is_file():
            with np.load(arrays_path) as npz:
                kept = {n: npz[n] for n in npz.files if n.split("/", 1)[0] not in labels}
    except Exception as err:  # a damaged table of our own: its other labels' rows are recomputed when asked
        log.warning("%s is unreadable (%s): it is written again with this call's checkpoints only",
                    table_path.name, err.__class__.__name__)
        earlier, kept = pd.DataFrame({"checkpoint": []}), {}
    earlier = earlier[~earlier["checkpoint"].isin(labels)]
    if earlier.empty and not rows:
        for path in (table_path, arrays_path):  # only this call's checkpoints were there: theirs are gone
            path.unlink(missing_ok=True)
        return
    artifacts.write_table(pd.concat([earlier, pd.DataFrame(rows)], ignore_index=True), table_path)
    _write_arrays(kept | arrays, arrays_path)


def _warn_undefined_angles(table: pd.DataFrame, k: int) -> None:
    """One line where k reaches a matrix's rows (U) or columns (V): the top k span that whole side, so its
    angles are NaN (undefined), which the README's default k of 768 does on any model of hidden size <= 768."""
    whole = table[(table["k"] >= table["rows"]) | (table["k"] >= table["cols"])].drop_duplicates("key")
    if len(whole):
        smallest = int(table[["rows", "cols"]].min(axis=1).min())
        log.warning("k=%d spans a whole side of %d of %d matrices (e.g. %s, %d x %d): their principal angles "
                    "there are NaN, undefined; k < %d defines every angle", k, len(whole), table["key"].nunique(),
                    whole.iloc[0]["name"], whole.iloc[0]["rows"], whole.iloc[0]["cols"], smallest)


def load_pair(out_dir: str | os.PathLike, before: str,
              after: str) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    """(table, arrays) of one analysed pair; arrays[name][array], e.g. arrays[n]["angles_u"] (radians)."""
    table_path = Path(out_dir) / f"{before}__{after}.parquet"
    arrays_path = Path(out_dir) / f"{before}__{after}_arrays.npz"
    if not table_path.is_file() or not arrays_path.is_file():
        have = sorted(p.stem for p in Path(out_dir).glob("*__*.parquet")) if Path(out_dir).is_dir() else []
        raise SpectraError(f"no spectra for {before} -> {after} in {out_dir} (found pairs: {have}); run "
                           f"analyze_pairs with pairs=[({before!r}, {after!r})] first")
    remake = ("rerun notebooks/05_spectra.py (it computes an unreadable pair again), or analyze_pairs with "
              "replace=True")
    arrays: dict[str, dict[str, np.ndarray]] = {}
    try:
        with np.load(arrays_path) as npz:
            for full in npz.files:
                name, array = full.rsplit("/", 1)
                arrays.setdefault(name, {})[array] = npz[full]
    except Exception as err:  # zipfile, numpy and OS errors alike for a truncated or damaged archive
        raise SpectraError(f"{arrays_path} is unreadable ({err.__class__.__name__}: {str(err)[:120]}); {remake}") from None
    try:
        return artifacts.read_table(table_path, remake), arrays
    except artifacts.ArtifactError as err:
        raise SpectraError(str(err)) from None


# ------------------------------------------------------------------------------------------- the stage
def clear_svd_cache(cfg) -> int:
    """Delete the SVD factor cache once the stages that read it (06_restore, 07_causal) are done; returns the
    bytes freed. Safe to call at any time: a later stage that needs a factor decomposes it again. For the 7B
    presets the cache holds every projection's full thin SVD of several checkpoints (hundreds of GB)."""
    import shutil

    cache = weights.svd_cache(cfg)
    if not cache.is_dir():
        return 0
    freed = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    shutil.rmtree(cache)
    log.info("deleted the SVD cache %s (%.3g GB)", cache, freed / 1e9)
    return freed


def paper_pairs(sft_before: str, named: Any) -> list[tuple[str, str, str]]:
    """Figures 3-4's (stage, before, after) of evaluate's named checkpoints: SFT from base or from Inter_SFT
    (spectra.sft_before), RL from the full-SFT checkpoint it started at."""
    before = named.inter_sft if sft_before == "inter_sft" else named.base
    if before == named.full_sft:
        raise SpectraError(f"Inter_SFT is the full-SFT checkpoint ({before}) in this run, so spectra.sft_before "
                           f"inter_sft leaves SFT no pair; use spectra.sft_before base")
    return [("SFT", before, named.full_sft)] + ([("RL", named.full_sft, named.rl)] if named.rl else [])


def analysed_pairs(named: Any) -> list[tuple[str, str]]:
    """Every pair 05_spectra computes: both readings of Figure 3's SFT pair, RL's, and base -> Inter_SFT and
    base -> RL; never a checkpoint with itself (Inter_SFT may be full SFT on a short run)."""
    base, inter, full, rl = named.base, named.inter_sft, named.full_sft, named.rl
    pairs = [(base, full), (inter, full), (base, inter)] + ([(full, rl), (base, rl)] if rl else [])
    return [pair for pair in dict.fromkeys(pairs) if pair[0] != pair[1]]


def run_stage(cfg, checkpoints: dict[str, str | os.PathLike], pairs: list[tuple[str, str]],
              force: bool = False) -> pd.DataFrame:
    """The notebook's stage: analyze_pairs under runs/<preset>/spectra with cfg.spectra's k, dtype and
    device, the shared SVD cache, and a manifest (checkpoint weights, pairs, settings, code) that skips
    the work when nothing changed."""
    from dataclasses import asdict

    out = artifacts.spectra_dir(cfg)
    # which pairs the figures and claims read: every candidate pair is computed either way
    settings = {k: v for k, v in asdict(cfg.spectra).items() if k not in ("claim_modules", "sft_before")}
    spec = {"stage": "spectra", "pairs": [list(p) for p in pairs], "spectra": settings,
            "checkpoints": {label: artifacts.fingerprint(path) for label, path in checkpoints.items()},
            "code": artifacts.code_hash("spectra")}
    def read(out: Path) -> pd.DataFrame:
        if (out / ALIGNMENT_TABLE).is_file():  # 05 shows it beside the pairs: it must read back too
            artifacts.read_table(out / ALIGNMENT_TABLE, "")
        return pd.concat([load_pair(out, a, b)[0] for a, b in pairs], ignore_index=True)

    redo = "computing the spectra again"
    artifacts.keep_earlier_result(out, spec, redo, force)  # other settings' spectra are kept aside, not overwritten
    cached = artifacts.read_cached(out, spec, read, redo, force, damaged=(SpectraError,))
    if cached is not None:
        return cached
    started = time.time()
    table = analyze_pairs(checkpoints, pairs, out, k=cfg.spectra.k, device=cfg.spectra.device,
                          dtype=cfg.spectra.dtype, cache_dir=weights.svd_cache(cfg), replace=True)
    artifacts.write_manifest(out, spec, seconds=round(time.time() - started, 2),
                             device=artifacts.device_in_use(weights.resolve_device(cfg.spectra.device).type))
    return table


# ---------------------------------------------------------------------------------------------- CLI
def summarize(table: pd.DataFrame) -> str:
    """Mean principal/rotation angles and ‖ΔW‖ per module kind, and the largest |Δσ|."""
    by = table.groupby(["block", "module"], sort=False)[
        ["angle_u_mean_deg", "angle_v_mean_deg", "rot_u_mean_deg", "rel_fro_delta", "dsigma_absmax"]].mean()
    worst = table.loc[table["dsigma_absmax"].idxmax()]
    return (f"{by.to_string(float_format=lambda x: f'{x:.4g}')}\n"
            f"max |dsigma| = {worst['dsigma_absmax']:.4g} in {worst['name']} "
            f"(sigma_max {worst['sigma_max_before']:.4g})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paper_lib.spectra", description="Compare the weight "
                                     "spectra of two Hugging Face checkpoints (safetensors), matrix by matrix.")
    parser.add_argument("base", help="checkpoint directory before fine-tuning")
    parser.add_argument("target", help="checkpoint directory after fine-tuning")
    parser.add_argument("--out", required=True, help="output directory (base__target.parquet, ..._arrays.npz)")
    parser.add_argument("--k", type=int, default=768, help="top-k singular vectors for angles (default 768)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--cache", default=None, help="directory to cache decompositions in")
    parser.add_argument("--svd-driver", default=None, choices=["gesvd", "gesvdj", "gesvda"], help="CUDA only")
    parser.add_argument("--names", default=None, help="regex: analyse only the matching tensor names")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true", help="replace the spectra an earlier run with other "
                        "checkpoints or settings left in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return launch.run_main(lambda: summarize(analyze_pairs(
        {"base": args.base, "target": args.target}, [("base", "target")], args.out, k=args.k, device=args.device,
        dtype=args.dtype, names=args.names, cache_dir=args.cache, progress=not args.quiet,
        svd_driver=args.svd_driver, replace=args.force)))


if __name__ == "__main__":
    sys.exit(main())
