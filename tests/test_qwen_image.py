"""Qwen-Image (issue 15): parity with diffusers' QwenImagePipeline (true CFG included), prompts of
different lengths, and `python -m g2rpo.train` / `python -m g2rpo.eval` end to end on a tiny pipeline."""

import numpy as np
import pytest
import torch

from family_e2e import train_and_eval
from g2rpo.hub import dtype_kwarg
from g2rpo import G2RPOSampler
from g2rpo.models import QwenImagePolicy, load_policy
from g2rpo.testing.tiny import tiny_qwen_image_pipeline, with_hub_scheduler

T = 6
PROMPT = "a red cube on a table"
SEQ = 256  # the tiny byte-level tokenizer spends ~120 tokens on the prompt template


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen") / "tiny-qwen-image"
    with_hub_scheduler(tiny_qwen_image_pipeline(seed=0)).save_pretrained(d)  # shift_terminal 0.02
    return d


@torch.no_grad()
@pytest.mark.parametrize("true_cfg", [1.0, 4.0])
def test_qwen_image_ode_equals_the_pipeline(qwen_dir, true_cfg):
    from diffusers import QwenImagePipeline

    policy = load_policy("qwen_image", qwen_dir, dtype=torch.float32, height=32, width=32, guidance_scale=true_cfg,
                         max_sequence_length=SEQ)
    assert isinstance(policy, QwenImagePolicy)
    noise = policy.prepare_latents(1, torch.Generator().manual_seed(0))
    assert noise.shape == (1, 64, 16)
    ro = G2RPOSampler(policy, num_steps=T, sde_indices=[1], granularities=(1,), group_size=2,
                      sigmas=policy.pipeline_sigmas(T)).rollout(
        noise, policy.encode_prompts([PROMPT]), generator=torch.Generator().manual_seed(1))
    pipe = QwenImagePipeline.from_pretrained(qwen_dir, **dtype_kwarg(torch.float32))  # scheduler untouched
    ref = pipe(PROMPT, negative_prompt=" ", true_cfg_scale=true_cfg, height=32, width=32, num_inference_steps=T,
               latents=noise.clone(), max_sequence_length=SEQ, output_type="latent").images
    assert torch.allclose(ro.sigmas.float(), pipe.scheduler.sigmas) and float(ro.sigmas[-2]) == pytest.approx(0.02)
    assert torch.allclose(ro.anchor[:, -1], ref, atol=1e-5, rtol=1e-5)
    images = policy.decode(ro.anchor[:, -1])
    expected = pipe(PROMPT, negative_prompt=" ", true_cfg_scale=true_cfg, height=32, width=32,
                    num_inference_steps=T, sigmas=list(np.linspace(1.0, 1.0 / T, T)), latents=noise.clone(),
                    max_sequence_length=SEQ, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.allclose(images, expected, atol=1e-4)


@torch.no_grad()
def test_prompts_of_different_lengths_are_padded_with_masks(qwen_dir):
    policy = load_policy("qwen_image", qwen_dir, dtype=torch.float32, height=32, width=32, guidance_scale=1.0,
                         max_sequence_length=SEQ)
    cond = policy.encode_prompts(["a cat", "a very long prompt about a dog pulling a sled in the snow"])
    lengths = cond["prompt_embeds_mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] == cond["prompt_embeds"].shape[1]
    x = policy.prepare_latents(2, torch.Generator().manual_seed(3))
    sigma = torch.full((2,), 0.7)
    together = policy(x, sigma, cond)
    alone = policy(x[:1], sigma[:1], policy.encode_prompts(["a cat"]))
    assert torch.allclose(together[:1], alone, atol=1e-5)  # padding never changes a row


def test_train_and_eval_end_to_end_on_tiny_qwen_image(qwen_dir, tmp_path, tiny_open_clip):
    train_and_eval("qwen_image", qwen_dir, tmp_path, tiny_open_clip,
                   ["model.height=32", "model.width=32", "model.guidance_scale=4.0", f"model.max_sequence_length={SEQ}"],
                   ["--height", "32", "--width", "32"])
