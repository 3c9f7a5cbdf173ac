"""Full-parameter SFT of a preset's base model on the ID card-game answers (PAPER_SPEC §3, Figure 2).

    python -m paper_lib.sft --preset tiny                                   # one process
    accelerate launch --config_file configs/accelerate/zero3.yaml --num_processes 4 \\
        -m paper_lib.sft --preset qwen7b [--override sft.max_steps=200 ...] [--force]

From Python (a notebook): `sft.run(cfg)` builds that command (`launch_command`), runs it as a subprocess
so the caller never holds the model, streams its progress bar and log, and appends them to
runs/<preset>/logs/sft.log (`launch.stage_log`).

What a run leaves in runs/<preset>/sft/ (`artifacts.sft_dir`):
- checkpoint-<step>/ every `sft.save_steps` steps and at the last step, all kept, each a Hugging Face
  checkpoint with its tokenizer (`models.load(cfg, checkpoint=...)` loads it). Only the newest keeps the
  optimizer state, which is all a resume needs (for the 7B presets it is ~100 GB a checkpoint);
- losses.csv, a tidy table (step, curve, loss) of Figure 2's curves every `sft.eval_steps` steps:
  id_train (the training loss, averaged over the steps since the last point), id_test (the first
  `data.loss_set_size` hands of id_test) and ood (the ood_loss split); id_test and ood also at step 0;
- tensorboard/ (the same curves, learning rate and gradient norm), run_spec.json (the spec being
  trained), manifest.json (written only when training finished).

The loss is on the answer only: TRL's SFTTrainer tokenizes a conversational prompt-completion row as the
chat-templated prompt (with the generation prompt) followed by the completion, and masks the prompt
tokens' labels with -100; `sft.text_format: upstream_qwen` tokenizes the authors' Qwen text instead
(`upstream_qwen_tokens`) and `upstream_llama` their Llama text (`chat_tokens_apart` with a "\n" after the
end token), masked the same way. A killed run resumes from its newest complete checkpoint
(Trainer's resume_from_checkpoint: weights, optimizer, scheduler, RNG and data order), and the loss table drops
the rows logged after that checkpoint, so it continues without duplicates. A finished run whose
manifest matches (cfg.sft, cfg.data, the base model's identity, this module's code) is not redone;
`force` redoes it from scratch.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from . import artifacts, cards, launch, models
from . import data as data_lib
from .config import Config

log = logging.getLogger(__name__)

LOSS_TABLE = "losses.csv"
CURVES = {"loss": "id_train", "eval_id_test_loss": "id_test", "eval_ood_loss": "ood"}
_CKPT_PREFIX = "checkpoint-"


# --------------------------------------------------------------------------------------------- artifacts
def manifest_spec(cfg: Config) -> dict[str, Any]:
    """What a finished SFT run is keyed on: cfg.sft, the data stage's manifest, the base model's identity,
    and the code of sft.py with every module it imports."""
    return {"stage": "sft", "sft": dataclasses.asdict(cfg.sft), "data": dataclasses.asdict(cfg.data),
            "data_stage": artifacts.stage_key(data_lib.build(cfg)),
            "base_model": base_model_identity(cfg), "code": artifacts.code_hash("sft")}


def base_model_identity(cfg: Config) -> dict[str, Any]:
    """Name, config.json hash and weight file sizes of the base model (and the tiny model's architecture
    and build code), cheap to compute even for a 7B checkpoint. The load dtype is left out: SFT always
    trains float32 master weights."""
    path = models.base_model_path(cfg)
    artifacts.validate_checkpoint(path, f"check the base model {cfg.model.name!r} (model.name) and replace the file")
    identity: dict[str, Any] = {
        "name": cfg.model.name,
        "config": artifacts.file_hash(path / "config.json"),
        "weights": sorted([p.name, p.stat().st_size] for p in path.glob("*.safetensors")),
    }
    if cfg.model.name == "tiny":
        identity["tiny"] = dataclasses.asdict(cfg.model.tiny)
    built = artifacts.read_manifest(path)  # tiny and smol are built here, with their own manifest
    if built is not None:
        identity["build_code"] = built.get("code")
    return identity


def checkpoint_step(path: str | os.PathLike) -> int:
    name = Path(path).name
    if not name.startswith(_CKPT_PREFIX) or not name[len(_CKPT_PREFIX):].isdigit():
        raise ValueError(f"{path} is not a checkpoint-<step> directory")
    return int(name[len(_CKPT_PREFIX):])


def _is_complete(path: Path) -> bool:
    """The Trainer writes trainer_state.json last, after the weights and the optimizer state."""
    return artifacts.trainer_state(path) is not None and artifacts.has_weights(path)


def _checkpoint_dirs(out: Path) -> list[Path]:
    found = [p for p in out.glob(f"{_CKPT_PREFIX}*") if p.is_dir() and p.name[len(_CKPT_PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


def checkpoints(cfg: Config) -> dict[int, Path]:
    """{step: path} of the preset's complete SFT checkpoints, ordered by step (as ppo.checkpoints)."""
    return {checkpoint_step(p): p for p in _checkpoint_dirs(artifacts.sft_dir(cfg)) if _is_complete(p)}


def checkpoint(cfg: Config, step: int | str = "final") -> Path:
    """The checkpoint at `step`: an int, "final" or "full_sft" (artifacts.full_sft_step's rule). Inter_SFT
    is chosen by evaluation (evaluate.named_checkpoints: the best OOD checkpoint), not by step."""
    found = checkpoints(cfg)
    if not found:
        raise FileNotFoundError(f"no SFT checkpoint in {artifacts.sft_dir(cfg)}; run the SFT first "
                                f"(notebooks/02_sft.py, or `python -m paper_lib.sft --preset {cfg.preset}`)")
    if step == "final":
        return found[max(found)]
    if step == "full_sft":
        return found[artifacts.full_sft_step(cfg, found)]
    if isinstance(step, str) or step not in found:
        raise FileNotFoundError(f"no SFT checkpoint for {step!r} in {artifacts.sft_dir(cfg)}; saved steps: "
                                f"{sorted(found)} (or 'final', 'full_sft')")
    return found[step]


def loss_table(cfg: Config) -> "pd.DataFrame":  # noqa: F821
    """Figure 2's tidy table: one row per (step, curve) with its loss."""
    path = artifacts.sft_dir(cfg) / LOSS_TABLE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the SFT first (sft.run(cfg))")
    return artifacts.read_table(path, _redo(cfg))


def log_tail(cfg: Config, lines: int = 20) -> str:
    """The last lines of the log of the SFT run in sft_dir (launch.run_log_tail): that run's, even when an
    earlier run was moved back or other runs wrote to runs/<preset>/logs/sft.log since."""
    return launch.run_log_tail(artifacts.sft_dir(cfg), lines)


# ------------------------------------------------------------------------------------------- launching
def launch_command(cfg: Config, force: bool = False, use_accelerate: bool | None = None) -> list[str]:
    """The command that trains cfg (launch.stage_command): `python -m paper_lib.sft --preset P --override
    k=v ...`, behind accelerate launch with configs/accelerate/<sft.accelerate_config>.yaml when asked."""
    return launch.stage_command(cfg, "sft", "sft", ["--force"] if force else [], use_accelerate)


def run(cfg: Config, force: bool = False, stream: bool = True) -> Path:
    """Train cfg's SFT in a subprocess (launch.run_stage) unless a finished run matches; returns sft_dir.
    Its output is appended to runs/<preset>/logs/sft.log, kept in sft_dir/run.log and, with stream=True,
    echoed as it comes."""
    out = artifacts.sft_dir(cfg)
    data_lib.build(cfg)  # here, once, rather than racing in several ranks
    spec = manifest_spec(cfg)  # builds the tiny base model here too
    if artifacts.finished_run(out, spec, _redo(cfg), force):
        return out
    launch.run_stage(cfg, "sft", "sft", ["--force"] if force else [], stream=stream, keep_log_in=out)
    if not artifacts.manifest_matches(out, spec):
        raise launch.StageError(f"the SFT command exited cleanly but {out / artifacts.MANIFEST} does not match the "
                                f"config; see {launch.stage_log(cfg, 'sft')}")
    return out


# -------------------------------------------------------------------------------------------- training
def sft_args(cfg: Config, resume: bool = False) -> Any:
    """TRL's SFTConfig for cfg.sft. bf16 only where the device supports it (fp32 on CPU); gradient
    checkpointing (sft.gradient_checkpointing) on GPU only; evaluation and logging every eval_steps; every
    checkpoint kept."""
    import torch
    from trl import SFTConfig

    # transformers 5.x renamed gradient_checkpointing (TRL's default: on) to activation_checkpointing
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    s = cfg.sft
    cuda = torch.cuda.is_available()
    bf16 = bool(s.bf16 and cuda and torch.cuda.is_bf16_supported())
    if s.bf16 and not bf16:
        log.info("sft.bf16 is set but no bf16-capable GPU is here: training in float32")
    return SFTConfig(
        output_dir=str(artifacts.sft_dir(cfg)),
        per_device_train_batch_size=s.per_device_batch_size,
        per_device_eval_batch_size=s.eval_batch_size or s.per_device_batch_size,
        average_tokens_across_devices=s.average_tokens_across_devices,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        learning_rate=s.learning_rate,
        num_train_epochs=s.epochs,
        max_steps=s.max_steps,
        lr_scheduler_type="constant" if s.lr_scheduler == "warmup_log" else s.lr_scheduler,  # see build_trainer
        warmup_steps=s.warmup_steps or s.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=s.weight_decay,
        adam_beta2=s.adam_beta2,
        adam_epsilon=s.adam_eps,
        bf16=bf16,
        use_cpu=not cuda,
        **{checkpointing: bool(s.gradient_checkpointing and cuda)},
        # every trainable parameter gets a gradient (Mllama's unused parts are frozen), so DDP needs no search
        ddp_find_unused_parameters=False,
        max_length=s.max_length,
        completion_only_loss=True,
        packing=False,
        eval_strategy="steps",
        eval_steps=s.eval_steps,
        eval_on_start=not resume,  # the step-0 points; a resumed run has them already
        logging_strategy="steps",
        logging_steps=s.eval_steps,
        save_strategy="steps",
        save_steps=s.save_steps,
        save_total_limit=None,
        report_to="none",  # LossTableCallback writes the curves to CSV and TensorBoard
        seed=s.seed,
        disable_tqdm=False,
        include_num_input_tokens_seen="non_padding",  # trained tokens, for the throughput in the manifest
    )


def build_trainer(cfg: Config, resume: bool = False, model: Any = None, tokenizer: Any = None) -> Any:
    """The SFTTrainer for cfg: the base model (float32 master weights), sft_train as prompt-completion
    pairs, eval sets {"id_test": first loss_set_size rows of id_test, "ood": ood_loss}. Pass model and
    tokenizer together to train something other than models.load(cfg)."""
    from trl import SFTTrainer

    if (model is None) != (tokenizer is None):
        raise TypeError("build_trainer needs model and tokenizer together (or neither, for the preset's base model)")

    args = sft_args(cfg, resume=resume)  # before the model: under ZeRO-3 it partitions at load
    splits = data_lib.load(cfg)
    columns = ["prompt", "completion"]
    n_loss = min(cfg.data.loss_set_size, len(splits["id_test"]))
    if model is None:
        model, tokenizer = models.load(cfg, dtype="float32", device=None)

    text_format = cfg.sft.text_format

    def as_text(split, apart: bool = False):
        if text_format == "chat_template" and not apart:  # TRL passes a row's chat_template_kwargs on
            return split.select_columns(columns).add_column("chat_template_kwargs",
                                                            [cards.TEMPLATE_KWARGS] * len(split))
        # tokenized here, so TRL neither templates nor adds an EOS
        if text_format == "upstream_qwen":
            tokens = upstream_qwen_tokens
        else:  # data.py wrote the answer "{answer}<|eot_id|>\n"
            tokens = functools.partial(chat_tokens_apart, suffix="\n" if text_format == "upstream_llama" else "")
        return split.map(lambda row: tokens(tokenizer, row["prompt"], row["completion"]),
                         remove_columns=split.column_names)

    # The upstream-format OOD answers begin with a newline, which a tokenizer may fuse with the prompt's last
    # (Llama-3: one "\n\n\n" token after the header); the authors tokenized prompt and answer apart, as here.
    ood = as_text(splits["ood_loss"], apart=cfg.data.ood_loss_format == "upstream")
    eval_sets = {"id_test": as_text(splits["id_test"].select(range(n_loss))), "ood": ood}
    trainer_class = _with_log_warmup(SFTTrainer) if cfg.sft.lr_scheduler == "warmup_log" else SFTTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=as_text(splits["sft_train"]),
                         eval_dataset=eval_sets, processing_class=tokenizer)
    trainer.add_callback(LossTableCallback(artifacts.sft_dir(cfg)))
    return trainer


def warmup_log(step: int, warmup_steps: int) -> float:
    """The learning-rate factor of DeepSpeed's WarmupLR (warmup_type "log", min lr 0), the schedule the
    authors' SFT ran, at its `step`-th scheduler step: ln(step + 1) / ln(warmup_steps), then 1."""
    warmup_steps = max(2, warmup_steps)  # as WarmupLR: ln(1) would divide by zero
    return math.log(step + 1) / math.log(warmup_steps) if step < warmup_steps else 1.0


def warmup_log_used(step: int, warmup_steps: int) -> float:
    """The factor optimizer step `step` (0-based) ran at under WarmupLR: it sets the lr to 0 when built and
    steps after each optimizer step, from its own step 0, so the first two steps run at 0, then
    warmup_log(step - 1). (The authors' log prints the rate of the step to come: 0.0, ln 2 / ln 376, ...)"""
    return warmup_log(max(step - 1, 0), warmup_steps)


def _with_log_warmup(trainer_class: type) -> type:
    """trainer_class whose scheduler is WarmupLR's over the args' warmup steps (a subclass, not a patched
    method: transformers' DeepSpeed path builds the scheduler on a shallow copy of the trainer)."""
    from torch.optim.lr_scheduler import LambdaLR

    class LogWarmupTrainer(trainer_class):
        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                warmup = self.args.get_warmup_steps(num_training_steps)
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer,
                                             functools.partial(warmup_log_used, warmup_steps=warmup))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return LogWarmupTrainer


# The authors' Qwen SFT text (RL_Heals_SFT sft/src/training/data_qwen.py): Llama-3's header strings, which
# Qwen's tokenizer reads as plain text, and "\\n" in an f-string, a backslash and an n, not a newline.
UPSTREAM_QWEN_PROMPT = ("<|start_header_id|>{user}<|end_header_id|>\\n\\n{content}<|eot_id|>\\n"
                        "<|start_header_id|>{assistant}<|end_header_id|>\\n\\n")
UPSTREAM_QWEN_ANSWER = "{content}<|eot_id|>\\n"


def upstream_qwen_tokens(tokenizer: Any, prompt: list[dict], completion: list[dict]) -> dict[str, list[int]]:
    """One prompt-completion row as the authors' Qwen SFT tokenized it: prompt and answer text tokenized
    apart, without special tokens, the loss on the answer only (TRL's completion_mask)."""
    (user,), (answer,) = prompt, completion
    return _tokens_apart(tokenizer, UPSTREAM_QWEN_PROMPT.format(user=user["role"], content=user["content"],
                                                                assistant=answer["role"]),
                         UPSTREAM_QWEN_ANSWER.format(content=answer["content"]))


def chat_tokens_apart(tokenizer: Any, prompt: list[dict], completion: list[dict],
                      suffix: str = "") -> dict[str, list[int]]:
    """One prompt-completion row under the chat template, tokenized as the authors' Llama SFT did
    (sft/src/training/data.py): the templated prompt with its generation prompt, then the rest of the
    templated conversation and `suffix` (theirs: "\n"), each tokenized apart, so the answer starts at the
    token generation would start from. TRL tokenizes the whole text at once, where a tokenizer may fuse the
    two sides' boundary."""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False,
                                                **cards.TEMPLATE_KWARGS)
    whole = tokenizer.apply_chat_template(prompt + completion, tokenize=False, **cards.TEMPLATE_KWARGS)
    if not whole.startswith(prompt_text):
        raise ValueError("the chat template renders the prompt differently once the answer follows it; "
                         "its prompt and answer cannot be tokenized apart")
    return _tokens_apart(tokenizer, prompt_text, whole[len(prompt_text):] + suffix)


def _tokens_apart(tokenizer: Any, prompt_text: str, answer_text: str) -> dict[str, list[int]]:
    """The two texts tokenized apart, without special tokens; the loss on the answer only (TRL's
    completion_mask)."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt_ids + answer_ids, "completion_mask": [0] * len(prompt_ids) + [1] * len(answer_ids)}


def train(cfg: Config, force: bool = False) -> Path:
    """Train in this process (or in each rank of an accelerate launch); returns sft_dir.

    Skips a finished run with a matching manifest; resumes an interrupted run of the same spec from its
    newest complete checkpoint; starts afresh when forced or when the directory holds another spec."""
    state = launch.process_state()
    out = artifacts.sft_dir(cfg)
    with state.main_process_first():  # data and the tiny base model are built once
        data_lib.build(cfg)
        spec = manifest_spec(cfg)
    if not force and artifacts.up_to_date(out, spec, _redo(cfg)):
        log.info("SFT in %s is up to date (manifest matches); pass --force to redo it", out)
        return out
    launch.check_process_count(state, "sft", cfg.sft.num_processes)
    launch.report_processes("sft", state, f"{_per_process_batch(cfg)} examples per optimizer step (of "
                                          f"{state.num_processes * _per_process_batch(cfg)} in all)")
    if state.is_main_process:
        _prepare_dir(out, spec, force)
    state.wait_for_everyone()
    resume_from = _last_complete(out)
    if resume_from is not None:
        log.info("resuming from %s (step %d)", resume_from, checkpoint_step(resume_from))

    started = time.time()
    trainer = build_trainer(cfg, resume=resume_from is not None)
    before = _trainer_state(resume_from)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    state.wait_for_everyone()
    if state.is_main_process:
        done = checkpoints(cfg)
        final = trainer.state.global_step
        if not done or max(done) != final:
            hint = ""
            if (out / f"{_CKPT_PREFIX}{final}" / "trainer_state.json").is_file():
                hint = (" (it has no *.safetensors weights: under DeepSpeed ZeRO-3 the accelerate config needs "
                        "`zero3_save_16bit_model: true`, as configs/accelerate/zero3.yaml has)")
            raise launch.StageError(f"training ended at step {final} but the newest complete checkpoint in {out} is "
                           f"{done[max(done)].name if done else 'none'}{hint}")
        artifacts.write_manifest(out, spec, final_step=final, checkpoints=[p.name for p in done.values()],
                                 resumed_from=resume_from.name if resume_from else None,
                                 seconds=round(time.time() - started, 1), processes=state.num_processes,
                                 **throughput(before, trainer.state, result.metrics["train_runtime"]))
        log.info("SFT done: %d checkpoints in %s, final step %d", len(done), out, final)
    state.wait_for_everyone()
    return out


def _trainer_state(checkpoint: Path | None) -> dict:
    """The trainer state a resumed run starts from (an empty one for a fresh run)."""
    return artifacts.trainer_state(checkpoint) if checkpoint else {}


def throughput(before: dict, after: Any, runtime: float) -> dict:
    """What this process's training did, for docs/benchmarks.md (benchmarks/bench_run.py): the non-padding
    tokens it trained on (all processes) and its seconds of training, the Trainer's runtime less the loss
    evaluations of Figure 2 logged meanwhile (checkpoint saves stay in). `before` is the trainer state a
    resumed run started from, `after` the Trainer's state at the end."""
    new_logs = after.log_history[len(before.get("log_history", [])):]
    evaluating = sum(v for entry in new_logs for k, v in entry.items()
                     if k.startswith("eval_") and k.endswith("_runtime"))
    return {"train_tokens": int(after.num_input_tokens_seen - before.get("num_input_tokens_seen", 0)),
            "train_seconds": round(runtime - evaluating, 2)}


def _redo(cfg: Config) -> str:
    """How to remake a finished SFT run whose checkpoint is damaged (artifacts.up_to_date's message)."""
    return f"redo SFT with force=True (`python -m paper_lib.sft --preset {cfg.preset} --force`)"


def _per_process_batch(cfg: Config) -> int:
    return cfg.sft.per_device_batch_size * cfg.sft.gradient_accumulation_steps


def _last_complete(out: Path) -> Path | None:
    done = [p for p in _checkpoint_dirs(out) if _is_complete(p)]
    return done[-1] if done else None


def _prepare_dir(out: Path, spec: dict[str, Any], force: bool) -> None:
    """Make out ready for training spec (artifacts.prepare_run_dir), then drop what follows the newest
    complete checkpoint of an interrupted run (partial checkpoints, later loss rows)."""
    artifacts.prepare_run_dir(out, spec, force, "an SFT run")
    resume = _last_complete(out)
    step = checkpoint_step(resume) if resume else 0
    for path in _checkpoint_dirs(out):
        if checkpoint_step(path) > step or not _is_complete(path):
            log.info("removing %s (incomplete, or after the checkpoint we resume from)", path.name)
            shutil.rmtree(path)
    if resume is None:
        (out / LOSS_TABLE).unlink(missing_ok=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
    else:
        artifacts.keep_rows(out / LOSS_TABLE, "step", step)


class LossTableCallback(TrainerCallback):
    """Appends Figure 2's points (id_train, id_test, ood) to losses.csv and TensorBoard as they are logged;
    after each save, drops the optimizer state of the older checkpoints (a resume needs the newest only)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.writer = None
        self.seen: set[tuple[int, str]] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        table = self.out / LOSS_TABLE
        if table.is_file():
            with open(table, newline="") as fh:
                self.seen = {(int(r["step"]), r["curve"]) for r in csv.DictReader(fh)}
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged after the checkpoint this run resumes from
        self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=state.global_step + 1 if state.global_step else None)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last id_train point, when max_steps is not a multiple of eval_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        step = state.global_step
        rows = [{"step": step, "curve": curve, "loss": float(logs[key])}
                for key, curve in CURVES.items() if key in logs and (step, curve) not in self.seen]
        if rows:
            artifacts.append_rows(self.out / LOSS_TABLE, rows)
            self.seen.update((r["step"], r["curve"]) for r in rows)
        if self.writer is not None:
            for row in rows:
                self.writer.add_scalar(f"loss/{row['curve']}", row["loss"], step)
            for key in ("learning_rate", "grad_norm"):
                if key in logs:
                    self.writer.add_scalar(f"train/{key}", float(logs[key]), step)
            self.writer.flush()

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        newest = self.out / f"{_CKPT_PREFIX}{state.global_step}"
        for path in _checkpoint_dirs(self.out):
            if path == newest or checkpoint_step(path) > state.global_step:
                continue
            for item in [path / "optimizer.pt", path / "latest", *path.glob("global_step*")]:
                if item.is_dir():
                    shutil.rmtree(item, ignore_errors=True)
                elif item.exists():
                    item.unlink()

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = launch.stage_arguments("python -m paper_lib.sft", __doc__.split("\n\n")[0], "train")
    args = parser.parse_args(argv)
    main_process = launch.process_state().is_main_process
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return launch.run_main(lambda: f"SFT checkpoints in {train(launch.stage_config(args), force=args.force)}")


if __name__ == "__main__":
    sys.exit(main())
