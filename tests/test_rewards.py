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
    with pytest.raises(Exception):
        make_reward("clip", model_dir=str(bad))
    with pytest.raises(FileNotFoundError):
        make_reward("clip", model_dir=str(tmp_path / "nope"))


def test_pickscore_matches_clip_logits(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from g2rpo.models.tiny import tiny_clip_tokenizer

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
