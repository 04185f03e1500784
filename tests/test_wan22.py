"""Wan 2.2 (issue 24): the A14B layout's two experts split at boundary_ratio * 1000 as WanPipeline splits them,
TI2V-5B's per-token timesteps, the trained expert(s), and `python -m g2rpo.train` / `python -m g2rpo.eval` end to
end on tiny pipelines built here."""

import numpy as np
import pytest
import torch

from family_e2e import train_and_eval
from g2rpo.hub import dtype_kwarg
from g2rpo import G2RPOSampler
from g2rpo.config import ConfigError, load_config
from g2rpo.models import load_policy
from g2rpo.models.wan import WanExperts
from g2rpo.testing.tiny import tiny_wan_pipeline

T = 6  # shifted sigmas 1, .9375, .857, ...: timesteps 1000 and 937.5 on transformer, the rest on transformer_2
PROMPT = "a cat walking"
SIZE = dict(height=16, width=16, num_frames=3, max_sequence_length=16)


@pytest.fixture(scope="module")
def wan22_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan22") / "tiny-wan22"
    tiny_wan_pipeline(seed=0, variant="2.2").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ti2v") / "tiny-ti2v"
    tiny_wan_pipeline(seed=0, variant="ti2v").save_pretrained(d)
    return d


def _pipeline_latents(folder, noise, **call):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder, **dtype_kwarg(torch.float32))
    set_timesteps = pipe.scheduler.set_timesteps  # the same schedule: our shifted sigmas
    pipe.scheduler.set_timesteps = lambda n, device=None: set_timesteps(sigmas=list(np.linspace(1.0, 1.0 / T, T)),
                                                                         device=device)
    return pipe(PROMPT, num_inference_steps=T, latents=noise.clone(), output_type="latent", **SIZE, **call).frames


def _ode(policy, noise):
    return G2RPOSampler(policy, num_steps=T, sde_indices=[1], granularities=(1,), group_size=2).rollout(
        noise, policy.encode_prompts([PROMPT]), generator=torch.Generator().manual_seed(1)).anchor[:, -1]


@torch.no_grad()
@pytest.mark.parametrize("guidance, guidance_2", [(1.0, None), (4.0, 2.5)])
def test_wan22_two_experts_ode_equals_wan_pipeline(wan22_dir, guidance, guidance_2):
    policy = load_policy("wan", wan22_dir, dtype=torch.float32, guidance_scale=guidance, guidance_scale_2=guidance_2,
                         **SIZE)
    assert isinstance(policy.transformer, WanExperts) and policy.transformer.boundary == 875.0
    assert [policy.expert_of_sigma(float(s)) for s in policy_sigmas()] == ["transformer"] * 2 + ["transformer_2"] * 4
    noise = policy.prepare_latents(1, torch.Generator().manual_seed(0))
    ref = _pipeline_latents(wan22_dir, noise, guidance_scale=guidance, guidance_scale_2=guidance_2)
    assert torch.allclose(_ode(policy, noise), ref, atol=2e-5, rtol=1e-5)
    policy.transformer.boundary = 0.0  # without the switch (transformer everywhere) the pipeline is not matched
    assert not torch.allclose(_ode(policy, noise), ref, atol=1e-3)


def policy_sigmas():
    from g2rpo.schedule import sigma_schedule

    return sigma_schedule(T, 3.0)[:T]


@torch.no_grad()
def test_a_batch_across_the_boundary_runs_each_expert_on_its_own_rows(wan22_dir):
    policy = load_policy("wan", wan22_dir, dtype=torch.float32, guidance_scale=4.0, guidance_scale_2=2.0, **SIZE)
    x = torch.randn(3, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.95, 0.5, 0.9])  # high, low, high
    cond = {k: v.repeat(3, *[1] * (v.ndim - 1)) for k, v in policy.encode_prompts([PROMPT]).items()}
    mixed = policy(x, sigma, cond)
    alone = torch.cat([policy(x[i:i + 1], sigma[i:i + 1], {k: v[i:i + 1] for k, v in cond.items()})
                       for i in range(3)])
    assert torch.allclose(mixed, alone, atol=1e-5)
    experts = policy.transformer
    direct = experts.transformer_2(hidden_states=x[1:2], timestep=sigma[1:2] * 1000,
                                   encoder_hidden_states=cond["prompt_embeds"][1:2], return_dict=False)[0]
    neg = experts.transformer_2(hidden_states=x[1:2], timestep=sigma[1:2] * 1000,
                                encoder_hidden_states=cond["negative_prompt_embeds"][1:2], return_dict=False)[0]
    assert torch.allclose(mixed[1:2], neg + 2.0 * (direct - neg), atol=1e-5)  # the low-noise expert, guidance_scale_2


@torch.no_grad()
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_ti2v_5b_ode_equals_wan_pipeline(ti2v_dir, guidance):
    policy = load_policy("wan", ti2v_dir, dtype=torch.float32, guidance_scale=guidance, **SIZE)
    assert policy.expand_timesteps and not isinstance(policy.transformer, WanExperts)
    assert policy.model_timestep(torch.tensor([500.0]), {}).shape == (1, 3 * 4 * 4)  # per latent token
    noise = policy.prepare_latents(1, torch.Generator().manual_seed(0))
    ref = _pipeline_latents(ti2v_dir, noise, guidance_scale=guidance)
    assert torch.allclose(_ode(policy, noise), ref, atol=2e-5, rtol=1e-5)


def _train_cfg(folder, out, **extra):
    over = {"model": {"kind": "wan", "path": str(folder), "dtype": "float32", **SIZE, "guidance_scale": 1.0},
            "sampler": {"num_steps": T, "sde_indices": [0, 1], "granularities": [1], "group_size": 2},
            "rewards": [{"name": "hps"}], "output_dir": str(out)}
    for k, v in extra.items():
        node = over
        *path, last = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return load_config(None, over)


def test_the_trained_experts_own_the_trained_sde_steps(wan22_dir, tmp_path):
    from g2rpo.train.setup import resolve_trained_experts

    def trained(**extra):
        policy = load_policy("wan", wan22_dir, dtype=torch.float32, **SIZE)
        names = resolve_trained_experts(_train_cfg(wan22_dir, tmp_path, **extra), policy, log=lambda *a: None)
        experts = policy.transformer
        experts.requires_grad_(True)
        grads = {n: all(p.requires_grad for p in experts.expert(n).parameters()) for n in ("transformer",
                                                                                          "transformer_2")}
        assert grads == {n: n in names for n in grads}  # only the trained experts take gradients
        return names

    assert trained() == ("transformer",)  # steps 0 and 1 are high-noise steps
    assert trained(**{"sampler.sde_indices": [1, 2]}) == ("transformer", "transformer_2")
    assert trained(**{"sampler.sde_indices": [3, 4]}) == ("transformer_2",)
    assert trained(**{"model.train_experts": "both"}) == ("transformer", "transformer_2")
    with pytest.raises(ValueError, match=r"SDE steps \[2\].*frozen transformer_2"):
        trained(**{"model.train_experts": "high", "sampler.sde_indices": [1, 2]})


def test_wan22_options_are_refused_where_they_do_not_apply():
    with pytest.raises(ConfigError, match="model.train_experts does not apply to model.kind 'flux'"):
        load_config(None, ["model.kind=flux", "model.train_experts=high"])
    with pytest.raises(ConfigError, match="model.train_experts must be one of"):
        load_config(None, ["model.kind=wan", "model.train_experts=middle"])
    with pytest.raises(ConfigError, match="model.guidance_scale_2 does not apply"):
        load_config(None, ["model.guidance_scale_2=3.0"])


def test_a_one_transformer_wan_refuses_a_second_guidance(tmp_path):
    d = tmp_path / "wan21"
    tiny_wan_pipeline(seed=0).save_pretrained(d)
    with pytest.raises(ValueError, match="guidance_scale_2 is the low-noise expert's guidance"):
        load_policy("wan", d, dtype=torch.float32, guidance_scale_2=3.0, **SIZE)


@pytest.mark.parametrize("variant", ["2.2", "ti2v"])
def test_train_and_eval_end_to_end_on_tiny_wan22(variant, wan22_dir, ti2v_dir, tmp_path, tiny_open_clip):
    """2 iterations of `python -m g2rpo.train` then `python -m g2rpo.eval`; on the two-expert layout the SDE steps
    (sampler.num_steps 4: steps 0 and 1 at timesteps 1000 and 900) are high-noise steps: `auto` trains transformer
    alone, the continuations run both experts, and the export holds both (transformer_2 unchanged)."""
    folder = wan22_dir if variant == "2.2" else ti2v_dir
    out, _ = train_and_eval("wan", folder, tmp_path, tiny_open_clip,
                            ["model.height=16", "model.width=16", "model.num_frames=3", "model.guidance_scale=4.0",
                             "model.max_sequence_length=16"],
                            ["--height", "16", "--width", "16", "--num-frames", "3"], frames="min")
    if variant == "2.2":
        from diffusers import WanPipeline

        base = WanPipeline.from_pretrained(folder, **dtype_kwarg(torch.float32))
        final = WanPipeline.from_pretrained(out / "final", **dtype_kwarg(torch.float32))
        assert final.config.boundary_ratio == 0.875 and final.transformer_2 is not None
        moved = {name: any(not torch.equal(a, b) for a, b in zip(getattr(base, name).parameters(),
                                                                 getattr(final, name).parameters()))
                 for name in ("transformer", "transformer_2")}
        assert moved == {"transformer": True, "transformer_2": False}  # steps 0, 1 at T=4 are high-noise steps
        from g2rpo.train import main as train_main

        assert train_main([f"output_dir={out}", "--resume", "iterations=3"]) == 0  # the checkpoint holds both
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("sde, trained", [("[0, 1]", "trained transformer;"),
                                           ("[1, 2]", "trained transformer, transformer_2;")])
@pytest.mark.slow
def test_two_ranks_shard_both_experts_and_match_one_rank(wan22_dir, tmp_path, sde, trained):
    """FSDP2 over the two-expert module, with one expert frozen (SDE steps 0, 1: timesteps 1000, 937.5) or both
    trained (steps 1, 2 straddle the boundary): 2 ranks give one rank's losses and weights, and the export holds
    both experts."""
    import json
    from pathlib import Path

    from test_train import _cli, _run_main

    def run(out, ranks):
        args = ["model.kind=wan", f"model.path={wan22_dir}", "model.dtype=float32", "model.height=16",
                "model.width=16", "model.num_frames=3", "model.guidance_scale=4.0", "model.max_sequence_length=16",
                "rewards=[{name: 'family_e2e:brightness'}]", f"data.prompts={prompts}",
                "data.prompts_per_iteration=2", f"sampler.num_steps={T}", "sampler.sde_indices=[1, 2]",
                "sampler.granularities=[1]", "sampler.group_size=3", "iterations=2", "checkpoint_every=1",
                "progress=false", "tensorboard=false", f"output_dir={out}", "optim.lr=1e-3"]
        args = [a.replace("sampler.sde_indices=[1, 2]", f"sampler.sde_indices={sde}") for a in args]
        r = (_cli(args, env_extra={"PYTHONPATH": str(Path(__file__).parent)}, torchrun=ranks) if ranks
             else _run_main(args))
        assert r.returncode == 0, r.stderr[-3000:]
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], r.stdout

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue sphere on grass\n")
    one, log = run(tmp_path / "one", None)
    assert trained in log
    two, _ = run(tmp_path / "two", 2)
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    from diffusers import WanPipeline

    p1 = WanPipeline.from_pretrained(tmp_path / "one" / "final", **dtype_kwarg(torch.float32))
    p2 = WanPipeline.from_pretrained(tmp_path / "two" / "final", **dtype_kwarg(torch.float32))
    if "transformer_2" not in trained:  # the frozen expert comes back unchanged from the sharded run
        base = WanPipeline.from_pretrained(wan22_dir, **dtype_kwarg(torch.float32))
        assert all(torch.equal(a, b) for a, b in zip(base.transformer_2.parameters(), p2.transformer_2.parameters()))
    for name in ("transformer", "transformer_2"):
        worst = max((a - b).abs().max().item() for a, b in zip(getattr(p1, name).parameters(),
                                                                getattr(p2, name).parameters()))
        assert worst < 1e-4, (name, worst)


def test_lora_on_both_experts_exports_an_adapter_per_expert(wan22_dir, tmp_path):
    """LoRA on Wan 2.2's two experts: `final_lora/` (transformer) and `final_lora_transformer_2/` load with
    WanPipeline.load_lora_weights (the second with load_into_transformer_2) and fuse to the fused export."""
    from diffusers import WanPipeline

    from g2rpo.train import main as train_main

    (tmp_path / "p.txt").write_text("a red cube\na blue sphere\n")
    out = tmp_path / "run"
    assert train_main(["model.kind=wan", f"model.path={wan22_dir}", "model.dtype=float32", "model.height=16",
                       "model.width=16", "model.num_frames=3", "model.guidance_scale=1.0",
                       "model.max_sequence_length=16", "rewards=[{name: 'family_e2e:brightness'}]",
                       f"data.prompts={tmp_path / 'p.txt'}", "data.prompts_per_iteration=2", f"sampler.num_steps={T}",
                       "sampler.sde_indices=[1, 2]", "sampler.granularities=[1]", "sampler.group_size=3",
                       "iterations=1", "lora.enabled=true", "lora.rank=4", "lora.alpha=8",
                       "lora.target_modules=[to_q, to_k, to_v, to_out.0]", "optim.lr=0.05", "progress=false",
                       "tensorboard=false", f"output_dir={out}"]) == 0
    assert (out / "final_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "final_lora_transformer_2" / "pytorch_lora_weights.safetensors").is_file()
    fused = WanPipeline.from_pretrained(out / "final", **dtype_kwarg(torch.float32))
    pipe = WanPipeline.from_pretrained(wan22_dir, **dtype_kwarg(torch.float32))
    before = {n: {k: v.clone() for k, v in getattr(pipe, n).state_dict().items()} for n in ("transformer",
                                                                                            "transformer_2")}
    pipe.load_lora_weights(out / "final_lora", adapter_name="high")
    pipe.load_lora_weights(out / "final_lora_transformer_2", adapter_name="low", load_into_transformer_2=True)
    pipe.fuse_lora(components=["transformer", "transformer_2"])
    pipe.unload_lora_weights()
    for n in ("transformer", "transformer_2"):
        got, want = getattr(pipe, n).state_dict(), getattr(fused, n).state_dict()
        assert any(not torch.equal(before[n][k], want[k]) for k in want), n  # training moved both experts
        for k in want:
            assert torch.allclose(got[k], want[k], atol=1e-5), (n, k)


def test_a_frozen_expert_owning_a_trained_step_stops_before_any_model_loads(wan22_dir, tmp_path, monkeypatch,
                                                                            capsys):
    from g2rpo.models.wan import WanPolicy, experts_of_folder
    from g2rpo.train import main

    names, route = experts_of_folder(wan22_dir)  # read from the folder's files: routes as the loaded policy does
    policy = load_policy("wan", wan22_dir, dtype=torch.float32, **SIZE)
    sigmas = [1.0, 0.9375, 0.876, 0.875, 0.8749, 0.5, 0.0]
    assert [route(s) for s in sigmas] == [policy.expert_of_sigma(s) for s in sigmas]
    assert route(0.8749, True) == "transformer" and route(0.8749) == "transformer_2"  # integer timesteps round
    loads = []
    monkeypatch.setattr(WanPolicy, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    code = main(["model.kind=wan", f"model.path={wan22_dir}", "model.train_experts=low", f"data.prompts={prompts}",
                 f"sampler.num_steps={T}", "sampler.sde_indices=[1, 2]", "sampler.granularities=[1]",
                 "rewards=[{name: 'family_e2e:brightness'}]", f"output_dir={tmp_path / 'run'}"])
    assert code == 2 and loads == []
    assert "the SDE steps [1]" in capsys.readouterr().err
    assert experts_of_folder(tmp_path) is None  # not a diffusers folder: nothing to read
