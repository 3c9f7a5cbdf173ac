"""The weights of Hugging Face checkpoints, one matrix at a time: names matched across model families,
matrices read lazily from safetensors shards, their thin SVDs, and the on-disk SVD cache that the spectra
stage writes and direction restore reads.

Memory: a matrix is read from its shard only when asked for, and a tall or wide one (the embedding) can
be decomposed from row blocks of the shard through its Gram matrix (`_gram_svd`), so it is never held
whole beside its factors. Factor files store Uᵀ, S and Vh, so the top-k vectors of either side are the
first k rows of the file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from . import artifacts

log = logging.getLogger(__name__)


class WeightsError(ValueError):
    """A checkpoint or a matrix that cannot be read or decomposed; the message says which and what to do."""


# Text-model weight names of Llama/Qwen2/SmolLM and of Mllama (Llama-3.2-Vision), which transformers
# saves as `language_model.model.layers...` and names `model.language_model.layers...` in memory.
# Anchored, so vision-tower weights (`vision_model.*`, `visual.*`) never match.
_PREFIX = r"(?:model\.)?(?:language_model\.)?(?:model\.)?"
_LAYER_RE = re.compile(rf"^{_PREFIX}layers\.(\d+)\.(self_attn|cross_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")
_EMBED_RE = re.compile(rf"^{_PREFIX}embed_tokens\.weight$")
_HEAD_RE = re.compile(rf"^{_PREFIX}lm_head\.weight$")
EMBED, HEAD = "embed_tokens.weight", "lm_head.weight"


def parse_name(name: str) -> tuple[str, int, str, str] | None:
    """(canonical key, layer, block, module) of an analysable weight name, None for anything else.

    The canonical key drops the model prefix, so checkpoints saved with different prefixes still match.
    embed_tokens and lm_head have layer -1.
    """
    if m := _LAYER_RE.match(name):
        layer, block, module = int(m[1]), m[2], f"{m[3]}_proj"
        return f"layers.{layer}.{block}.{module}.weight", layer, block, module
    if _EMBED_RE.match(name):
        return EMBED, -1, "embed", "embed_tokens"
    if _HEAD_RE.match(name):
        return HEAD, -1, "lm_head", "lm_head"
    return None


# -------------------------------------------------------------------------------------- decompositions
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:  # torch's own message lists every device type it knows
        raise WeightsError(f"device must be 'auto', 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WeightsError("device='cuda' was requested but CUDA is not available; use device='auto' or 'cpu'")
    return device


def resolve_dtype(dtype: str | torch.dtype = "float32") -> torch.dtype:
    found = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
             torch.float64: torch.float64}.get(dtype)
    if found is None:
        raise WeightsError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return found


def decompose(W: torch.Tensor, dtype: str | torch.dtype = "float32", device: str | torch.device = "auto",
              svd_driver: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD W = U diag(S) Vh in `dtype` on `device`; `svd_driver` (gesvd, gesvdj, gesvda) is CUDA-only.

    Tall or wide float32 matrices on CPU (an embedding) go through `_gram_svd`, which needs no workspace
    beyond the output (LAPACK's SVD holds copies of W and U besides); U may then be a non-contiguous view.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if _use_gram(tuple(W.shape), dtype, device):
        if W.shape[0] >= W.shape[1]:
            found = _gram_svd(lambda a, b: W[a:b], *W.shape, dtype)
        else:
            found = _wide(_gram_svd(lambda a, b: W[:, a:b].mT, W.shape[1], W.shape[0], dtype))
        if found is not None:
            return found
    W = W.to(device=device, dtype=dtype)
    driver = svd_driver if device.type == "cuda" else None  # torch rejects a driver on CPU
    return torch.linalg.svd(W, full_matrices=False, driver=driver)


# Rows per block when streaming a tall matrix: blocks of a few MB. Larger blocks (4096 rows of float64,
# 19 MB) raise glibc's mmap threshold, land on the heap, and fragment it: ~100 MB stayed resident.
BLOCK_ROWS = 1024
_GRAM_MAX_COND = (torch.finfo(torch.float32).eps / torch.finfo(torch.float64).eps) ** 0.5  # ~2.3e4


def _use_gram(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> bool:
    # float32 only: float64 eigenvalues of WᵀW give every σ to ≤ sqrt(eps64)·σ₁ ≈ 1.5e-8·σ₁, better than a
    # float32 SVD's ~6e-8·σ₁, but a float64 request expects ~1e-16·σ₁ for tiny σ too, which only the SVD gives.
    return device.type == "cpu" and dtype == torch.float32 and max(shape) >= 4 * min(shape) > 0


def _wide(found: tuple | None) -> tuple | None:
    """The SVD of W from that of Wᵀ = U S Vh: W = Vhᵀ S Uᵀ."""
    return None if found is None else (found[2].mT, found[1], found[0].mT)


def _gram_svd(read_rows, rows: int, cols: int, dtype: torch.dtype,
              block: int = BLOCK_ROWS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Thin SVD of a tall rows×cols matrix given as row blocks `read_rows(a, b)`, via its Gram matrix.

    G = WᵀW is summed in float64 block by block (never a float64 copy of W), eigh(G) = V diag(σ²) Vᵀ, and
    U = W V Σ⁻¹ is filled block by block into Uᵀ (contiguous, so the top-k rows of the factor file are a
    plain slice). U's columns lose orthogonality as eps64·κ² (κ = σ₁/σ_min), so this returns None when
    κ > _GRAM_MAX_COND (then eps64·κ² would exceed float32's eps; W rank-deficient included): callers then
    use the LAPACK SVD.
    """
    G = torch.zeros(cols, cols, dtype=torch.float64)
    for a in range(0, rows, block):
        C = read_rows(a, min(a + block, rows)).double()
        G.addmm_(C.mT, C)
    lam, V = torch.linalg.eigh(G)
    S, V = lam.flip(0).clamp(min=0).sqrt(), V.flip(1)
    if S[0] == 0 or S[-1] * _GRAM_MAX_COND < S[0]:
        return None
    VS = V / S
    Ut = torch.empty(cols, rows, dtype=dtype)
    for a in range(0, rows, block):
        b = min(a + block, rows)
        Ut[:, a:b] = (read_rows(a, b).double() @ VS).mT
    return Ut.mT, S.to(dtype), V.mT.to(dtype)


def save_factors(path: Path, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> None:
    # U is stored transposed so that the top-k vectors of either side are the first k rows of the file.
    # Written by hand in the safetensors layout: save_file serialises every tensor to a bytes copy first,
    # a third embedding-sized buffer at the peak; here each tensor goes from its own memory to the file.
    tensors = {n: t.detach().cpu().contiguous() for n, t in {"Ut": U.mT, "S": S, "Vh": Vh}.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with artifacts.atomic_file(path) as tmp, open(tmp, "wb") as f:  # a reader never sees half a file
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16"}


def load_factors(path: Path, k: int | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        rows = slice(None) if k is None else slice(0, k)
        Ut, S, Vh = f.get_slice("Ut")[rows], f.get_tensor("S"), f.get_slice("Vh")[rows]
    return Ut.mT.to(device), S.to(device), Vh.to(device)


def _cache_path(W: torch.Tensor, name: str, dtype: torch.dtype, cache_dir: str | os.PathLike) -> Path:
    """Cache file of a matrix: keyed by a hash of its stored bytes (the content fingerprint, so copies and
    moves of a checkpoint hit and an edited tensor misses), its canonical name and the SVD dtype."""
    raw = W.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{raw.dtype}{tuple(raw.shape)}".encode())
    digest.update(memoryview(raw.view(torch.uint8).reshape(-1).numpy()))
    key = (parse_name(name) or (name,))[0]
    return Path(cache_dir) / f"{key}.{str(dtype).removeprefix('torch.')}.{digest.hexdigest()[:20]}.safetensors"


def ensure_cached(W: torch.Tensor, name: str, cache_dir: str | os.PathLike, dtype: torch.dtype,
                   device: torch.device, svd_driver: str | None) -> tuple[Path, tuple | None]:
    """The cache file of W, decomposing and writing it first if absent or damaged (then also returning the
    factors). Writes are atomic, so damage comes from outside (a copy of runs/ cut short): the file is
    decomposed again with a warning, as the other caches are, rather than failing every later stage."""
    path = _cache_path(W, name, dtype, cache_dir)
    if path.is_file():
        problem = artifacts.safetensors_problem(path)
        if problem is None:
            return path, None
        log.warning("SVD cache file %s is damaged (%s): decomposing %s again", path, problem, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    factors = decompose(W, dtype, device, svd_driver)
    save_factors(path, *factors)
    return path, factors


def load_or_decompose(W: torch.Tensor, name: str, cache_dir: str | os.PathLike | None,
                      dtype: str | torch.dtype = "float32", device: str | torch.device = "auto",
                      svd_driver: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`decompose(W)` through an on-disk cache (full thin SVD) that a later stage, e.g. restore, reuses.

    Pass W as read from the checkpoint (before any cast): the cache key hashes its bytes.
    """
    if cache_dir is None:
        return decompose(W, dtype, device, svd_driver)
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    path, factors = ensure_cached(W, name, cache_dir, dtype, device, svd_driver)
    return factors if factors is not None else load_factors(path, None, device)


# ---------------------------------------------------------------------------------------- checkpoints
def warn_if_model_types_differ(checkpoints: list["LazyWeights"], what: str) -> None:
    """A warning where the checkpoints' config.json model types differ: their names and shapes may match, but
    fine-tuning keeps model_type, so two types are rarely one model before and after."""
    types = {ck.label: ck.model_type for ck in checkpoints if ck.model_type}
    if len(set(types.values())) > 1:
        log.warning("the checkpoints are of different model types (%s): their names and shapes match, but %s "
                    "only if one was trained from the other", ", ".join(f"{label} {t}" for label, t in types.items()),
                    what)


def _model_type(path: Path) -> str | None:
    """config.json's model_type, or None where there is no readable one (a bare weights directory)."""
    try:
        found = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


class LazyWeights:
    """The analysable 2-D weights of one HF checkpoint directory, read lazily from its shards."""

    def __init__(self, label: str, path: str | os.PathLike):
        self.label, self.path = label, Path(path)
        where = f"checkpoint {label!r} ({self.path})"
        try:  # a wrong path, a missing shard, a truncated header: one clear line, not a traceback
            artifacts.validate_checkpoint(self.path)
        except ValueError as err:
            raise WeightsError(f"checkpoint {label!r}: {err}") from None
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = {name: self.path / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                found = sorted(p.name for p in self.path.iterdir())[:8]
                raise WeightsError(f"{where}: holds no *.safetensors (found {found}); save it with "
                                   f"save_pretrained(..., safe_serialization=True)")
            files = {}
            for shard in shards:
                with safe_open(str(shard), framework="pt") as f:
                    files.update({name: shard for name in f.keys()})
        self.model_type = _model_type(self.path)
        self.names: dict[str, str] = {}  # canonical key -> name in this checkpoint
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._files = files
        for shard in sorted(set(files.values())):
            with safe_open(str(shard), framework="pt") as f:  # reads the header only
                for name in f.keys():
                    parsed = parse_name(name)
                    shape = tuple(f.get_slice(name).get_shape())
                    if parsed is None or len(shape) != 2:
                        continue
                    if parsed[0] in self.names:
                        raise WeightsError(f"{where}: {self.names[parsed[0]]} and {name} both map to "
                                           f"{parsed[0]}; pass names=[...] to pick one")
                    self.names[parsed[0]], self.shapes[parsed[0]] = name, shape
        if not self.names:
            raise WeightsError(f"{where}: no attention/MLP projection, embed_tokens or lm_head weights found "
                               f"(first names: {sorted(files)[:5]}); only Llama-style names are supported "
                               f"(layers.N.self_attn.q_proj.weight ...: Llama, Qwen2, Mistral, SmolLM, "
                               f"Llama-3.2-Vision), not e.g. GPT-2's c_attn/c_fc")

    def load(self, key: str) -> torch.Tensor:
        """One tensor as stored (dtype unchanged) on CPU. Zero-copy: it is backed by the shard's memory map,
        so only its own pages are read, and the map goes when the tensor is freed."""
        name = self.names[key]
        with safe_open(str(self._files[name]), framework="pt") as f:
            return f.get_tensor(name)

    def read(self, key: str, a: int, b: int, columns: bool = False) -> torch.Tensor:
        """Rows a:b (columns a:b if `columns`) as an owned copy. The shard is opened per call: pages read
        through its memory map stay resident while it is open, so one open over a whole embedding costs
        the embedding's size in RSS even when read block by block. A slice is a view into that mapping,
        hence the copy."""
        name = self.names[key]
        with safe_open(str(self._files[name]), framework="pt") as f:
            part = f.get_slice(name)
            return (part[:, a:b] if columns else part[a:b]).clone()


def decompose_streamed(ck: LazyWeights, key: str, dtype: torch.dtype, device: torch.device,
                        svd_driver: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """decompose(ck.load(key)), but a tall or wide matrix is read block by block from the shard, so that
    it is never resident whole beside its factors."""
    rows, cols = ck.shapes[key]
    if _use_gram((rows, cols), dtype, device):
        if rows >= cols:
            found = _gram_svd(lambda a, b: ck.read(key, a, b), rows, cols, dtype)
        else:
            found = _wide(_gram_svd(lambda a, b: ck.read(key, a, b, columns=True).mT, cols, rows, dtype))
        if found is not None:
            return found
    return decompose(ck.load(key), dtype, device, svd_driver)


def svd_cache(cfg) -> Path:
    """Decompositions shared by the spectra stage and direction restore: runs/<preset>/svd_cache, beside
    spectra/ rather than in it, so that spectra of other settings can be moved aside whole without taking
    the cache with them. A cache at the earlier place (spectra/svd_cache) is moved here: for the 7B presets
    it is hundreds of GB, too much to decompose again or to keep twice."""
    cache, earlier = artifacts.run_dir(cfg) / "svd_cache", artifacts.spectra_dir(cfg) / "svd_cache"
    if earlier.is_dir() and not cache.exists():
        earlier.rename(cache)
    return cache
