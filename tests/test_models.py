import pytest
import torch

from g2rpo.hub import dtype_kwarg
from g2rpo import G2RPOSampler
from g2rpo.models import FluxPolicy, SD3Policy, load_policy, pack_latents, unpack_latents

T = 6
PROMPT = "a red cube on a table"


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 4, 6, 8)
    p = pack_latents(x)
    assert p.shape == (2, 12, 16)
    assert torch.equal(unpack_latents(p, 6, 8), x)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 4, 5, 8))


@torch.no_grad()
def test_flux_anchor_equals_flux_pipeline(hub_flux_dir):
    from diffusers import FluxPipeline

    policy = load_policy("flux", hub_flux_dir, dtype=torch.float32, height=32, width=32, guidance_scale=3.5,
                         max_sequence_length=24)
    assert isinstance(policy, FluxPolicy) and policy.latent_channels == 4
    noise = policy.prepare_latents(1, torch.Generator().manual_seed(0))
    assert noise.shape == (1, 64, 16)
    cond = policy.encode_prompts([PROMPT])
    ro = G2RPOSampler(policy, num_steps=T, sde_indices=[1], granularities=(1,), group_size=2,
                      sigmas=policy.pipeline_sigmas(T)).rollout(noise, cond, generator=torch.Generator().manual_seed(1))
    pipe = FluxPipeline.from_pretrained(hub_flux_dir, **dtype_kwarg(torch.float32))  # scheduler untouched
    ref = pipe(PROMPT, height=32, width=32, latents=noise.clone(), num_inference_steps=T, guidance_scale=3.5,
               max_sequence_length=24, output_type="latent").images
    assert torch.allclose(ro.sigmas.float(), pipe.scheduler.sigmas)
    assert torch.allclose(ro.anchor[:, -1], ref, atol=1e-5, rtol=1e-5)
    images = policy.decode(ro.anchor[:, -1])
    assert images.shape == (1, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    # decode applies the VAE's own scaling and shift
    vae = pipe.vae
    z = unpack_latents(ref, 16, 16) / vae.config.scaling_factor + vae.config.shift_factor
    expected = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(images, expected, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_sd3_anchor_equals_sd3_pipeline(sd3_dir, guidance):
    from diffusers import StableDiffusion3Pipeline

    policy = load_policy("sd3", sd3_dir, dtype=torch.float32, height=32, width=32, guidance_scale=guidance,
                         max_sequence_length=24)
    assert isinstance(policy, SD3Policy)
    noise = policy.prepare_latents(1, torch.Generator().manual_seed(0))
    ro = G2RPOSampler(policy, num_steps=T, sde_indices=[0], granularities=(1,), group_size=2,
                      sigmas=policy.pipeline_sigmas(T)).rollout(
        noise, policy.encode_prompts([PROMPT]), generator=torch.Generator().manual_seed(1))
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, **dtype_kwarg(torch.float32))  # scheduler untouched
    ref = pipe(PROMPT, height=32, width=32, latents=noise.clone(), num_inference_steps=T, guidance_scale=guidance,
               max_sequence_length=24, output_type="latent").images
    assert torch.allclose(ro.sigmas.float(), pipe.scheduler.sigmas) and float(ro.sigmas[-2]) < 0.05  # sigma_min
    assert torch.allclose(ro.anchor[:, -1], ref, atol=1e-5, rtol=1e-5)


def test_missing_files_are_named(tmp_path, hub_flux_dir):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_policy("flux", tmp_path / "nope")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(hub_flux_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2/config.json"):
        load_policy("flux", broken)
    with pytest.raises(ValueError, match="unknown policy kind"):
        load_policy("sdxl", hub_flux_dir)


@torch.no_grad()
def test_tiny_flux_engine_equals_public_loop():
    """Correctness of the Flux rollout benchmark (bench/test_flux_rollout.py) at tiny size on CPU."""
    from g2rpo.testing.tiny import TINY_FLUX_TRANSFORMER, random_flux_velocity
    from g2rpo.testing import public_loop_rollout

    velocity, cond, noise = random_flux_velocity(TINY_FLUX_TRANSFORMER, 64, 64, text_len=8)
    setting = dict(num_steps=8, sde_indices=(0, 2), granularities=(1, 2, 3), group_size=3, eta=0.7)
    ro = G2RPOSampler(velocity, max_batch=16, **setting).rollout(noise, cond, generator=torch.Generator().manual_seed(1))
    finals, rows = public_loop_rollout(velocity, noise, cond, generator=torch.Generator().manual_seed(1), **setting)
    assert torch.allclose(ro.finals[0], finals, atol=1e-4)
    assert ro.forward_rows < rows


def test_a_config_without_guidance_gets_its_familys_default(sd3_dir, wan_dir):
    """Defaults come from the family (models.registry: the diffusers pipeline's own __call__ defaults), not
    Flux's 3.5: SD3 7.0, Wan 5.0 (and 480x832, 81 frames); Flux 3.5."""
    from g2rpo.config import load_config
    from g2rpo.models.loading import load_configured_policy as load_from_config

    sd3 = load_from_config(load_config(None, {"model": {"kind": "sd3", "path": str(sd3_dir), "height": 32,
                                                          "width": 32}}).model).policy
    assert sd3.guidance_scale == 7.0 and sd3.max_sequence_length == 256
    cfg = load_config(None, {"model": {"kind": "wan", "path": str(wan_dir), "height": 16, "width": 16,
                                       "num_frames": 5}})
    assert cfg.model.guidance_scale is None
    wan = load_from_config(cfg.model).policy
    assert wan.guidance_scale == 5.0 and wan.num_frames == 5
    from g2rpo.models.registry import FAMILIES

    assert (FAMILIES["wan"].defaults.height, FAMILIES["wan"].defaults.width, FAMILIES["wan"].defaults.num_frames) == \
        (480, 832, 81)
    assert FAMILIES["flux"].defaults.guidance_scale == 3.5


@pytest.mark.parametrize("kind", ["flux", "sd3", "wan", "wan22"])
def test_the_adapter_names_the_blocks_fsdp_shards(kind, tmp_path):
    """Each family's adapter says which blocks FSDP2 shards (distributed.py no longer guesses by attribute names):
    every transformer block of its trained module, each once (both experts' for Wan 2.2)."""
    from g2rpo.models import load_policy
    from g2rpo.testing import tiny

    build = {"flux": tiny.tiny_flux_pipeline, "sd3": tiny.tiny_sd3_pipeline, "wan": tiny.tiny_wan_pipeline,
             "wan22": lambda: tiny.tiny_wan_pipeline(variant="2.2")}[kind]
    build().save_pretrained(tmp_path / kind)
    policy = load_policy("wan" if kind.startswith("wan") else kind, tmp_path / kind, torch.float32,
                         height=16, width=16, **({"num_frames": 5} if kind.startswith("wan") else {}))
    blocks = policy.shard_blocks()
    lists = [m for n, m in policy.transformer.named_modules() if isinstance(m, torch.nn.ModuleList)
             and n.rsplit(".", 1)[-1] in ("transformer_blocks", "single_transformer_blocks", "blocks")]
    assert len(blocks) == len({id(b) for b in blocks}) == sum(len(m) for m in lists) > 0
    assert {id(b) for b in blocks} == {id(b) for m in lists for b in m}
    assert policy.lora_folder_suffix("transformer") == "_lora"
    if kind == "wan22":  # diffusers loads the low-noise expert's adapter with load_into_transformer_2=True
        assert policy.expert_names() == ("transformer", "transformer_2")
        assert policy.lora_folder_suffix("transformer_2") == "_lora_transformer_2"
