"""FLUX.2 (issue 15): parity with diffusers' Flux2Pipeline and `python -m g2rpo.train` / `python -m g2rpo.eval`
end to end on a tiny pipeline built here."""

import pytest
import torch

from family_e2e import train_and_eval
from g2rpo.hub import dtype_kwarg
from g2rpo import G2RPOSampler
from g2rpo.models import Flux2Policy, load_policy
from g2rpo.testing.tiny import tiny_flux2_pipeline, with_hub_scheduler

T = 6
PROMPT = "a red cube on a table"
LAYERS = (1, 2, 3)  # the tiny Mistral-3 has 3 layers (FLUX.2 [dev]: 10, 20, 30)


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux2") / "tiny-flux2"
    with_hub_scheduler(tiny_flux2_pipeline(seed=0)).save_pretrained(d)  # dynamic: the pipeline's mu
    return d


@torch.no_grad()
def test_flux2_ode_equals_the_pipeline(flux2_dir):
    from diffusers import Flux2Pipeline

    policy = load_policy("flux2", flux2_dir, dtype=torch.float32, height=32, width=32, guidance_scale=4.0,
                         max_sequence_length=64, text_encoder_out_layers=LAYERS)
    assert isinstance(policy, Flux2Policy)
    noise = policy.prepare_latents(1, torch.Generator().manual_seed(0))
    assert noise.shape == (1, 64, 16)
    ro = G2RPOSampler(policy, num_steps=T, sde_indices=[1], granularities=(1,), group_size=2,
                      sigmas=policy.pipeline_sigmas(T)).rollout(
        noise, policy.encode_prompts([PROMPT]), generator=torch.Generator().manual_seed(1))
    pipe = Flux2Pipeline.from_pretrained(flux2_dir, **dtype_kwarg(torch.float32))  # scheduler untouched
    kw = dict(prompt=PROMPT, height=32, width=32, num_inference_steps=T,
              guidance_scale=4.0, max_sequence_length=64, text_encoder_out_layers=LAYERS,
              latents=noise.permute(0, 2, 1).reshape(1, 16, 8, 8))  # the pipeline takes them unpacked
    ref = pipe(**kw, output_type="latent").images
    assert torch.allclose(ro.anchor[:, -1], ref, atol=1e-5, rtol=1e-5)
    images = policy.decode(ro.anchor[:, -1])
    assert images.shape == (1, 3, 32, 32)
    assert torch.allclose(images, pipe(**kw, output_type="pt").images, atol=1e-4)  # batch-norm stats undone


def test_train_and_eval_end_to_end_on_tiny_flux2(flux2_dir, tmp_path, tiny_open_clip):
    train_and_eval("flux2", flux2_dir, tmp_path, tiny_open_clip,
                   ["model.height=32", "model.width=32", "model.guidance_scale=4.0", "model.max_sequence_length=64",
                    "model.text_encoder_out_layers=[1, 2, 3]"],
                   ["--height", "32", "--width", "32", "--text-encoder-layers", "1,2,3"])
