# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Supervised fine-tuning and its losses (Figure 2)
#
# Full-parameter SFT of the base model on ID prompt → solver-answer pairs (PAPER_SPEC §3). The loss is
# on the answer tokens only: the chat-templated prompt is masked. Paper settings: lr 1e-6, one epoch,
# global batch 64 (16 per GPU × 4), cosine schedule with 3% warmup, no weight decay, bf16, DeepSpeed
# ZeRO-3, a checkpoint every 20 steps. The authors' runs, which qwen7b and llama11b follow, held 1e-6 after
# a log-shaped warmup instead (`sft.lr_scheduler: warmup_log`; docs/faithfulness.md). Every checkpoint is
# kept under `runs/<preset>/sft/checkpoint-<step>` for the later stages (evaluation, RL, spectra, restore).
#
# **Figure 2** follows three losses during SFT: the ID training loss, the loss on held-out ID test
# hands, and the loss on OOD hands (J/Q/K = 11/12/13). The paper's finding: both ID losses keep falling,
# while the OOD loss reaches its minimum early (≈ step 100: 0.45 for Qwen, 0.67 for Llama) and then
# rises, which is where OOD success peaks (**Inter_SFT**) before SFT overfits the ID rule.
#
# The training runs as its own process (`accelerate launch … -m paper_lib.sft` with several GPUs), so
# this notebook does not hold the model; its progress bar and log stream below. An interrupted run
# resumes from its last checkpoint when this cell runs again; a finished one is reused.

# %% tags=["parameters"]
preset = "tiny"
overrides = {}  # e.g. {"sft.max_steps": 200, "model.name": "/path/to/model"}
force = False  # retrain from scratch even if a finished run matches the config
fig2_xscale = "symlog"  # Figure 2's step axis: "symlog" (the authors') or "linear"

# %%
import pandas as pd
from IPython.display import display

from paper_lib import artifacts, config, plots, sft

cfg = config.load(preset, **overrides)
print("command:", " ".join(sft.launch_command(cfg)))
out = sft.run(cfg, force=force)

# %% [markdown]
# ## The run: end of its log, and the checkpoints

# %%
print(sft.log_tail(cfg, 12) or f"(no log kept with this run: it was trained from the command line; see {out.parent / 'logs' / 'sft.log'})")
checkpoints = sft.checkpoints(cfg)
display(pd.DataFrame({
    "step": list(checkpoints),
    "checkpoint": [str(p) for p in checkpoints.values()],
    "MB": [round(sum(f.stat().st_size for f in p.glob("*.safetensors")) / 2**20, 1) for p in checkpoints.values()],
}))

# %% [markdown]
# ## Figure 2
# Losses every `sft.eval_steps` steps; the ID train point is the mean training loss since the previous
# point. Dotted lines mark the checkpoints the paper names (Inter_SFT and full SFT) when the run reaches them;
# the Inter_SFT of the later notebooks is picked from the evaluations (04_eval) and may be another step.
# The step axis is the authors' (`fig2_xscale = "symlog"`: linear to step 100, then log); "linear" is plain.

# %%
table = sft.loss_table(cfg)
display(table.pivot(index="step", columns="curve", values="loss").round(3))
marks = {"Inter_SFT (the paper's step)": cfg.sft.inter_sft_step, "full SFT": cfg.sft.full_sft_step}
fig = plots.sft_loss(table, marks=marks, xscale=fig2_xscale)
plots.save_figure(fig, "fig2_sft_loss", cfg, notebook="02_sft", sources=[out / sft.LOSS_TABLE], data=table);

# %% [markdown]
# ## Checks

# %%
manifest = artifacts.read_manifest(out)
assert artifacts.manifest_matches(out, sft.manifest_spec(cfg)), "the run finished with this config"
assert checkpoints, "at least one checkpoint"
assert max(checkpoints) == manifest["provenance"]["final_step"], "the final step is saved"
for path in checkpoints.values():
    assert (path / "config.json").is_file() and any(path.glob("*.safetensors")), path
    assert (path / "tokenizer_config.json").is_file(), f"{path} holds its tokenizer"
assert not table.duplicated(["step", "curve"]).any()
assert set(table["curve"]) == {"id_train", "id_test", "ood"}
train = table[table["curve"] == "id_train"].sort_values("step")["loss"]
assert train.iloc[-1] < train.iloc[0], "the ID train loss fell"
print("all checks passed")
