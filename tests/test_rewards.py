import json

import pytest
import torch
import torch.nn.functional as F

from g2rpo.rewards import make_reward
from g2rpo.rewards._images import to_pil

from conftest import TINY_CLIP_CFG

PROMPTS = ["a red cube", "two cats on a sofa", "a watercolor of a lighthouse", "a bowl of soup"]
def _images(n=4, size=40, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _reference_cosine(model_name, state, images, prompts, resize_mode):
    import open_clip

    model, _, pre = open_clip.create_model_and_transforms(model_name, pretrained=None, image_resize_mode=resize_mode)
    model.load_state_dict(state)
    model.eval()
    tok = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        out = []
        for img, p in zip(to_pil(images), prompts):
            f_i = F.normalize(model.encode_image(pre(img)[None]), dim=-1)
            f_t = F.normalize(model.encode_text(tok([p])), dim=-1)
            out.append((f_i @ f_t.T)[0, 0])
    return torch.stack(out)


def test_hps_matches_an_independent_computation(tiny_open_clip, tmp_path):
    name, state = tiny_open_clip
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": state}, ckpt)
    reward = make_reward("hps", checkpoint=str(ckpt), model_name=name)
    images = _images()
    s = reward.score(images, PROMPTS)
    assert s.shape == (4,) and s.dtype == torch.float32
    assert torch.allclose(s, _reference_cosine(name, state, images, PROMPTS, "longest"), atol=1e-5)
    assert s.abs().max() <= 1.0 + 1e-6
    # the text matters: swapping prompts changes the scores
    assert not torch.allclose(s, reward.score(images, PROMPTS[::-1]))


def test_hps_bad_files(tiny_open_clip, tmp_path):
    name, state = tiny_open_clip
    with pytest.raises(FileNotFoundError, match="HPS checkpoint not found"):
        make_reward("hps", checkpoint=str(tmp_path / "missing.pt"), model_name=name)
    torch.save(state, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="state_dict"):
        make_reward("hps", checkpoint=str(tmp_path / "plain.pt"), model_name=name)


def test_clip_score_from_local_dir_matches_and_refuses_random_weights(tiny_open_clip, tmp_path):
    from safetensors.torch import save_file

    name, state = tiny_open_clip
    d = tmp_path / "clip"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CLIP_CFG,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "open_clip_model.safetensors"))
    reward = make_reward("clip", model_dir=str(d))
    images = _images(seed=1)
    expected = _reference_cosine(name, state, images, PROMPTS, None)
    assert torch.allclose(reward.score(images, PROMPTS), expected, atol=1e-5)
    # the open_clip trap: a .pt file is not looked for; we raise instead of scoring with random weights
    bad = tmp_path / "clip_pt"
    bad.mkdir()
    (bad / "open_clip_config.json").write_text((d / "open_clip_config.json").read_text())
    torch.save(state, bad / "open_clip_model.pt")
    with pytest.raises(FileNotFoundError, match=r"no weights loaded .*\.pt file is ignored"):
        make_reward("clip", model_dir=str(bad))
    with pytest.raises(FileNotFoundError):
        make_reward("clip", model_dir=str(tmp_path / "nope"))


def test_pickscore_matches_clip_logits(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from g2rpo.testing.tiny import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    vocab = tok.get_vocab()
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                      num_hidden_layers=1, vocab_size=len(vocab), max_position_embeddings=77,
                                      bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                      pad_token_id=vocab["<|endoftext|>"]),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=1, image_size=32, patch_size=8),
                     projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tok)
    model.save_pretrained(tmp_path / "pick")
    processor.save_pretrained(tmp_path / "pick")
    reward = make_reward("pickscore", model_dir=str(tmp_path / "pick"))
    images = _images(seed=2)
    s = reward.score(images, PROMPTS)
    with torch.no_grad():
        expected = []
        for img, p in zip(to_pil(images), PROMPTS):
            inputs = processor(text=[p], images=[img], return_tensors="pt", padding=True)
            expected.append(model(**inputs).logits_per_image[0, 0])
    assert torch.allclose(s, torch.stack(expected), atol=1e-4)
    # Flow-GRPO's pickscore_scorer.py divides by 26 (its presets set the option)
    flow = make_reward("pickscore", model_dir=str(tmp_path / "pick"), divide_by=26)
    assert torch.allclose(flow.score(images, PROMPTS), s / 26, atol=1e-6)
    with pytest.raises(ValueError, match="divide_by"):
        make_reward("pickscore", model_dir=str(tmp_path / "pick"), divide_by=0)


def test_reward_input_checks(tiny_open_clip, tmp_path):
    name, state = tiny_open_clip
    ckpt = tmp_path / "h.pt"
    torch.save({"state_dict": state}, ckpt)
    reward = make_reward("hps", checkpoint=str(ckpt), model_name=name)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        reward.score(torch.rand(2, 32, 32), PROMPTS[:2])
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        reward.score(_images(2), PROMPTS[:3])
    with pytest.raises(ValueError, match="unknown reward"):
        make_reward("aesthetic")


def _official_key(k: str) -> str:
    """Our ImageReward key -> the official ImageReward.pt key (written out independently of the loader)."""
    import re

    fixed = {"vision_model.embeddings.class_embedding": "blip.visual_encoder.cls_token",
             "vision_model.embeddings.position_embedding": "blip.visual_encoder.pos_embed"}
    if k in fixed:
        return fixed[k]
    if k.startswith("vision_model.embeddings.patch_embedding."):
        return "blip.visual_encoder.patch_embed.proj." + k.rsplit(".", 1)[1]
    if k.startswith("vision_model.post_layernorm."):
        return "blip.visual_encoder.norm." + k.rsplit(".", 1)[1]
    m = re.match(r"vision_model\.encoder\.layers\.(\d+)\.(.*)", k)
    if m:
        rest = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
                "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        head, leaf = m.group(2).rsplit(".", 1)
        return f"blip.visual_encoder.blocks.{m.group(1)}.{rest[head]}.{leaf}"
    if k.startswith("text_encoder."):
        return "blip." + k
    return k


def test_imagereward_loads_official_layout_and_scores(tmp_path):
    from torchvision import transforms as T
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig

    from g2rpo.rewards.imagereward import ImageRewardModel

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cube", "two", "cats", "on", "sofa",
             "water", "##color", "of", "light", "##house", "bowl", "soup"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    vocab_size = len(words) + 2  # + [DEC], [ENC]
    med = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
           "num_attention_heads": 4, "max_position_embeddings": 64, "encoder_width": 32, "layer_norm_eps": 1e-12,
           "hidden_act": "gelu", "pad_token_id": 0, "add_cross_attention": True}
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    ref = ImageRewardModel(BlipVisionConfig(**vision), BlipTextConfig(
        vocab_size=vocab_size, hidden_size=32, encoder_hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=64, is_decoder=True)).eval()
    official = {_official_key(k): v for k, v in ref.state_dict().items()}
    official["blip.vision_proj.weight"] = torch.zeros(16, 32)  # present in the real file, unused
    official["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save(official, tmp_path / "ImageReward.pt")

    reward = make_reward("imagereward", model_dir=str(tmp_path), vision={k: vision[k] for k in vision})
    images = _images(seed=3, size=48)
    s = reward.score(images, PROMPTS)

    tok = BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    pre = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                     T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    with torch.no_grad():
        expected = []
        for img, p in zip(to_pil(images), PROMPTS):
            t = tok([p], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            assert t["input_ids"][0, 0] == tok.cls_token_id  # [CLS] is kept, not replaced by [ENC]
            image = ref.vision_model(pixel_values=pre(img)[None]).last_hidden_state
            text = ref.text_encoder(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                                    encoder_hidden_states=image,
                                    encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long))
            raw = ref.mlp.layers(text.last_hidden_state[:, 0])[0, 0]
            expected.append((raw - 0.16717362830052426) / 1.0333394966054072)
    assert torch.allclose(s, torch.stack(expected), atol=1e-5)
    # a checkpoint of another architecture is refused, naming the mismatch
    torch.save({k: v for k, v in official.items() if "mlp.layers.7" not in k}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="missing"):
        make_reward("imagereward", model_dir=str(tmp_path), checkpoint=str(tmp_path / "broken.pt"), vision=vision)
    # a crafted checkpoint is refused and its payload never runs (issue 31: it ran with weights_only=False)
    import os

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    torch.save({**official, "payload": Payload()}, tmp_path / "crafted.pt")
    with pytest.raises(ValueError, match=r"ImageReward checkpoint .*crafted.pt: refused: .*\(posix.system\)"):
        make_reward("imagereward", model_dir=str(tmp_path), checkpoint=str(tmp_path / "crafted.pt"), vision=vision)
    assert not (tmp_path / "ran").exists()


def test_unified_reward_parsing():
    from g2rpo.rewards.unified_reward import parse_final_score

    assert parse_final_score("Elements: cat (object): yes\nFinal Score: 4.5") == 4.5
    assert parse_final_score("Final Score: 2\n...revised. Final Score: **3**") == 3.0
    assert parse_final_score("final score:5") == 5.0
    assert parse_final_score("I cannot rate this image.") != parse_final_score("I cannot rate this image.")  # NaN


def test_unified_reward_end_to_end_on_a_tiny_qwen_vl(tmp_path):
    import math

    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from g2rpo.testing.tiny import tiny_qwen_vl_judge
    from g2rpo.rewards.unified_reward import DEFAULT_TEMPLATE, parse_final_score

    tiny_qwen_vl_judge(tmp_path / "judge")
    reward = make_reward("unified_reward", model_dir=str(tmp_path / "judge"), max_new_tokens=6, batch_size=3)
    images = _images(n=3, seed=4)
    answers = reward.judge(images, PROMPTS[:3])
    # an independent greedy generation, one prompt at a time
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "judge").eval()
    proc = AutoProcessor.from_pretrained(tmp_path / "judge")
    for img, p, got in zip(to_pil(images), PROMPTS[:3], answers):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                  "text": DEFAULT_TEMPLATE.format(prompt=p)}]}]
        text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        inputs = proc(text=[text], images=[img], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0] == got
    scores = reward.score(images, PROMPTS[:3])
    expected = [parse_final_score(a) for a in answers]
    assert all((math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(scores.tolist(), expected))
    with pytest.raises(FileNotFoundError, match="unified_reward"):
        make_reward("unified_reward", model_dir=str(tmp_path / "none"))
