"""The public code's update schedules, selections and advantages (issue 12), and the method presets."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from g2rpo.advantage import batch_std, integrate_advantages
from g2rpo.config import ConfigError, load_config
from g2rpo.rollout import make_strategy
from g2rpo.train import Trainer
from g2rpo.train.update import optimizer_steps

from test_train import run, tiny

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "methods").glob("*.yaml"))
LAB = ROOT / "configs" / "lab.yaml"


def test_every_method_has_a_paper_and_an_official_preset_whose_values_cite_a_source():
    names = {p.stem for p in PRESETS}
    for method in ("g2rpo", "g2rpo_no_mgai", "dance_grpo", "flow_grpo", "mix_grpo"):
        assert {f"{method}-paper", f"{method}-official"} <= names
    for p in PRESETS:
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if re.match(r"^\s+\w+:\s*\S", line):
                assert "#" in line, f"{p.name}:{n} has no source comment: {line}"
        top = {line.split(":")[0] for line in p.read_text().splitlines() if re.match(r"^\w+:", line)}
        if p.stem.endswith("-paper"):  # the paper's presets: method keys only
            assert top <= {"sampler", "loss", "optim", "advantage"}, (p.name, top)
        else:  # the official presets also carry their codebase's run setting (never a model or a file)
            assert top <= {"sampler", "loss", "optim", "advantage", "model", "lora", "rewards", "data", "iterations",
                           "seed", "sampler_seed", "ema_decay", "ema_every", "ema_schedule", "ema_repeats"}, (p.name, top)
        assert "kind:" not in p.read_text() and "path:" not in p.read_text()  # never a model or a file


# preset -> optimizer steps per iteration at the smoke-test scale below (2 prompts x group 4)
STEPS = {"g2rpo-official": 8, "g2rpo_no_mgai-official": 8, "dance_grpo-official": 3, "flow_grpo-official": 2,
         "flow_grpo_sd3-official": 2, "mix_grpo-official": 4}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_runs_two_lab_iterations(lab_world, tmp_path, preset):
    from g2rpo.config import merge_dicts
    from g2rpo.experiments.compare import LAB_WORLD

    scale = {"model": {"path": str(lab_world)}, "sampler": {"group_size": 4, "max_batch": 256},
             "data": {"prompts_per_iteration": 2}, "iterations": 2, "checkpoint_every": 0, "export_final": False,
             "output_dir": str(tmp_path), "progress": False, "tensorboard": False, "optim": {"lr": 1e-4}}
    cfg = load_config([LAB, preset], merge_dicts(LAB_WORLD, scale))
    hist = Trainer(cfg, log=lambda *a, **k: None).run()
    assert len(hist) == 2
    for m in hist:
        assert m["optimizer_steps"] == STEPS.get(preset.stem, 1)
        assert m["ratio_first_max_dev"] < 1e-6 and np.isfinite(m["loss"])
    if preset.stem.startswith("g2rpo-official"):
        assert {k for k in hist[0] if k.startswith("reward/digit_alignment/")} == {
            "reward/digit_alignment/lambda1", "reward/digit_alignment/lambda2"}  # Lambda {1, 2}


def test_per_sde_step_clip_acts_after_the_first_slot(lab_world, tmp_path):
    """One optimizer step per trained slot, ratios against the rollout's log-probs: the first slot's
    ratio is 1, later slots' are not, and the clip binds."""
    _, hist = run(tiny(lab_world, tmp_path, iterations=2, **{"optim.update_schedule": "per_sde_step",
                                                             "sampler.sde_indices": [0, 2, 4], "optim.lr": 3e-3}))
    for m in hist:
        assert m["optimizer_steps"] == 3
        assert m["ratio_first_max_dev"] < 1e-6
        assert m["ratio_last_step_max_dev"] > 1e-4
        assert m["clip_frac"] > 0
    _, base = run(tiny(lab_world, tmp_path / "b", iterations=1, **{"sampler.sde_indices": [0, 2, 4],
                                                                   "optim.lr": 3e-3}))
    assert base[0]["optimizer_steps"] == 1 and base[0]["clip_frac"] == 0 and base[0]["ratio_last_step_max_dev"] < 1e-6
    with pytest.raises(ConfigError, match="minibatches must be 1"):
        load_config(None, {"optim": {"update_schedule": "per_sde_step"}, "minibatches": 2})


def test_sample_minibatches_split_the_samples_into_optimizer_steps(lab_world, tmp_path):
    _, hist = run(tiny(lab_world, tmp_path, iterations=1, **{"optim.sample_minibatches": 3}))
    m = hist[0]
    assert m["optimizer_steps"] == 3
    assert m["ratio_first_max_dev"] < 1e-6 and m["ratio_last_step_max_dev"] > 1e-6  # later steps see an updated policy
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    steps = optimizer_steps(mask, "per_iteration", 1, 3, 1)
    assert [int(s.sum()) for s in steps] == [12, 6, 6]  # every prompt's 4 branches in parts [0, 1], [2], [3]
    assert [s[0, 0].nonzero().flatten().tolist() for s in steps] == [[0, 1], [2], [3]]
    assert torch.equal(sum(s.int() for s in steps), mask.int())
    per_slot = optimizer_steps(mask, "per_sde_step", 1, 2, 1)
    assert len(per_slot) == 6 and all(int(s.sum()) == 4 for s in per_slot)


def test_dance_grpo_official_selection_per_sample_without_the_last_step():
    s = make_strategy("dance_grpo", train_fraction=0.6, train_selection="per_sample", train_last_step=False)
    mask = s.train_mask(s.plan(0), 3, torch.Generator().manual_seed(0))  # [P, K=16, G=12]
    per_sample = mask.sum(dim=1)
    assert (per_sample == 9).all()  # int(0.6 * 15)
    assert not mask[:, 15].any()  # the last step never
    patterns = {tuple(mask[p, :, g].tolist()) for p in range(3) for g in range(12)}
    assert len(patterns) > 10  # each sample its own subset
    shared = make_strategy("dance_grpo").train_mask(s.plan(0), 3, torch.Generator().manual_seed(0))
    assert len({tuple(shared[p, :, g].tolist()) for p in range(3) for g in range(12)}) == 1
    first = make_strategy("flow_grpo", train_fraction=0.99, train_selection="first")
    fm = first.train_mask(first.plan(0), 1, None)
    assert fm[0, :15].all() and not fm[0, 15].any()  # int(0.99 * 16) = 15, the first ones


def test_dance_per_sample_training_forwards_only_the_trained_states(lab_world, tmp_path):
    _, hist = run(tiny(lab_world, tmp_path, iterations=1, **{
        "sampler.strategy": "dance_grpo", "sampler.eta": None, "sampler.train_selection": "per_sample",
        "sampler.train_last_step": False, "sampler.train_fraction": 0.5, "loss.recompute_old_logprob": True}))
    # 4 prompts x 3 samples x int(0.5 * 7) = 3 trained steps each: one forward per (sample, step) from step 1
    # on; step 0 leaves from the shared initial noise (one row per prompt for all its samples)
    assert 4 * 3 * 2 <= hist[0]["recompute_forward_rows"] <= 4 * 3 * 3


def test_mix_grpo_official_window_ends_at_t_minus_2_and_rolls_back():
    s = make_strategy("mix_grpo", window_size=4, shift_interval=1, window_end=-2, window_roll_back=True)
    starts = [s.sde_steps(i) for i in range(17)]
    assert starts[0] == [0, 1, 2, 3] and starts[11] == [11, 12, 13]  # clipped at T - 2 = 14
    assert starts[13] == [13] and starts[14] == [] and starts[15] == [0, 1, 2, 3]  # roll back past T - 2
    clip = make_strategy("mix_grpo", window_size=4, shift_interval=1, window_end=14)
    assert clip.sde_steps(40) == []  # no roll back: the start stays at T - 2
    assert make_strategy("mix_grpo", window_size=4, shift_interval=1).sde_steps(40) == [8, 9, 10, 11]  # T // 2


def test_an_empty_mix_window_trains_nothing_and_does_not_crash(lab_world, tmp_path):
    _, hist = run(tiny(lab_world, tmp_path, iterations=2, **{
        "sampler.strategy": "mix_grpo", "sampler.window_size": 4, "sampler.window_end": 6,
        "sampler.window_stride": 6, "sampler.shift_interval": 1, "sampler.window_roll_back": True}))
    assert hist[0]["trained_steps"] == 4 and hist[1]["trained_steps"] == 0 and hist[1]["optimizer_steps"] == 0


def test_batch_std_is_flow_grpo_global_std_and_reduces_over_ranks():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(1, 6, 1, 1, 5, generator=g)  # [R, P, K, J, G]
    adv = integrate_advantages(r, eps=1e-4, unbiased=False, std=batch_std(r, unbiased=False))
    x = r[0, :, 0, 0].double().numpy()
    expected = (x - x.mean(axis=1, keepdims=True)) / (np.std(x) + 1e-4)  # stat_tracking.py, global_std=True
    assert np.allclose(adv[:, 0].numpy(), expected, atol=1e-6)
    halves = (r[:, :3], r[:, 3:])

    def fake_all_reduce(stats):  # what torch.distributed.all_reduce does with a second rank holding halves[1]
        p = halves[1].double()
        stats += torch.stack([p.sum(dim=(1, 4)), (p * p).sum(dim=(1, 4)),
                              torch.full_like(p[:, 0, :, :, 0], p.shape[1] * p.shape[4])])

    assert torch.allclose(batch_std(halves[0], all_reduce=fake_all_reduce), batch_std(r), atol=1e-12)


def test_trainer_uses_the_configured_advantage(lab_world, tmp_path):
    cfg = load_config(None, tiny(lab_world, tmp_path, iterations=1, **{
        "advantage.std": "batch", "advantage.unbiased": False, "advantage.eps": 1e-4}))
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    seen = {}
    real_score, real_train = trainer.score_rewards, trainer.train_on
    trainer.score_rewards = lambda *a, **k: seen.setdefault("rewards", real_score(*a, **k))
    trainer.train_on = lambda ro, adv, *a, **k: seen.setdefault("adv", adv) is not None and real_train(ro, adv, *a, **k)
    trainer.run()
    r = seen["rewards"].double()  # [R, P, K, J, G]
    expected = ((r - r.mean(-1, keepdim=True)) / (r.std(dim=(1, 4), correction=0, keepdim=True) + 1e-4)).sum((0, 3))
    assert torch.allclose(seen["adv"].double(), expected, atol=1e-5)


def test_flow_grpo_kl_convention_divides_by_sigma_t_squared(lab_world, tmp_path):
    """Flow-GRPO's KL is the transition KL times |dt| (2 sigma_t^2 instead of 2 sigma_t^2 |dt|)."""
    kls = {}
    for conv in ("transition", "flow_grpo"):
        _, hist = run(tiny(lab_world, tmp_path / conv, iterations=1, inner_epochs=2, **{
            "loss.kl_beta": 0.04, "loss.kl_convention": conv, "sampler.sde_indices": [2]}))
        kls[conv] = hist[0]["kl"]
    from g2rpo.schedule import sigma_schedule

    s = sigma_schedule(8)
    assert kls["transition"] > 0
    assert kls["flow_grpo"] == pytest.approx(kls["transition"] * float(s[2] - s[3]), rel=1e-4)


@pytest.mark.slow
def test_two_ranks_with_per_sample_subsets_and_sample_minibatches(lab_world, tmp_path):
    """The mask and the optimizer steps are drawn for the global batch and sliced: 2 FSDP ranks make the
    same forwards (a rank with nothing to train in a unit still runs it) and, with one sample minibatch,
    train exactly as 1 rank does, with 1 sample minibatch or 3."""
    from test_train import _cli, _flat, _metrics, _run_main

    extra = {"sampler.strategy": "dance_grpo", "sampler.eta": None, "sampler.train_selection": "per_sample",
             "sampler.train_last_step": False, "sampler.train_fraction": 0.5}
    one, two, three = tmp_path / "one", tmp_path / "two", tmp_path / "three"
    r1 = _run_main(_flat(tiny(lab_world, one, iterations=2, checkpoint_every=0, **extra)))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _cli(_flat(tiny(lab_world, two, iterations=2, checkpoint_every=0, **extra)), torchrun=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    for x, y in zip(_metrics(one), _metrics(two)):
        assert x["forward_rows"] == y["forward_rows"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert x["reward/digit_alignment"] == pytest.approx(y["reward/digit_alignment"], rel=1e-5)
    # with 3 sample minibatches too: the split is per prompt, not per rank, so 2 ranks train as 1 (issue 22)
    four = tmp_path / "four"
    r3 = _cli(_flat(tiny(lab_world, three, iterations=2, checkpoint_every=0, **extra,
                         **{"optim.sample_minibatches": 3})), torchrun=2)
    assert r3.returncode == 0, r3.stderr[-3000:]
    r4 = _run_main(_flat(tiny(lab_world, four, iterations=2, checkpoint_every=0, **extra,
                         **{"optim.sample_minibatches": 3})))
    assert r4.returncode == 0, r4.stderr[-3000:]
    for x, y in zip(_metrics(four), _metrics(three)):
        assert x["optimizer_steps"] == y["optimizer_steps"] == 3
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-7)
    steps = optimizer_steps(torch.ones(4, 2, 3, dtype=torch.bool), "per_iteration", 1, 3, 1)
    assert [s[:, 0].flatten().nonzero().flatten().tolist() for s in steps] == [[0, 3, 6, 9], [1, 4, 7, 10],
                                                                               [2, 5, 8, 11]]


def test_dance_grpo_scores_the_last_steps_x0_prediction():
    """DanceGRPO's run_sample_step scores pred_original = x - sigma v of its last flux_step (the last step's noise
    never reaches the reward); Flow-GRPO scores its last sample. Same forwards either way."""
    from g2rpo import G2RPOSampler
    from g2rpo.testing import GaussianWorld

    world = GaussianWorld()
    noise = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0))
    runs = {}
    for name, opts in (("dance", {}), ("dance_sample", {"score_x0": False}), ("flow", {"shared_noise": True})):
        strategy = "flow_grpo" if name == "flow" else "dance_grpo"
        sampler = G2RPOSampler(world, num_steps=6, group_size=3, strategy=strategy, max_batch=64, **opts)
        runs[name] = sampler.rollout(noise, None, generator=torch.Generator().manual_seed(1))
    ro = runs["dance"]
    last = ro.x_k.shape[1] and int(ro.step_index[-1])
    assert last == 5
    x = ro.x_k[torch.arange(2)[:, None], ro.source_of[-1][None, :]]  # [P, G, ...] the states before the last step
    sigma = ro.sigmas[last].float()
    v = world(x.reshape(6, 4, 4), sigma.expand(6)).reshape(x.shape)
    x0 = x - sigma * v
    assert torch.allclose(ro.finals[:, 0, 0], x0, atol=1e-6)
    assert (ro.finals[:, 0, 0] - ro.x_next[:, -1]).abs().max() > 1e-3  # not the noisy last sample
    assert torch.equal(runs["dance_sample"].finals[:, 0, 0], runs["dance_sample"].x_next[:, -1])
    assert torch.equal(runs["flow"].finals[:, 0, 0], runs["flow"].x_next[:, -1])
    assert ro.forward_rows == runs["dance_sample"].forward_rows
    assert torch.equal(ro.log_probs, runs["dance_sample"].log_probs)  # the transitions are unchanged


def test_initial_noise_drawn_in_bf16_as_the_public_flux_code(lab_world, tmp_path):
    """sampler.noise_dtype: bfloat16 draws torch.randn(..., dtype=torch.bfloat16) from the same generator (other
    values than an fp32 draw), as G2RPO, DanceGRPO and MixGRPO draw their initial noise; set in their presets."""
    from g2rpo.train import Trainer

    cfg = load_config(None, tiny(lab_world, tmp_path, iterations=1, **{"sampler.noise_dtype": "bfloat16"}))
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    noise, _ = trainer._noise(0, [3])
    from g2rpo.train.setup import seed_of

    g = torch.Generator().manual_seed(seed_of(cfg.sampler_seed, 0, 3, 0))
    expected = torch.randn(noise.shape[1:], generator=g, dtype=torch.bfloat16).float()
    assert torch.equal(noise[0], expected)
    g = torch.Generator().manual_seed(seed_of(cfg.sampler_seed, 0, 3, 0))
    assert not torch.equal(noise[0], torch.randn(noise.shape[1:], generator=g))
    trainer.close()
    for preset in ("g2rpo-official", "dance_grpo-official", "mix_grpo-official"):
        assert load_config([LAB, ROOT / "configs" / "methods" / f"{preset}.yaml"]).sampler.noise_dtype == "bfloat16"


def test_fp32_schedule_as_the_public_code():
    """sampler.schedule_precision: float32 = sd3_time_shift(shift, torch.linspace(1, 0, T + 1)) in fp32, bit for bit;
    at T = 20 one quantised timestep moves (874 vs 875), at T = 10 four sigmas differ."""
    from g2rpo import G2RPOSampler
    from g2rpo.schedule import model_timesteps, sigma_schedule
    from g2rpo.testing import GaussianWorld

    for T in (10, 20, 25):
        s = torch.linspace(1, 0, T + 1)
        public = 3.0 * s / (1 + 2.0 * s)
        ours = G2RPOSampler(GaussianWorld(), num_steps=T, strategy="flow_grpo", schedule_precision="float32").sigmas
        assert torch.equal(ours.float(), public)
    q64 = model_timesteps(sigma_schedule(20).float(), True) * 1000
    q32 = model_timesteps(sigma_schedule(20, precision="float32").float(), True) * 1000
    assert sorted({round(float(a)), round(float(b))} for a, b in zip(q64, q32) if a != b) == [{874, 875}]
    assert int((sigma_schedule(10).float() != sigma_schedule(10, precision="float32").float()).sum()) == 4


def test_dynamic_shift_equals_flux_pipelines_own_sigmas():
    """sampler.dynamic_shift: the shift FluxPipeline uses for this image size (mu from the sequence length):
    our schedule equals the pipeline scheduler's sigmas after set_timesteps(sigmas=linspace(1, 1/T, T), mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from g2rpo.pipelines import policy_for
    from g2rpo.schedule import sigma_schedule
    from g2rpo.testing.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                     base_image_seq_len=256, max_image_seq_len=4096)
    policy = policy_for(pipe, 64, 64)
    shift = policy.dynamic_shift()
    mu = calculate_shift(policy.image_seq_len, 256, 4096, 0.5, 1.15)
    T = 6
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / T, T), mu=mu)
    assert torch.allclose(sigma_schedule(T, shift).float(), pipe.scheduler.sigmas.float(), atol=1e-6)
    assert abs(shift - 3.0) > 0.5  # not the static shift
    policy._pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    with pytest.raises(ValueError, match="does not shift dynamically"):
        policy.dynamic_shift()


def test_shuffled_sample_minibatches():
    mask = torch.ones(4, 1, 3, dtype=torch.bool)
    plain = optimizer_steps(mask, "per_iteration", 1, 2, 1)
    shuffled = optimizer_steps(mask, "per_iteration", 1, 2, 1, torch.Generator().manual_seed(0), shuffle_samples=True)
    again = optimizer_steps(mask, "per_iteration", 1, 2, 1, torch.Generator().manual_seed(0), shuffle_samples=True)
    assert len(plain) == len(shuffled) == 2 and all(torch.equal(a, b) for a, b in zip(shuffled, again))
    assert not torch.equal(plain[0], shuffled[0])  # not the contiguous prompt-major chunks
    assert torch.equal(shuffled[0] | shuffled[1], mask) and not (shuffled[0] & shuffled[1]).any()


def test_zero_advantage_samples_leave_the_loss(lab_world, tmp_path):
    """loss.skip_zero_advantage: a prompt whose group rewards are all equal (zero advantages) trains nothing."""
    from g2rpo.train import Trainer

    cfg = load_config(None, tiny(lab_world, tmp_path, iterations=1, **{"loss.skip_zero_advantage": True}))
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    positions, prompts = trainer.local_prompts(0)
    cond = trainer.policy.encode_prompts(prompts)
    noise, gens = trainer._noise(0, positions)
    with torch.no_grad():
        rollout = trainer.sampler.rollout(noise, cond, generator=gens)
    adv = torch.randn(rollout.log_probs.shape)
    adv[1] = 0.0  # prompt 1: zero advantage everywhere
    seen = {}
    real = trainer.update.step

    def spy(rollout_, adv_, cond_, it, prompts_, global_mask, generator):
        seen["mask"] = global_mask.clone()
        return real(rollout_, adv_, cond_, it, prompts_, global_mask, generator)

    trainer.update.step = spy
    trainer.train_on(rollout, adv, cond, 0, prompts)
    assert not seen["mask"][1].any() and seen["mask"][0].any()
    trainer.cfg.loss.skip_zero_advantage = False
    trainer.train_on(rollout, adv, cond, 0, prompts)
    assert seen["mask"][1].any()
    trainer.close()


def test_ema_every_and_flow_grpos_warm_up():
    from g2rpo.config import TrainConfig
    from g2rpo.train.setup import ema_decay_at

    cfg = TrainConfig(ema_decay=0.9, ema_every=8, ema_schedule="flow_grpo")
    decays = [ema_decay_at(cfg, s) for s in range(1, 33)]
    # EMAModuleWrapper.step(params, global_step) updates when (global_step + 1) % 8 == 0: after 7, 15, ... steps
    assert [s for s, d in enumerate(decays, 1) if d is not None] == [7, 15, 23, 31]
    assert decays[6] == pytest.approx(8 / 17) and decays[14] == pytest.approx(16 / 25)
    assert decays[30] == pytest.approx(32 / 41)
    assert ema_decay_at(TrainConfig(ema_decay=0.9, ema_schedule="flow_grpo"), 200) == pytest.approx(0.9)  # capped
    assert [ema_decay_at(TrainConfig(ema_decay=0.5), s) for s in (1, 2)] == [0.5, 0.5]


def test_cfg_detach_uncond_stops_the_gradient_through_the_negative_branch():
    from g2rpo.models.registry import settings, family
    from g2rpo.models.sd3 import SD3Policy
    from g2rpo.testing.tiny import tiny_sd3_pipeline

    grads = []
    for detach in (False, True):
        policy = SD3Policy(tiny_sd3_pipeline(seed=0), **settings(family("sd3"), height=32, width=32, guidance_scale=4.5))
        policy.detach_uncond = detach
        cond = policy.encode_prompts(["a red cube"])
        x = policy.prepare_latents(1, torch.Generator().manual_seed(0))
        v = policy(x, torch.tensor([0.7]), cond)
        v.sum().backward()
        grads.append(next(p for p in policy.transformer.parameters() if p.grad is not None).grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_official_presets_use_the_public_codes_fp32_schedule():
    for preset in ("g2rpo-official", "g2rpo_no_mgai-official", "dance_grpo-official", "mix_grpo-official"):
        assert load_config([LAB, ROOT / "configs" / "methods" / f"{preset}.yaml"]).sampler.schedule_precision == \
            "float32"
