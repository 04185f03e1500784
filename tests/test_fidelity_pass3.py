"""The third fidelity pass (issue 29): the pipelines' own schedules, MixGRPO's reward weights, DanceGRPO's last
step, one home for the strategies' defaults, Flow-GRPO's EMA, noise dtypes, PickScore's scale, cost accounting."""

from pathlib import Path

import numpy as np
import pytest
import torch

from g2rpo.advantage import reward_weights
from g2rpo.config import ConfigError, load_config, merge_dicts
from g2rpo.train import Trainer

from test_train import tiny

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "configs" / "lab.yaml"
METHODS = ROOT / "configs" / "methods"


def test_mix_grpo_official_normalises_the_reward_weights(lab_world, tmp_path):
    """train_grpo_flux.py divides reward_weights by their sum before it sums the weighted advantages: with two
    rewards at weight 1 the advantage is half the unnormalised sum (Eq. 11 as G2RPO's code sums it)."""
    assert load_config([LAB, METHODS / "mix_grpo-official.yaml"]).advantage.normalize_weights
    assert not load_config([LAB, METHODS / "g2rpo-official.yaml"]).advantage.normalize_weights
    assert reward_weights([1.0, 1.0, 1.0], normalize=True) == pytest.approx([1 / 3] * 3)
    assert reward_weights([2.0, 1.0]) == [2.0, 1.0]
    advs = {}
    for norm in (False, True):
        cfg = load_config(None, tiny(lab_world, tmp_path / str(norm), iterations=1, **{
            "advantage.normalize_weights": norm,
            "rewards": [{"name": "digit_alignment", "weight": 1.0}, {"name": "digit_realism", "weight": 3.0}]}))
        trainer = Trainer(cfg, log=lambda *a, **k: None)
        real_train = trainer.train_on
        trainer.train_on = lambda ro, adv, *a, _n=norm, **k: advs.setdefault(_n, adv) is not None and \
            real_train(ro, adv, *a, **k)
        trainer.run()
    assert advs[False].abs().max() > 0
    assert torch.allclose(advs[True], advs[False] / 4, atol=1e-6)
    with pytest.raises(ConfigError, match="advantage.normalize_weights"):
        load_config(None, tiny(lab_world, tmp_path / "zero", **{
            "advantage.normalize_weights": True, "rewards": [{"name": "digit_alignment", "weight": 0.0}]}))


def test_dance_grpo_never_trains_the_last_step_whose_noise_never_reaches_the_x0_scored_image():
    from g2rpo.rollout import make_strategy
    from g2rpo.rollout.configured import strategy_from_config

    for preset in ("dance_grpo-paper", "dance_grpo-official"):
        cfg = load_config([LAB, METHODS / f"{preset}.yaml"])
        s = strategy_from_config(cfg.sampler)
        assert s.score_x0 and s.train_last_step is False, preset
        g = torch.Generator().manual_seed(0)
        plan = s.plan(0)
        trained = torch.stack([s.train_mask(plan, 2, g) for _ in range(32)]).any(0).any(0).any(-1)  # [K]
        assert not trained[plan.step_index.tolist().index(s.num_steps - 1)], preset
        assert int(s.train_mask(plan, 1, g)[0, :, 0].sum()) == int(0.6 * (s.num_steps - 1))  # 9 of the first 15
    assert make_strategy("dance_grpo").train_last_step is False  # the default follows score_x0
    assert make_strategy("dance_grpo", score_x0=False).train_last_step is True
    assert make_strategy("flow_grpo").train_last_step is True
    with pytest.raises(ValueError, match="zero-mean noise"):
        make_strategy("dance_grpo", train_last_step=True)


STRATEGY_NAMES = ("g2rpo", "g2rpo_no_mgai", "dance_grpo", "flow_grpo", "mix_grpo")


def _defaults(s) -> tuple:
    return (s.eta, getattr(s, "sde_indices", None), getattr(s, "granularities", None))


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_each_strategy_default_lives_in_the_strategy(name):
    """G2RPOSampler, pipelines.rollout and the config all leave eta, M and Lambda to the strategy's dataclass
    (G2RPOSampler gave DanceGRPO eta 0.7 against make_strategy's 0.3); the compare tool's paper presets agree."""
    from g2rpo.experiments.compare import preset_path
    from g2rpo.pipelines import rollout
    from g2rpo.rollout import G2RPOSampler, make_strategy
    from g2rpo.rollout.configured import sampler_strategy_options, strategy_from_config
    from g2rpo.testing.tiny import tiny_flux_pipeline

    own = make_strategy(name, num_steps=16, group_size=2)
    assert _defaults(G2RPOSampler(lambda x, s, c: x, num_steps=16, group_size=2, strategy=name).strategy) == \
        _defaults(own)
    out = rollout(tiny_flux_pipeline(), ["a red cube"], name, num_steps=16, group_size=2, decode=False, height=32,
                  width=32)
    assert _defaults(out.sampler.strategy) == _defaults(own)
    cfg = load_config(None, {"sampler": {"strategy": name, "sde_indices": None, "granularities": None,
                                         "num_steps": 16, "group_size": 2}})
    assert _defaults(strategy_from_config(cfg.sampler)) == _defaults(own)
    from g2rpo.experiments.compare import LAB_WORLD

    for family in ("paper", "official"):  # what the compare tool trains: the presets name the default or a source
        preset = sampler_strategy_options(load_config([LAB, preset_path(name, family)], LAB_WORLD).sampler)
        if family == "paper":
            assert preset["eta"] == own.eta
    with pytest.raises(ValueError, match="built strategy"):
        G2RPOSampler(lambda x, s, c: x, strategy=own, eta=0.5)


def test_a_familys_default_schedule_is_its_pipelines_own(tmp_path):
    """Flux, SD3, Qwen-Image and FLUX.2 sample on the sigmas their pipeline's default call uses (sampler.schedule
    null); a method preset keeps its public code's static shift (schedule: shift); the drop-in rollout too."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from g2rpo.pipelines import rollout
    from g2rpo.schedule import sigma_schedule
    from g2rpo.testing.tiny import tiny_flux_pipeline, tiny_sd3_pipeline, with_hub_scheduler

    flux = with_hub_scheduler(tiny_flux_pipeline())
    own = rollout(flux, ["a red cube"], "g2rpo", num_steps=16, group_size=2, decode=False, height=32, width=32,
                  sde_indices=[0], granularities=[1])
    flux.scheduler.set_timesteps(sigmas=list(np.linspace(1.0, 1 / 16, 16)), mu=calculate_shift(64))  # FluxPipeline's
    assert torch.allclose(own.rollout.sigmas.float(), flux.scheduler.sigmas)
    assert not torch.allclose(own.rollout.sigmas, sigma_schedule(16, 3.0))  # 64 tokens: shift exp(mu) ~ 1.7, not 3
    static = rollout(flux, ["a red cube"], "g2rpo", num_steps=16, group_size=2, decode=False, height=32, width=32,
                     sde_indices=[0], granularities=[1], shift=3.0)
    assert torch.equal(static.rollout.sigmas, sigma_schedule(16, 3.0))
    sd3 = with_hub_scheduler(tiny_sd3_pipeline())
    out = rollout(sd3, ["a red cube"], "flow_grpo", num_steps=10, group_size=2, decode=False, height=32, width=32)
    # Flow-GRPO's SD3 training calls its pipeline with sigmas=None: the last step starts at 0.0089, not 0.25
    assert float(out.rollout.sigmas[-2]) == pytest.approx(0.00893, abs=1e-4)
    assert float(sigma_schedule(10, 3.0)[-2]) == pytest.approx(0.25)


def test_the_schedule_keys_are_checked_before_any_model_loads(lab_world, tmp_path):
    flux = {"model": {"kind": "flux", "path": str(tmp_path / "nowhere")}, "rewards": [{"name": "hps"}]}
    with pytest.raises(ConfigError, match="sampler.shift is set"):
        load_config(None, {**flux, "sampler": {"shift": 3.0}})
    with pytest.raises(ConfigError, match="sampler.dynamic_shift is set"):
        load_config(None, {**flux, "sampler": {"dynamic_shift": True}})
    assert load_config(None, {**flux, "sampler": {"schedule": "shift", "shift": 3.0}}).sampler.static_shift == 3.0
    with pytest.raises(ConfigError, match="UniPC"):
        load_config(None, {"model": {"kind": "wan", "path": "x"}, "rewards": [{"name": "hps"}],
                           "sampler": {"schedule": "pipeline"}})
    with pytest.raises(ConfigError, match="no diffusers pipeline"):
        load_config(None, {"sampler": {"schedule": "pipeline"}})
    with pytest.raises(ConfigError, match="sampler.schedule must be"):
        load_config(None, {"sampler": {"schedule": "karras"}})
    # the presets: Flow-GRPO's samples through the pipelines, the others shift linspace(1, 0, T+1) themselves
    for preset, expected in (("flow_grpo-official", "pipeline"), ("flow_grpo_sd3-official", "pipeline"),
                             ("g2rpo-official", "shift"), ("dance_grpo-official", "shift"),
                             ("mix_grpo-official", "shift"), ("g2rpo-paper", "shift")):
        cfg = load_config([ROOT / "configs" / "flux_hps.yaml", METHODS / f"{preset}.yaml"])
        assert cfg.sampler.resolved_schedule(cfg.model.kind) == expected, preset


def test_the_trainer_samples_on_the_pipelines_schedule(tmp_path, hub_flux_dir):
    folder = hub_flux_dir
    base = {"model": {"kind": "flux", "path": str(folder), "height": 32, "width": 32, "max_sequence_length": 16},
            "rewards": [{"name": "tests.test_fidelity_pass3:mean_brightness"}],
            "sampler": {"num_steps": 6, "sde_indices": [0], "granularities": [1], "group_size": 3},
            "data": {"prompts": str(_prompts(tmp_path)), "prompts_per_iteration": 1}, "iterations": 1,
            "checkpoint_every": 0, "export_final": False, "progress": False, "tensorboard": False}
    seen = {}
    for sched in (None, "shift"):
        cfg = load_config(None, merge_dicts(base, {"sampler": {"schedule": sched}, "output_dir": str(tmp_path / str(sched))}))
        trainer = Trainer(cfg, log=lambda *a, **k: None)
        seen[sched] = trainer.sampler.sigmas.clone()
        if sched is None:
            assert torch.equal(seen[sched], trainer.policy.pipeline_sigmas(6))
        trainer.close()
    from g2rpo.schedule import sigma_schedule

    assert torch.equal(seen["shift"], sigma_schedule(6, 3.0)) and not torch.allclose(seen[None], seen["shift"])


def mean_brightness(images, prompts):
    """A reward for the schedule test (any real computation on the images)."""
    return images.float().mean(dim=tuple(range(1, images.ndim)))


def _prompts(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red cube\n")
    return f


def test_flow_grpo_ema_steps_once_per_sample_micro_batch():
    """train_*.py calls ema.step(params, global_step) after every sample micro-batch: with 6 micro-batches per
    optimizer step (pickscore_flux) the EMA moves 6 times toward the same weights when (global_step + 1) % 8 == 0.
    The reference below is that loop; the trainer's per-optimizer-step update must land on the same average."""
    from g2rpo.config import TrainConfig
    from g2rpo.train.setup import ema_decay_at, update_ema

    official = load_config([LAB, METHODS / "flow_grpo-official.yaml"], {"model": {"kind": "lab"},
                                                                          "sampler": {"schedule": "shift"}})
    assert (official.ema_every, official.ema_repeats, official.ema_schedule) == (8, 6, "flow_grpo")
    assert load_config([LAB, METHODS / "flow_grpo_sd3-official.yaml"], {"sampler": {"schedule": "shift"}}).ema_repeats == 2
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    ref = {n: p.detach().clone() for n, p in module.named_parameters()}  # EMAModuleWrapper's copy
    ours = {n: p.detach().clone().float() for n, p in module.named_parameters()}
    cfg = TrainConfig(ema_decay=0.9, ema_every=8, ema_schedule="flow_grpo", ema_repeats=6)
    once = {n: p.clone() for n, p in ours.items()}
    for step in range(1, 41):  # an optimizer step moves the weights, then 6 micro-batches call ema.step
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        for _ in range(6):
            decay = min((1 + step) / (10 + step), 0.9)
            if (step + 1) % 8 == 0:
                for n, p in module.named_parameters():
                    ref[n].add_((1 - decay) * (p.detach() - ref[n]))
        update_ema(ours, module, ema_decay_at(cfg, step))
        update_ema(once, module, ema_decay_at(TrainConfig(ema_decay=0.9, ema_every=8, ema_schedule="flow_grpo"), step))
    for n in ref:
        assert torch.allclose(ours[n], ref[n], atol=1e-5), n
        assert not torch.allclose(once[n], ref[n], atol=1e-3), n  # one update per step is another average


def test_step_noise_is_drawn_in_the_configured_dtype():
    """G2RPO's and MixGRPO's official steps draw the SDE noise in the model output's bf16 (randn_tensor(...,
    dtype=model_output.dtype)); DanceGRPO and Flow-GRPO in fp32. The realised noise of a bf16 draw is bf16-exact."""
    from g2rpo.rollout import G2RPOSampler
    from g2rpo.sde import sde_coefficients
    from g2rpo.testing import GaussianWorld

    world, eps = GaussianWorld(), {}
    for dtype in (torch.float32, torch.bfloat16):
        sampler = G2RPOSampler(world, num_steps=4, sde_indices=[1], granularities=(1,), group_size=6,
                               step_noise_dtype=dtype)
        ro = sampler.rollout(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), None,
                             generator=torch.Generator().manual_seed(1))
        x = ro.x_k[:, 0].double()  # [P, ...] the group's shared source
        v = world(x.float(), ro.sigmas[1].float().expand(2)).double()
        a, b, std = sde_coefficients(ro.sigmas, 1, ro.eta, ro.sde_kind)
        eps[dtype] = ((ro.x_next[:, 0].double() - (a * x + b * v)[:, None]) / std).float()
    bf = eps[torch.bfloat16]
    assert torch.allclose(bf, bf.bfloat16().float(), atol=2e-5)  # on the bf16 grid (up to the fp32 arithmetic)
    f32 = eps[torch.float32]
    assert (f32 - f32.bfloat16().float()).abs().max() > 1e-3
    for preset, expected in (("g2rpo-official", "bfloat16"), ("mix_grpo-official", "bfloat16"),
                             ("dance_grpo-official", "float32"), ("flow_grpo-official", "float32")):
        cfg = load_config([LAB, METHODS / f"{preset}.yaml"], {"sampler": {"schedule": "shift"}})
        assert cfg.sampler.step_noise_dtype == expected, preset
    sd3 = load_config([LAB, METHODS / "flow_grpo_sd3-official.yaml"], {"sampler": {"schedule": "shift"}})
    assert (sd3.sampler.noise_dtype, sd3.sampler.step_noise_dtype) == ("float16", "float32")
    assert load_config([LAB, METHODS / "flow_grpo-official.yaml"],
                       {"sampler": {"schedule": "shift"}}).sampler.noise_dtype == "bfloat16"


def test_recomputed_old_logprobs_count_the_forwards_of_empty_units():
    """On several ranks a rank with nothing to train in a slot still runs its forwards (FSDP): they are spent."""
    from g2rpo.rollout import G2RPOSampler
    from g2rpo.rollout.scoring import recompute_old_logprobs, work_units
    from g2rpo.testing import GaussianWorld

    world = GaussianWorld()
    ro = G2RPOSampler(world, num_steps=4, sde_indices=[0, 1], granularities=(1,), group_size=3).rollout(
        torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), None, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 2, 3, dtype=torch.bool)
    mask[:, 1] = True  # slot 0 is trained on another rank only
    units = work_units(mask, 1, [0, 1])
    assert [u.empty for u in units] == [True, True, False, False]
    spent = recompute_old_logprobs(world, ro, [units], None).forward_rows
    assert spent == 4  # one row per (prompt, shared source): 2 empty + 2 trained


def test_the_cost_projection_counts_what_the_bf16_trainer_runs(lab_world, tmp_path):
    """bench/cost_projection.py's formula is the trainer's own cost: in bf16 the trainer also recomputes the old
    log-probs (one forward per training row), which the projection left out (DanceGRPO 584 -> 685 rows)."""
    import importlib.util

    from g2rpo.train.metrics import iteration_cost

    spec = importlib.util.spec_from_file_location("cost_projection", ROOT / "bench" / "cost_projection.py")
    projection = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(projection)
    cfg = load_config(None, tiny(lab_world, tmp_path, iterations=1, **{"model.dtype": "bfloat16"}))
    m = Trainer(cfg, log=lambda *a, **k: None).run()[0]
    assert m["cost/recompute_rows"] == m["cost/train_rows"] > 0
    assert projection.projected_cost(m["cost/rollout_rows"], m["cost/train_rows"]) == \
        iteration_cost(m, gradient_checkpointing=True)


def test_wan_configs_use_the_cited_fp32_schedule_and_say_which_expert_owns_each_step():
    """train_grpo_wan_2_1.py shifts an fp32 linspace and draws bf16 noise: step 6 of 20 is timestep 874 (float64:
    875), below Wan 2.2's boundary 875, so the low-noise expert owns it; the config's comment must say so."""
    import re

    from g2rpo.models.wan import expert_for
    from g2rpo.models.wan import plan_trained_experts

    for name in ("wan_t2v_hps", "wan22_t2v_hps", "wan_i2v_hps"):
        cfg = load_config([ROOT / "configs" / f"{name}.yaml"])
        assert (cfg.sampler.schedule_precision, cfg.sampler.noise_dtype) == ("float32", "bfloat16"), name
    path = ROOT / "configs" / "wan22_t2v_hps.yaml"
    cfg = load_config([path])
    trained, owner = plan_trained_experts(cfg, ("transformer", "transformer_2"),
                                          lambda sigma: expert_for(sigma, 875.0, cfg.sampler.quantize_timesteps))
    assert trained == ("transformer", "transformer_2")
    assert owner == {"transformer": [0, 1, 2, 3, 4, 5], "transformer_2": [6, 7]}
    text = path.read_text()
    assert re.search(r"steps 0-5 \(timesteps 1000-900\) are\s+#\s+transformer's", text)
    assert re.search(r"steps 6-7 \(874, 847\) transformer_2's", text)
    cfg64 = load_config([path], {"sampler": {"schedule_precision": "float64"}})
    _, owner64 = plan_trained_experts(cfg64, ("transformer", "transformer_2"),
                                      lambda sigma: expert_for(sigma, 875.0, True))
    assert owner64["transformer_2"] == [7]  # the float64 schedule would move step 6 to the other expert


@torch.no_grad()
def test_sd3_gets_the_fp32_scheduler_timestep_in_low_precision():
    """StableDiffusion3Pipeline hands the transformer its scheduler's fp32 timesteps (time_proj embeds them in fp32);
    g2rpo cast 1000 sigma to the model dtype first (bf16: 700.0 -> 700, but 962.9 -> 964)."""
    from g2rpo.models.registry import family, settings
    from g2rpo.models.sd3 import SD3Policy
    from g2rpo.testing.tiny import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(seed=0).to(torch.bfloat16)
    policy = SD3Policy(pipe, **settings(family("sd3"), height=32, width=32, guidance_scale=4.5,
                                        max_sequence_length=16))
    policy.compute_dtype = torch.bfloat16
    seen = []
    handle = policy.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]),
                                                          with_kwargs=True)
    cond = policy.encode_prompts(["a red cube"])
    sigma = torch.tensor([0.9629], dtype=torch.float64)
    policy(policy.prepare_latents(1, torch.Generator().manual_seed(0)), sigma, cond)
    handle.remove()
    assert seen and all(t.dtype == torch.float32 for t in seen)
    assert torch.equal(seen[0][:1], sigma.float() * 1000.0)


def test_a_policy_row_under_cfg_runs_two_transformer_rows_and_the_trainer_logs_it(lab_world, tmp_path):
    """``cost`` counts policy rows; ``cost/transformer_rows_per_row`` says how many transformer rows each runs (2
    under classifier-free guidance, 1 with Flux's embedded guidance), counted here on the transformer's input."""
    from g2rpo.models.flux import FluxPolicy
    from g2rpo.models.registry import family, settings
    from g2rpo.models.sd3 import SD3Policy
    from g2rpo.testing.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

    cases = [(SD3Policy, tiny_sd3_pipeline, "sd3", 4.5), (SD3Policy, tiny_sd3_pipeline, "sd3", 1.0),
             (FluxPolicy, tiny_flux_pipeline, "flux", 3.5)]
    for cls, make, fam, scale in cases:
        policy = cls(make(seed=0), **settings(family(fam), height=32, width=32, guidance_scale=scale,
                                              max_sequence_length=16))
        rows = []
        handle = policy.transformer.register_forward_pre_hook(
            lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True)
        x = policy.prepare_latents(3, torch.Generator().manual_seed(0))
        with torch.no_grad():
            policy(x, torch.full((3,), 0.5, dtype=torch.float64), policy.encode_prompts(["a", "b", "c"]))
        handle.remove()
        assert sum(rows) == 3 * policy.transformer_rows_per_row, (fam, scale)
        assert policy.transformer_rows_per_row == (2 if fam == "sd3" and scale > 1 else 1)
    m = Trainer(load_config(None, tiny(lab_world, tmp_path, iterations=1)), log=lambda *a, **k: None).run()[0]
    assert m["cost/transformer_rows_per_row"] == 1.0
