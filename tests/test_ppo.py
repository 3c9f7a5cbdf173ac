"""PPO (paper_lib.ppo): the estimator and loss by hand, the thought weighting, the value head on disk, a
short run whose optimiser must raise an easy reward, resume after SIGKILL, and a GRPO smoke run."""
import math
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from paper_lib import actor_critic, artifacts, cards, config, grpo, launch, models, ppo
from paper_lib.config import PROJECT_ROOT



@pytest.fixture(autouse=True)
def one_thread():
    """A 2-layer model gains nothing from threads, and another test may hold the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def sft_ready(tiny_base):
    """This test's runs dir holds the tiny base model and, standing in for 02_sft, an SFT checkpoint."""
    cfg = config.load("tiny")
    shutil.copytree(tiny_base.path, artifacts.base_model_dir(cfg))
    shutil.copytree(tiny_base.path, artifacts.sft_dir(cfg) / "checkpoint-4")
    return artifacts.sft_dir(cfg) / "checkpoint-4"


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    return models.load_tokenizer(tiny_base.path)


# ------------------------------------------------------------------------------------- by hand
def test_gae_by_hand():
    # slot 0: rewards 1, 0, 2 with the episode ending after step 1; slot 1: one long episode
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 1.0]])
    values = torch.tensor([[0.5, 1.0], [0.4, 1.0], [0.3, 1.0]])
    dones = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    next_values = torch.tensor([0.2, 2.0])
    adv, ret = actor_critic.gae(rewards, values, dones, next_values, gamma=0.9, lam=0.95)
    # slot 0: t=2: 2 + .9*.2 - .3 = 1.88; t=1 (terminal): -0.4; t=0: 1 + .9*.4 - .5 + .9*.95*(-.4) = 0.518
    # slot 1 (rewards 0, 0, 1): deltas 0 + .9 - 1 = -.1, -.1, 1 + .9*2 - 1 = 1.8; gamma*lambda = .855
    d = [-0.1, -0.1, 1.8]
    g2 = d[2]
    g1 = d[1] + 0.855 * g2
    g0 = d[0] + 0.855 * g1
    assert torch.allclose(adv[:, 0], torch.tensor([0.518, -0.4, 1.88]), atol=1e-6)
    assert torch.allclose(adv[:, 1], torch.tensor([g0, g1, g2]), atol=1e-6)
    assert torch.allclose(ret, adv + values)


def test_clipped_losses_by_hand():
    ratio = torch.tensor([1.2, 0.8, 0.8, 20.0, 1.05])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    old = torch.zeros(5)
    values, old_values, returns = torch.tensor([1.0] * 5), torch.tensor([0.5] * 5), torch.tensor([2.0] * 5)
    policy, value, clipped = actor_critic.ppo_loss(ratio.log(), old, adv, values, old_values, returns, clip_eps=0.1)
    # -min(r A, clip(r) A); past a ratio of 10 only the clipped term counts (upstream)
    assert torch.allclose(policy, torch.tensor([-1.1, -0.8, 0.9, 1.1, -2.1]), atol=1e-6)
    # value clipped to 0.5 + 0.1: 0.5 * max((1 - 2)^2, (0.6 - 2)^2) = 0.98
    assert torch.allclose(value, torch.full((5,), 0.98), atol=1e-6)
    assert clipped.tolist() == [True, True, True, True, False]


def test_a_runaway_ratio_gives_no_gradient_and_no_nan():
    """exp(1000) is inf in float32 and its backward 0 * inf = NaN; past a ratio of 10 the loss is flat, so
    the capped log-ratio leaves the loss as it was and the gradient zero."""
    logp = torch.tensor([1000.0, 50.0], requires_grad=True)
    policy, _, clipped = actor_critic.ppo_loss(logp, torch.zeros(2), torch.tensor([-1.0, 1.0]), torch.zeros(2),
                                               torch.zeros(2), torch.zeros(2), clip_eps=0.1)
    policy.sum().backward()
    assert torch.allclose(policy, torch.tensor([1.1, -1.1])) and clipped.all()
    assert logp.grad.tolist() == [0.0, 0.0]


class _AlwaysWrong:
    """A generator whose every answer is graded wrong: what the rollouts make of failed episodes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate_tokens(self, conversations):
        from paper_lib.rollout import Generation
        return [Generation([1, 2], [3, 4], "no answer") for _ in conversations]


@pytest.mark.parametrize("episode_end", ["terminal", "upstream"])
def test_a_failed_episode_ends_as_configured(tokenizer, episode_end):
    wrong = lambda hand, text: cards.Verdict("INCORRECT_NUMBER", -2.0, "wrong.")
    rollouts = actor_critic.Rollouts(1, seed=0, max_attempts=5, target=24, grade=wrong, episode_end=episode_end)
    first = rollouts.slots[0]
    table, finished = rollouts.collect(_AlwaysWrong(tokenizer), rounds=7, coef=0.5)
    steps = [row[0] for row in table]
    assert steps[0].weights == [1.0, 1.0], "two tokens, no key: both in upstream's action tail"
    assert finished[0] is first and len(first.attempts) == 5, "five graded attempts either way"
    if episode_end == "terminal":  # PAPER_SPEC 2.5: the fifth failure ends it; the next hand starts at round 6
        assert [(s.reward, s.done) for s in steps[:6]] == [(-2.0, False)] * 4 + [(-2.0, True), (-2.0, False)]
    else:  # upstream: a sixth answer, ungraded at -1 and not an end, so GAE bootstraps into the next hand
        assert [(s.reward, s.done) for s in steps[:7]] == [(-2.0, False)] * 5 + [(-1.0, False), (-2.0, False)]
        assert len(finished) == 1 and len(rollouts.slots[0].attempts) == 1


def test_thought_tokens_get_the_coefficient(tokenizer):
    hand = cards.Hand(("A", "3", "K", "10"), "id")
    text = cards.answer_text(hand, "10+10+3+1")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    weights = actor_critic.thought_weights(tokenizer, ids, 0.5)
    k = weights.index(1.0)
    assert 0 < k < len(ids) and weights == [0.5] * k + [1.0] * (len(ids) - k)
    key = text.index('"formula"')
    before, through = tokenizer.decode(ids[:k]), tokenizer.decode(ids[:k + 1])
    assert len(before) <= key < len(through), "the first weight-1 token holds the key's opening quote"
    # two keys: the last one splits (upstream matches the last)
    twice = tokenizer(text + "\n" + text, add_special_tokens=False)["input_ids"]
    assert actor_critic.thought_weights(tokenizer, twice, 0.5).index(1.0) > len(ids)
    # no key, or "last_tokens" (qwen7b): upstream's fallback, the last 5 tokens are the action
    tail = [0.5] * (len(ids) - 5) + [1.0] * 5
    assert actor_critic.thought_weights(tokenizer, ids, 0.5, "last_tokens") == tail != weights
    no_key = tokenizer("there is no key in this answer at all", add_special_tokens=False)["input_ids"]
    assert actor_critic.thought_weights(tokenizer, no_key, 0.5) == [0.5] * (len(no_key) - 5) + [1.0] * 5
    assert actor_critic.thought_weights(tokenizer, no_key[:3], 0.5) == [1.0] * 3


def _upstreams_sum(token_logps: torch.Tensor, ids: torch.Tensor, coef: float, key: int | None) -> float:
    """Upstream's evaluate (SFTvsRL rl/trainer/model_tz_llama.py) on one answer, re-enacted with its tensor
    slicing: token_logps[k] is log p of answer token k, key the index of its last key match (None: none)."""
    mask = (ids != 0)[None, 1:]
    selected = mask * token_logps[None, 1:]
    if key is None:
        try:
            key = int(mask.nonzero(as_tuple=False)[-4, 1])
        except IndexError:
            return -2.0  # upstream's constant: no gradient
    return float(coef * selected[:, 1:key - 1].sum(1) + selected[:, key - 1:].sum(1))


def test_upstream_scored_tokens_sum_what_upstreams_slicing_summed():
    """rl.scored_tokens "upstream": for random answers (some tokens of id 0, the key anywhere or nowhere),
    the weighted sum equals upstream's; where upstream returned a constant, every weight is 0."""
    gen = torch.Generator().manual_seed(0)
    seen_constant = seen_negative_start = 0
    for trial in range(400):
        n = int(torch.randint(3, 14, (1,), generator=gen))  # upstream's unfold crashed under 3 tokens
        ids = torch.randint(0, 4, (n,), generator=gen)  # 0 often: upstream's masked id
        logps = -torch.rand(n, generator=gen, dtype=torch.float64)
        key = None if trial % 2 else int(torch.randint(0, n, (1,), generator=gen))
        start = key if key is not None else actor_critic._upstream_tail_start(ids.tolist())
        weights = torch.tensor(actor_critic.upstream_scored(ids.tolist(), start, 0.5), dtype=torch.float64)
        expected = _upstreams_sum(logps, ids, 0.5, key)
        if start is None:
            seen_constant += 1
            assert expected == -2.0 and not weights.any()
        else:
            seen_negative_start += start < 1
            assert (weights * logps).sum().item() == pytest.approx(expected, abs=1e-12), (ids, key)
    assert seen_constant and seen_negative_start  # the edge cases were reached


def test_upstream_scored_tokens_drop_the_first_two_of_a_real_answer(tokenizer):
    hand = cards.Hand(("A", "3", "K", "10"), "id")
    ids = tokenizer(cards.answer_text(hand, "10+10+3+1"), add_special_tokens=False)["input_ids"]
    assert 0 not in ids
    for split in ("formula_key", "last_tokens"):
        every = actor_critic.thought_weights(tokenizer, ids, 0.5, split)
        upstream = actor_critic.thought_weights(tokenizer, ids, 0.5, split, scored="upstream")
        assert upstream == [0.0, 0.0] + every[2:] and every[:2] == [0.5, 0.5]
    bang = ids[:6] + [0] + ids[6:]  # an id-0 token ('!' for Llama-3 and Qwen2.5) is unscored upstream
    assert actor_critic.thought_weights(tokenizer, bang, 0.5, "last_tokens", scored="upstream")[6] == 0.0


def test_bfloat16_log_probs_round_as_upstreams_and_a_small_change_jumps_or_stays():
    """rl.logprob_dtype "bfloat16": thought and action summed apart in bf16, then 0.5·thought + action; near
    -30 a bf16 sum moves in steps of 1/8, so a change in one token leaves it or moves it by 1/8."""
    tok = torch.tensor([[-1.3, -0.7, -2.1, -0.01, 0.0], [-1.0] * 5])
    weights = torch.tensor([[0.5, 0.5, 1.0, 1.0, 0.0], [1.0] * 5])  # row 0: its last position is padding
    exact = actor_critic.sequence_logp(tok, weights)
    assert exact.tolist() == pytest.approx([-0.5 * 2.0 - 2.11, -5.0])
    low = tok.bfloat16()
    thought = (low[0, :2].sum()).bfloat16()
    action = (low[0, 2:4].sum()).bfloat16()
    assert actor_critic.sequence_logp(tok, weights, "bfloat16")[0].item() == (0.5 * thought + action).float().item()
    long = torch.full((1, 30), -1.0)
    moved = {round(float(actor_critic.sequence_logp(long + bump, torch.ones(1, 30), "bfloat16")
                         - actor_critic.sequence_logp(long, torch.ones(1, 30), "bfloat16")), 6)
             for bump in (torch.eye(30)[i:i + 1] * d for i in (0, 7) for d in (0.01, -0.01, 0.07, -0.07))}
    assert moved == {0.0, 0.125, -0.125}
    exact = actor_critic.sequence_logp(long + 1e-3 * torch.eye(30)[:1], torch.ones(1, 30))
    assert exact.item() == pytest.approx(-29.999)
    heavy = torch.tensor([[2.0, 2.0, 1.0, 1.0]])  # a coefficient above 1 still weighs the thought
    assert actor_critic.sequence_logp(-torch.ones(1, 4), heavy, "bfloat16").item() == -6.0


def test_score_matches_a_plain_forward(tiny_base):
    model, tok = models.load("tiny", checkpoint=tiny_base.path)
    head = actor_critic.ValueHead(actor_critic.hidden_size(model))
    ac = actor_critic.ActorCritic(model, head).eval()
    steps = [actor_critic.Step([5, 6, 7, 8, 9], [10, 11, 12], [1.0] * 3, 0.0, False),
             actor_critic.Step([5, 6], [13, 14, 15, 16], [1.0] * 4, 0.0, False)]  # different lengths: padding
    with torch.no_grad():
        tok_logp, mask, values, _ = actor_critic.score(ac, steps, temperature=0.5, pad_id=tok.pad_token_id)
        for i, s in enumerate(steps):
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            out = model(input_ids=ids, output_hidden_states=True)
            logp = torch.log_softmax(out.logits[0] / 0.5, -1)
            p = len(s.prompt_ids)
            expected = [logp[p - 1 + j, t].item() for j, t in enumerate(s.response_ids)]
            assert torch.allclose(tok_logp[i, :len(expected)], torch.tensor(expected), atol=1e-5)
            assert mask[i].sum() == len(expected)
            assert torch.allclose(values[i], head(out.hidden_states[-1][0, p - 1]).squeeze(), atol=1e-5)


def test_value_head_round_trip(tmp_path):
    head = actor_critic.ValueHead(64)
    assert [m.out_features for m in head if isinstance(m, torch.nn.Linear)] == [16, 8, 1]
    actor_critic.save_value_head(head, tmp_path / "value_head.safetensors")
    loaded = actor_critic.load_value_head(tmp_path / "value_head.safetensors")
    x = torch.randn(3, 64)
    assert torch.equal(head(x), loaded(x))


def test_no_sft_checkpoint_is_a_clear_error(tiny_base):
    with pytest.raises(FileNotFoundError, match="02_sft"):
        ppo.init_checkpoint(config.load("tiny"))
    with pytest.raises(FileNotFoundError, match="02_sft"):
        ppo.run(config.load("tiny"))


# ------------------------------------------------------------------------------------- runs
def starts_with_space(hand, text):
    """An easy reward a random model can learn in seconds: answer with a leading space."""
    if text.startswith(" "):
        return cards.Verdict("CORRECT", 1.0, "ok")
    return cards.Verdict("ILLEGAL_FORMULA", 0.0, "start with a space.")


def test_a_two_process_config_run_in_one_process_stops_before_training(sft_ready):
    """Its global batch would be half the one its manifest records. It stops before the RL run on disk, of
    other settings, is moved aside (a correct launch would have kept it aside, not lost it, but a launch
    that trains nothing should touch nothing)."""
    out = artifacts.rl_dir(config.load("tiny"))
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "model.safetensors").write_text("an earlier run's weights")
    artifacts.write_manifest(out, {"stage": "rl", "rl": {"num_updates": 1}})
    cfg = config.load("tiny", rl__num_processes=2, rl__accelerate_config="multi_cpu")
    with pytest.raises(launch.StageError, match=r"running 1 process\(es\) but rl.num_processes is 2"):
        ppo.train(cfg, grade=starts_with_space, progress=False)
    assert (out / "checkpoint-1" / "model.safetensors").read_text() == "an earlier run's weights"
    assert artifacts.read_manifest(out)["rl"] == {"num_updates": 1} and not list(out.parent.glob("rl.stale-*"))


def test_ppo_raises_an_easy_reward(sft_ready):
    cfg = config.load("tiny", rl__max_new_tokens=2, rl__steps_per_update=32, rl__num_updates=10, rl__save_every=5,
                      rl__learning_rate=1e-2, rl__min_learning_rate=1e-2, rl__temperature=1.0,
                      eval__max_attempts=1)
    out = ppo.train(cfg, grade=starts_with_space, progress=False)
    m = pd.read_csv(out / "metrics.csv")
    assert m["update"].tolist() == list(range(1, 11))
    first, last = m["mean_reward"].head(3).mean(), m["mean_reward"].tail(3).mean()
    assert last > first + 0.3, m[["update", "mean_reward"]]
    assert m["entropy"].iloc[-1] < m["entropy"].iloc[0]  # the policy sharpened
    assert m["approx_kl"].iloc[-1] > m["approx_kl"].iloc[0] > 0  # and moved away from the start
    assert sorted(ppo.checkpoints(cfg)) == [5, 10]
    # the checkpoint is a plain HF checkpoint plus the critic beside it
    model, _ = models.load(cfg, checkpoint=out / "checkpoint-10")
    assert type(AutoModelForCausalLM.from_pretrained(out / "checkpoint-10")) is type(model)
    head = actor_critic.load_value_head(out / "checkpoint-10" / "value_head.safetensors")
    assert head.hidden_size == actor_critic.hidden_size(model)
    assert not (out / "checkpoint-5" / "trainer_state").exists() and (out / "checkpoint-10" / "trainer_state").is_dir()
    # finished and unchanged: not redone
    before = (out / "manifest.json").stat().st_mtime_ns
    ppo.train(cfg, grade=starts_with_space, progress=False)
    assert (out / "manifest.json").stat().st_mtime_ns == before


def _write_preset(tmp_path, **rl):
    settings = config.load("tiny").to_dict()
    settings.pop("preset")
    settings["rl"].update(rl)
    path = tmp_path / "preset" / "tiny.yaml"  # named like the preset, so it writes under runs/tiny
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(settings))
    return path


def test_resume_after_sigkill(sft_ready, tmp_path, monkeypatch):
    preset = _write_preset(tmp_path, num_updates=4, save_every=1, steps_per_update=4, max_new_tokens=16)
    cfg = config.load(preset)
    out = artifacts.rl_dir(cfg)
    command = [sys.executable, "-m", "paper_lib.ppo", "--preset", str(preset)]
    proc = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint-1").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-1").is_dir() and not (out / "manifest.json").exists(), "killed mid-run"
    first = (out / "checkpoint-1" / "model.safetensors").stat().st_mtime_ns

    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = done.stdout + done.stderr
    resumed = int(log.split("resuming from ")[1].split("checkpoint-")[1].split(" ")[0])
    assert resumed >= 1
    assert (out / "checkpoint-1" / "model.safetensors").stat().st_mtime_ns == first, "checkpoint-1 was not redone"
    assert sorted(ppo.checkpoints(cfg)) == [1, 2, 3, 4] and (out / "manifest.json").is_file()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    resumed_metrics = pd.read_csv(out / "metrics.csv")
    assert resumed_metrics["update"].tolist() == [1, 2, 3, 4]

    # the same run without the kill gives the same numbers: optimizer, RNG and open episodes came back
    shutil.rmtree(out)
    ppo.train(cfg, progress=False)
    straight = pd.read_csv(out / "metrics.csv")
    for column in ("mean_reward", "policy_loss", "value_loss", "approx_kl"):
        assert resumed_metrics[column].tolist() == pytest.approx(straight[column].tolist(), rel=1e-4, abs=1e-6)

    # a finished run with the same settings is not launched again
    monkeypatch.setattr(launch, "run_streamed", lambda *a, **k: pytest.fail("a finished run was relaunched"))
    assert ppo.run(cfg) == out


def test_grpo_smoke(sft_ready):
    cfg = config.load("tiny", rl__algo="grpo", rl__num_updates=2, rl__save_every=1, rl__max_new_tokens=8,
                      rl__steps_per_update=4)
    out = grpo.train_grpo(cfg, grade=starts_with_space)
    assert sorted(ppo.checkpoints(cfg)) == [1, 2]
    model, _ = models.load(cfg, checkpoint=out / "checkpoint-2")
    assert model.config.model_type == "qwen2"
    m = pd.read_csv(out / "metrics.csv")
    assert m["update"].tolist() == [1, 2] and m["mean_reward"].between(0, 1).all()
    assert math.isfinite(m["success_rate"].iloc[0])


def test_gradient_checkpointing_gives_the_same_update(sft_ready):
    """rl.gradient_checkpointing (on for the 7B/11B presets) trades compute for memory, not results."""
    rows = []
    for checkpointing in (False, True):
        cfg = config.load("tiny", rl__num_updates=1, rl__steps_per_update=4, rl__max_new_tokens=8,
                          rl__gradient_checkpointing=checkpointing)
        rows.append(pd.read_csv(ppo.train(cfg, force=True, progress=False) / "metrics.csv").iloc[0])
    for column in ("mean_reward", "policy_loss", "value_loss", "grad_norm", "approx_kl"):
        assert rows[1][column] == pytest.approx(rows[0][column], rel=1e-5, abs=1e-7), column


def test_samples_per_step_accumulates_across_epochs(sft_ready):
    """rl.samples_per_step = steps x epochs (upstream's 128 on Qwen): one optimizer step per update on the
    mean gradient of every pass, so two passes over 4 attempts step exactly as one pass does; the ratio
    stays 1 and nothing is clipped. The default steps once per epoch, which here moves further."""
    base = dict(rl__num_updates=1, rl__steps_per_update=4, rl__max_new_tokens=8, rl__learning_rate=1e-3,
                rl__min_learning_rate=1e-3)
    runs = {}
    for name, extra in {"one pass": dict(rl__ppo_epochs=1), "accumulated": dict(rl__ppo_epochs=2, rl__samples_per_step=8),
                        "per epoch": dict(rl__ppo_epochs=2)}.items():
        out = ppo.train(config.load("tiny", **base, **extra), force=True, micro_batch_size=2, progress=False)
        model, _ = models.load(config.load("tiny"), checkpoint=out / "checkpoint-1")
        runs[name] = ({k: v.clone() for k, v in model.state_dict().items()}, pd.read_csv(out / "metrics.csv").iloc[0])
    start, _ = models.load(config.load("tiny"), checkpoint=sft_ready)
    moved = lambda name: sum((runs[name][0][k] - v).norm() ** 2 for k, v in start.state_dict().items()) ** 0.5
    apart = sum((runs["accumulated"][0][k] - v).norm() ** 2 for k, v in runs["one pass"][0].items()) ** 0.5
    assert apart < 1e-3 * moved("one pass")  # float rounding of the sums, which Adam's first step magnifies
    assert runs["accumulated"][1]["clip_fraction"] == 0
    assert moved("per epoch") > 1.3 * moved("accumulated") > 0


def test_deepspeeds_nan_norm_sentinel_counts_as_a_non_finite_step(sft_ready, monkeypatch):
    """DeepSpeed reports a NaN/inf gradient norm as -1 (mask_nan_or_inf_with_val_inplace): that step is not
    finite either, so it is skipped and counted, and -1 stays out of the mean grad_norm."""
    from accelerate import Accelerator

    real, calls = Accelerator.clip_grad_norm_, []

    def sentinel_first(self, *args, **kwargs):
        norm = real(self, *args, **kwargs)
        calls.append(1)
        return torch.tensor(-1.0) if len(calls) == 1 else norm
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", sentinel_first)
    cfg = config.load("tiny", rl__num_updates=1, rl__steps_per_update=4, rl__max_new_tokens=8, rl__ppo_epochs=2,
                      rl__learning_rate=1e-3, rl__min_learning_rate=1e-3)
    row = pd.read_csv(ppo.train(cfg, force=True, micro_batch_size=4, progress=False) / "metrics.csv").iloc[0]
    assert len(calls) == 2 and row["nonfinite_steps"] == 1 and row["grad_norm"] > 0


def test_deepspeed_is_asked_to_skip_non_finite_bf16_steps_where_it_can(monkeypatch):
    import types

    def fake_deepspeed(fields):
        module = types.ModuleType("deepspeed.runtime.precision_config")
        module.DeepSpeedBF16Config = type("DeepSpeedBF16Config", (), {"model_fields": dict.fromkeys(fields)})
        monkeypatch.setitem(sys.modules, "deepspeed.runtime.precision_config", module)

    fake_deepspeed(["enabled", "immediate_grad_update", "check_grad_overflow"])
    ds_config = {"bf16": {"enabled": True}}
    assert ppo.skip_nonfinite_bf16_steps(ds_config) and ds_config["bf16"] == {"enabled": True, "check_grad_overflow": True}
    fake_deepspeed(["enabled", "immediate_grad_update"])  # an older DeepSpeed: the key would be refused
    ds_config = {"bf16": {"enabled": True}}
    assert not ppo.skip_nonfinite_bf16_steps(ds_config) and ds_config == {"bf16": {"enabled": True}}
    monkeypatch.setitem(sys.modules, "deepspeed.runtime.precision_config", None)  # none installed
    assert not ppo.skip_nonfinite_bf16_steps({})


def test_the_scheduled_rate_reaches_an_optimizer_with_groups_of_its_own():
    """zero2_offload: DeepSpeed steps a CPU Adam that, after a resume loads its state, no longer shares the
    scheduled Adam's parameter groups; apply_scheduled_lr hands it the schedule's rate anyway."""
    import types

    weight = torch.nn.Parameter(torch.ones(2))
    scheduled = torch.optim.Adam([weight], lr=1.0)
    stepping = torch.optim.Adam([weight], lr=1.0)  # its own group dicts, as after load_state_dict
    trainer = types.SimpleNamespace(optimizer=stepping,
                                    scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(scheduled, T_max=4, eta_min=0.0))
    trainer.scheduler.step()
    assert stepping.param_groups[0]["lr"] == 1.0  # what the rate would stay at
    ppo.PPOTrainer.apply_scheduled_lr(trainer)
    assert trainer.scheduler.get_last_lr()[0] < 1.0
    assert stepping.param_groups[0]["lr"] == pytest.approx(trainer.scheduler.get_last_lr()[0])


def test_a_non_finite_gradient_skips_its_step(sft_ready, monkeypatch):
    """A NaN in one step's loss would make every later weight NaN: the step is skipped and counted, and
    the next one trains."""
    real, calls = ppo.ppo_loss, []

    def nan_first(*args, **kwargs):
        policy, value, clipped = real(*args, **kwargs)
        calls.append(1)
        return (policy * float("nan"), value, clipped) if len(calls) == 1 else (policy, value, clipped)
    monkeypatch.setattr(ppo, "ppo_loss", nan_first)
    cfg = config.load("tiny", rl__num_updates=1, rl__steps_per_update=4, rl__max_new_tokens=8, rl__ppo_epochs=2,
                      rl__learning_rate=1e-3, rl__min_learning_rate=1e-3)
    out = ppo.train(cfg, force=True, micro_batch_size=4, progress=False)
    row = pd.read_csv(out / "metrics.csv").iloc[0]
    assert len(calls) == 2 and row["nonfinite_steps"] == 1 and math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
    trained, _ = models.load(cfg, checkpoint=out / "checkpoint-1")
    start, _ = models.load(cfg, checkpoint=sft_ready)
    assert all(torch.isfinite(v).all() for v in trained.state_dict().values())
    assert any(not torch.equal(v, start.state_dict()[k]) for k, v in trained.state_dict().items())


def test_the_thought_split_and_the_log_prob_dtype_reach_the_update(sft_ready, monkeypatch):
    """rl.thought_split and rl.scored_tokens pick each attempt's weights; rl.logprob_dtype the sums whose
    ratio PPO clips."""
    splits, dtypes = [], []
    real_weights, real_logp = actor_critic.thought_weights, ppo.sequence_logp
    monkeypatch.setattr(actor_critic, "thought_weights", lambda tok, ids, coef, split, scored: splits.append(
        (split, scored)) or real_weights(tok, ids, coef, split, scored))
    monkeypatch.setattr(ppo, "sequence_logp", lambda tok, w, dtype: dtypes.append(dtype) or real_logp(tok, w, dtype))
    cfg = config.load("tiny", rl__num_updates=1, rl__steps_per_update=4, rl__max_new_tokens=8,
                      rl__thought_split="last_tokens", rl__logprob_dtype="bfloat16", rl__scored_tokens="upstream")
    out = ppo.train(cfg, force=True, micro_batch_size=4, progress=False)
    assert set(splits) == {("last_tokens", "upstream")} and len(splits) == 4 and set(dtypes) == {"bfloat16"}
    assert math.isfinite(pd.read_csv(out / "metrics.csv").iloc[0]["policy_loss"])


def test_env_slots_sets_the_episodes_played_in_lockstep(sft_ready, monkeypatch):
    """rl.env_slots 1 plays one slot for every round, as upstream; 0 batches ppo.default_envs slots."""
    played = []

    class Recording(actor_critic.Rollouts):
        def __init__(self, envs, *args, **kwargs):
            played.append(envs)
            super().__init__(envs, *args, **kwargs)
    monkeypatch.setattr(ppo, "Rollouts", Recording)
    small = dict(rl__num_updates=1, rl__steps_per_update=10, rl__max_new_tokens=8)  # default: 2 slots x 5
    for slots in (1, 0):
        ppo.train(config.load("tiny", rl__env_slots=slots, **small), force=True, micro_batch_size=5, progress=False)
    assert played == [1, 2] == [1, ppo.default_envs(config.load("tiny", **small))]
    init = ppo.init_checkpoint(config.load("tiny", **small))  # 0 and the count it stands for are one run
    explicit = config.load("tiny", rl__env_slots=2, **small)
    assert ppo.run_spec(config.load("tiny", **small), init) == ppo.run_spec(explicit, init)
    with pytest.raises(ValueError, match="rl.env_slots=3 must divide rl.steps_per_update=10"):
        ppo.train(config.load("tiny", rl__env_slots=3, **small), force=True, progress=False)


def test_samples_per_step_must_tile_the_update(sft_ready):
    cfg = config.load("tiny", rl__num_updates=1, rl__steps_per_update=4, rl__samples_per_step=3)
    with pytest.raises(ValueError, match="rl.samples_per_step=3 must be a multiple of the micro-batch"):
        ppo.train(cfg, force=True, micro_batch_size=2, progress=False)


@pytest.mark.parametrize("sampling", ["temperature", "model"])
def test_rollouts_sample_as_configured(sft_ready, sampling):
    """rl.sampling "model" adds the start checkpoint's top_p and top_k at rl.temperature, as upstream's
    generate(temperature=0.2) inherited them; "temperature" samples at T alone."""
    from transformers import GenerationConfig
    gen = GenerationConfig.from_pretrained(sft_ready)
    gen.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=20)
    gen.save_pretrained(sft_ready)
    cfg = config.load("tiny", rl__sampling=sampling, rl__repetition_penalty=1.05)
    trainer = ppo.PPOTrainer(cfg, sft_ready, starts_with_space, envs=2, micro=2)
    expected = {"top_p": 0.8, "top_k": 20} if sampling == "model" else {"top_p": 1.0, "top_k": 0}
    assert trainer.generator.sampling == {"do_sample": True, "temperature": 0.2, "repetition_penalty": 1.05, **expected}


def test_model_sampling_fills_what_a_checkpoint_leaves_out_as_upstreams_transformers_did():
    """Llama-3.2-Vision's generation_config names T and top_p only; transformers 4.x, which upstream ran,
    then sampled with top_k 50."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from paper_lib.rollout import model_sampling
    llama = SimpleNamespace(generation_config=GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9))
    assert model_sampling(llama) == {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 50}
    bare = SimpleNamespace(generation_config=GenerationConfig())
    assert model_sampling(bare) == {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 50}


def test_metrics_row_turns_the_sums_of_every_process_into_ratios():
    sums = {"reward": -6.0, "steps": 8, "episodes": 2, "successes": 1, "episode_reward": 4.0,
            "episode_attempts": 6, "policy_loss": 0.8, "value_loss": 4.0, "clipped": 2, "samples": 8,
            "kl_ref": 0.4, "entropy": 3.0, "entropy_tokens": 30, "drift": 0.2, "drift_tokens": 40,
            "grad_norm": 1.0, "normed_steps": 4, "nonfinite_steps": 2, "response_tokens": 80,
            "rollout_seconds": 4.0}
    row = ppo.metrics_row(sums, processes=2, number=3, lr=1e-6, seconds=5.0, with_kl_ref=True)
    assert (row["update"], row["attempts"], row["episodes"]) == (3, 8, 2)
    assert row["mean_reward"] == -0.75 and row["success_rate"] == 0.5 and row["attempts_per_episode"] == 3
    assert row["clip_fraction"] == 0.25 and row["entropy"] == 0.1 and row["approx_kl"] == 0.005
    assert row["grad_norm"] == 0.25 and row["nonfinite_steps"] == 1
    assert row["rollout_seconds"] == 2.0 and row["rollout_tokens_per_s"] == 40.0
    assert row["kl_ref"] == 0.05
    assert math.isnan(ppo.metrics_row({**sums, "episodes": 0}, 2, 3, 1e-6, 5.0, False)["success_rate"])
    assert "kl_ref" not in ppo.metrics_row(sums, 2, 3, 1e-6, 5.0, False)


def test_a_max_grad_norm_of_0_clips_nothing(sft_ready):
    """rl.max_grad_norm 0 means no clipping, as DeepSpeed's gradient_clipping 0 does (one reading of the
    authors' unpublished config), not a gradient scaled to 0: the update equals one with a bound never reached."""
    trained = {}
    for bound in (0.0, 1e9):
        cfg = config.load("tiny", rl__num_updates=1, rl__steps_per_update=4, rl__max_new_tokens=8,
                          rl__max_grad_norm=bound, rl__learning_rate=1e-3, rl__min_learning_rate=1e-3)
        out = ppo.train(cfg, force=True, micro_batch_size=4, progress=False)
        model, _ = models.load(cfg, checkpoint=out / "checkpoint-1")
        trained[bound] = ({k: v.clone() for k, v in model.state_dict().items()}, pd.read_csv(out / "metrics.csv").iloc[0])
    start, _ = models.load(config.load("tiny"), checkpoint=sft_ready)
    moved = sum((trained[0.0][0][k] - v).norm() ** 2 for k, v in start.state_dict().items()) ** 0.5
    apart = sum((trained[0.0][0][k] - v).norm() ** 2 for k, v in trained[1e9][0].items()) ** 0.5
    assert moved > 0 and apart <= 1e-6 * moved
    assert trained[0.0][1]["grad_norm"] == pytest.approx(trained[1e9][1]["grad_norm"]) and trained[0.0][1]["grad_norm"] > 0
