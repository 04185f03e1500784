"""Tiny, randomly initialised instances of the real pipelines (real classes, real code paths),
for tests and correctness checks on CPU: nothing is downloaded, tokenizers are built in memory.
"""

from __future__ import annotations

import torch

__all__ = ["FLUX_DEV_TRANSFORMER", "HUB_SCHEDULER_CONFIGS", "with_hub_scheduler", "TINY_FLUX_TRANSFORMER", "random_flux_velocity", "tiny_clip_tokenizer", "tiny_flux_pipeline", "tiny_flux2_pipeline", "tiny_qwen_image_pipeline", "tiny_wan_pipeline", "tiny_wan_i2v_pipeline",
           "tiny_qwen_vl_judge", "tiny_sd3_pipeline", "tiny_t5_tokenizer"]


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer():
    """A CLIPTokenizer over single bytes (no merges): a valid, tiny byte-level BPE."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for t in ("<|startoftext|>", "<|endoftext|>"):
        vocab[t] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_t5_tokenizer():
    """A T5Tokenizer (unigram) over lowercase letters and digits."""
    from transformers import T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in letters] + [("▁" + c, -1.5) for c in letters]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_text(tokenizer, projection: bool = False, hidden: int = 32, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vocab = tokenizer.get_vocab()
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=len(vocab), projection_dim=hidden, max_position_embeddings=77,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"])
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _t5(tokenizer, d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(d_model=d_model, d_ff=37, num_layers=2, num_heads=4, d_kv=8,
                                   vocab_size=len(tokenizer.get_vocab())))


def _vae(latent_channels: int, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, layers_per_block=1, sample_size=32, shift_factor=0.0609,
                         scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)


#: The scheduler configs the released checkpoints ship (``scheduler/scheduler_config.json`` of FLUX.1-dev,
#: SD3.5-Medium and Qwen-Image; FLUX.2-dev shifts dynamically with the mu its pipeline computes), for tests that
#: call a tiny pipeline with its scheduler untouched.
HUB_SCHEDULER_CONFIGS = {
    "FluxPipeline": {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
             "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
    "StableDiffusion3Pipeline": {"num_train_timesteps": 1000, "shift": 3.0},
    "QwenImagePipeline": {"base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
                   "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
                   "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
                   "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False},
    "Flux2Pipeline": {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
              "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
}


def with_hub_scheduler(pipe):
    """``pipe`` with its released checkpoint's scheduler config (:data:`HUB_SCHEDULER_CONFIGS`, by pipeline class)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(HUB_SCHEDULER_CONFIGS[type(pipe).__name__])
    return pipe


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline with 1+1 blocks of width 32, a 2x VAE, tiny CLIP and T5 (32x32 images)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, tok2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
                        vae=_vae(4, seed), text_encoder=_clip_text(tok, seed=seed), tokenizer=tok,
                        text_encoder_2=_t5(tok2, seed=seed), tokenizer_2=tok2, transformer=transformer)


def tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline with one block of width 32, a 2x VAE, two tiny CLIPs and a tiny T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2, tok3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
                                        pos_embed_max_size=32)
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(4, seed),
        text_encoder=_clip_text(tok, projection=True, seed=seed), tokenizer=tok,
        text_encoder_2=_clip_text(tok2, projection=True, seed=seed + 1), tokenizer_2=tok2,
        text_encoder_3=_t5(tok3, seed=seed), tokenizer_3=tok3, transformer=transformer)


def _tiny_wan_transformer(in_channels: int = 4, image_dim: int | None = None, pos_embed_seq_len: int | None = None):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                 in_channels=in_channels, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=32,
                                 num_layers=1, rope_max_seq_len=32, image_dim=image_dim,
                                 pos_embed_seq_len=pos_embed_seq_len)


def _tiny_wan_vae(temporal: bool = False):
    """4 latent channels; 2x spatial and no temporal compression, or (``temporal``: what image-to-video needs, whose
    pipeline frames 1 + 4k) 4x spatial and 4x temporal as Wan's own VAE."""
    from diffusers import AutoencoderKLWan

    stats = dict(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0])
    if temporal:
        return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[True, True], scale_factor_temporal=4, scale_factor_spatial=4,
                                **stats)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                            scale_factor_temporal=1, scale_factor_spatial=2, **stats)


def tiny_wan_pipeline(seed: int = 0, variant: str = "2.1"):
    """A WanPipeline (text-to-video) with one block of width 16, a 2x spatial / 1x temporal VAE with
    4 latent channels, and a tiny UMT5 (16x16 videos, any number of frames). ``variant``: ``"2.1"`` (one
    transformer), ``"2.2"`` (Wan 2.2 A14B's layout: a second, differently initialised ``transformer_2`` and
    ``boundary_ratio`` 0.875, inside a short schedule's timesteps) or ``"ti2v"`` (Wan 2.2 TI2V-5B's
    ``expand_timesteps``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    if variant not in ("2.1", "2.2", "ti2v"):
        raise ValueError(f"variant must be 2.1, 2.2 or ti2v, got {variant!r}")
    tok = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                               num_heads=4, relative_attention_num_buckets=8))
    vae = _tiny_wan_vae()
    transformer = _tiny_wan_transformer()
    extra = {}
    if variant == "2.2":
        extra = {"transformer_2": _tiny_wan_transformer(), "boundary_ratio": 0.875}
    elif variant == "ti2v":
        extra = {"expand_timesteps": True}
    return WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer, **extra)


def tiny_wan_i2v_pipeline(seed: int = 0, variant: str = "2.1"):
    """A WanImageToVideoPipeline on :func:`tiny_wan_pipeline`'s parts with a 4x spatial, 4x temporal VAE (16x16
    videos of 1 + 4k frames), its transformer taking the latents, the frame mask (4 channels: the temporal factor)
    and the image latents (4 + 4 + 4 channels).
    ``variant``: ``"2.1"`` (Wan 2.1 I2V: a tiny CLIP vision image encoder whose penultimate states the transformer
    takes, ``image_dim`` 32), ``"flf2v"`` (Wan 2.1 FLF2V: the same with the first and last images' 2 x 17 tokens
    position-embedded, ``pos_embed_seq_len`` 34), ``"2.2"`` (Wan 2.2 I2V A14B: no image encoder, a
    ``transformer_2`` and ``boundary_ratio`` 0.9) or ``"ti2v"`` (Wan 2.2 TI2V-5B's image-to-video:
    ``expand_timesteps``, the transformer taking the latents alone, 4 channels)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    if variant not in ("2.1", "flf2v", "2.2", "ti2v"):
        raise ValueError(f"variant must be 2.1, flf2v, 2.2 or ti2v, got {variant!r}")
    tok = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                               num_heads=4, relative_attention_num_buckets=8))
    vae = _tiny_wan_vae(temporal=True)
    parts: dict = {}
    if variant in ("2.1", "flf2v"):
        parts["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37,
                                                                  num_hidden_layers=2, num_attention_heads=4,
                                                                  image_size=32, patch_size=8))
        parts["image_processor"] = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32,
                                                                                              "width": 32})
        parts["transformer"] = _tiny_wan_transformer(in_channels=12, image_dim=32,
                                                     pos_embed_seq_len=34 if variant == "flf2v" else None)
    elif variant == "2.2":
        parts.update(transformer=_tiny_wan_transformer(in_channels=12),
                     transformer_2=_tiny_wan_transformer(in_channels=12), boundary_ratio=0.9)
    else:
        parts.update(transformer=_tiny_wan_transformer(in_channels=4), expand_timesteps=True)
    return WanImageToVideoPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **parts)


def _tiny_qwen_vl(seed: int = 0):
    """A tiny Qwen2.5-VL (byte-level tokenizer, one text layer of width 32) and its tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_chars())}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=specials[1:])
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
                         rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=37, num_heads=4, out_hidden_size=32,
                           fullatt_block_indexes=[0], window_size=56, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg), tok


def tiny_qwen_image_pipeline(seed: int = 0):
    """A QwenImagePipeline with one block of width 16, a 2x VAE with 4 latent channels and a tiny
    Qwen2.5-VL text encoder (32x32 images)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    text_encoder, tok = _tiny_qwen_vl(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(2, 2, 4))
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                             tokenizer=tok, transformer=transformer)


def tiny_flux2_pipeline(seed: int = 0):
    """A Flux2Pipeline with 1+1 blocks of width 32, a 2x VAE with 4 latent channels (16 patchified) and a
    3-layer tiny Mistral-3 text encoder (its three layers are the text embedding: set the FLUX.2 layers option to
    (1, 2, 3); 32x32 images)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    _, tok = _tiny_qwen_vl(seed)  # a byte-level tokenizer with a chat template stands in for Mistral's processor
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    tok.pad_token = "<|endoftext|>"
    torch.manual_seed(seed)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tok), hidden_size=16, intermediate_size=24,
                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=4096),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=32, patch_size=8),
        image_token_index=len(tok) - 1))
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                             norm_num_groups=4, sample_size=32)
    with torch.no_grad():  # non-trivial batch-norm statistics, so that decode's un-normalisation is tested
        vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, vae.bn.running_mean.numel()))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.running_var.numel()))
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                         tokenizer=tok, transformer=transformer)


#: A tiny Flux transformer config (1+1 blocks of width 32, 16 packed channels), for random-weight tests.
TINY_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             guidance_embeds=True, axes_dims_rope=(4, 6, 6))

#: Flux.1-dev's transformer architecture (diffusers config), for benchmarks with random weights.
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def random_flux_velocity(config: dict, height: int, width: int, device=None, dtype=torch.float32,
                         text_len: int = 512, seed: int = 0):
    """A :class:`~g2rpo.models.FluxVelocity` with random weights of ``config`` for ``height x width``
    images (VAE factor 8), and random conditioning ``[1, text_len, joint_dim]`` / ``[1, pooled_dim]``."""
    from diffusers import FluxTransformer2DModel

    from ..models.flux import FluxVelocity

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    try:  # built on the device in its dtype: Flux.1-dev's 12B parameters never pass through CPU fp32
        torch.set_default_dtype(dtype)
        with torch.device(device or "cpu"):
            transformer = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    transformer = transformer.to(device=device, dtype=dtype).eval()
    lh, lw = 2 * (height // 16), 2 * (width // 16)
    velocity = FluxVelocity(transformer, lh, lw, guidance_scale=3.5).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    cond = {"prompt_embeds": torch.randn(1, text_len, config["joint_attention_dim"], generator=g).to(device),
            "pooled_prompt_embeds": torch.randn(1, config["pooled_projection_dim"], generator=g).to(device)}
    noise = torch.randn(1, (lh // 2) * (lw // 2), config["in_channels"], generator=g).to(device)
    return velocity, cond, noise


_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen_vl_judge(folder, seed: int = 0) -> None:
    """Save a tiny Qwen2.5-VL (byte-level tokenizer, 1+1 layers of width 32) with its processor to ``folder``."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    model, tok = _tiny_qwen_vl(seed)
    pix = dict(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pix), tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(**pix), chat_template=_QWEN_CHAT_TEMPLATE)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
