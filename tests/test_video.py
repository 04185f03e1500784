"""Wan text-to-video (issue 15): parity with diffusers' WanPipeline, frame-wise video rewards, and
`python -m g2rpo.train` / `python -m g2rpo.eval` end to end on a tiny Wan pipeline built here."""

import numpy as np
import pytest
import torch

from family_e2e import train_and_eval
from g2rpo.hub import dtype_kwarg
from g2rpo import G2RPOSampler
from g2rpo.models import WanPolicy, load_policy
from g2rpo.rewards import FrameAggregated

T = 6
PROMPT = "a cat walking"


@torch.no_grad()
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_wan_ode_equals_wan_pipeline(wan_dir, guidance):
    from diffusers import WanPipeline

    policy = load_policy("wan", wan_dir, dtype=torch.float32, height=16, width=16, num_frames=3,
                         guidance_scale=guidance, max_sequence_length=16)
    assert isinstance(policy, WanPolicy) and policy.latent_shape == (4, 3, 8, 8)
    noise = policy.prepare_latents(1, torch.Generator().manual_seed(0))
    ro = G2RPOSampler(policy, num_steps=T, sde_indices=[1], granularities=(1,), group_size=2).rollout(
        noise, policy.encode_prompts([PROMPT]), generator=torch.Generator().manual_seed(1))
    pipe = WanPipeline.from_pretrained(wan_dir, **dtype_kwarg(torch.float32))
    set_timesteps = pipe.scheduler.set_timesteps  # the same schedule: our shifted sigmas, as for Flux/SD3
    pipe.scheduler.set_timesteps = lambda n, device=None: set_timesteps(sigmas=list(np.linspace(1.0, 1.0 / T, T)),
                                                                         device=device)
    ref = pipe(PROMPT, height=16, width=16, num_frames=3, num_inference_steps=T, guidance_scale=guidance,
               max_sequence_length=16, latents=noise.clone(), output_type="latent").frames
    assert torch.allclose(ro.anchor[:, -1], ref, atol=2e-5, rtol=1e-5)
    video = policy.decode(ro.anchor[:, -1])
    assert video.shape == (1, 3, 3, 16, 16) and 0 <= video.min() and video.max() <= 1
    cfg = pipe.vae.config  # decode undoes the VAE's latent normalisation as the pipeline does
    z = ref * torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1) + torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    assert torch.allclose(video, (pipe.vae.decode(z).sample / 2 + 0.5).clamp(0, 1), atol=1e-5)


class Brightness:
    name = "brightness"

    def score(self, images, prompts):
        assert images.ndim == 4 and len(prompts) == images.shape[0]
        return images.mean(dim=(1, 2, 3))


def test_image_rewards_score_videos_frame_wise():
    videos = torch.rand(2, 3, 4, 8, 8)
    per_frame = videos.mean(dim=(1, 3, 4))  # [N, F]
    for how, expected in (("mean", per_frame.mean(1)), ("min", per_frame.amin(1)), ("max", per_frame.amax(1))):
        assert torch.allclose(FrameAggregated(Brightness(), how).score(videos, ["a", "b"]), expected)
    images = torch.rand(2, 3, 8, 8)
    assert torch.equal(FrameAggregated(Brightness()).score(images, ["a", "b"]), Brightness().score(images, "ab"))
    with pytest.raises(ValueError, match="frames must be"):
        FrameAggregated(Brightness(), "median")


def test_train_and_eval_end_to_end_on_tiny_wan(wan_dir, tmp_path, tiny_open_clip):
    out, _ = train_and_eval("wan", wan_dir, tmp_path, tiny_open_clip,
                            ["model.height=16", "model.width=16", "model.num_frames=3", "model.guidance_scale=4.0",
                             "model.max_sequence_length=16"],
                            ["--height", "16", "--width", "16", "--num-frames", "3"], frames="min",
                            train_args=["image_every=2"])
    assert (out / "images" / "iter_000002.gif").is_file() and (out / "images" / "iter_000002.png").is_file()


def test_wan_gets_the_integer_timestep_with_quantized_timesteps(wan_dir):
    """sampler.quantize_timesteps on Wan: the transformer receives int(sigma * 1000), as DanceGRPO's Wan trainer."""
    from g2rpo.schedule import model_timesteps

    policy = load_policy("wan", wan_dir, dtype=torch.float32, height=16, width=16, num_frames=3, guidance_scale=1.0)
    seen = []
    real = policy.transformer.forward
    policy.transformer.forward = lambda *a, **k: (seen.append(k["timestep"].clone()), real(*a, **k))[1]
    cond = policy.encode_prompts([PROMPT])
    x = policy.prepare_latents(1, torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8749], dtype=torch.float32)
    for integer in (False, True):
        policy.integer_timesteps = integer
        with torch.no_grad():
            policy(x, model_timesteps(sigma, quantize=integer), cond)
    assert float(seen[0][0]) == pytest.approx(874.9, abs=1e-3)  # continuous by default
    assert float(seen[1][0]) == 874.0  # int(sigma * 1000), exactly (not 874.0000128 from 0.874f * 1000)
