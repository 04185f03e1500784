"""Wan image-to-video (issue 24): parity with diffusers' WanImageToVideoPipeline (Wan 2.1 I2V with its image
encoder; Wan 2.2 I2V A14B with two experts, with and without a last image), prompt files naming images (checked
before any model loads), the first-frame consistency reward, and `python -m g2rpo.train` / `python -m g2rpo.eval`
end to end on tiny pipelines built here."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from family_e2e import train_and_eval
from g2rpo.hub import dtype_kwarg
from g2rpo import G2RPOSampler
from g2rpo.models import load_policy
from g2rpo.models.wan_i2v import WanI2VPolicy
from g2rpo.prompts import ImagePrompt, load_prompt_images, load_prompts
from g2rpo.testing.tiny import tiny_wan_i2v_pipeline

T = 6
PROMPT = "a cat walking"
SIZE = dict(height=16, width=16, num_frames=5, max_sequence_length=16)  # the VAE encodes 1 + 4k frames


def _image(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_i2v")
    out = {}
    for variant in ("2.1", "flf2v", "2.2", "ti2v"):
        tiny_wan_i2v_pipeline(seed=0, variant=variant).save_pretrained(root / variant)
        out[variant] = root / variant
    out["first"], out["last"] = _image(root / "first.png", 0), _image(root / "last.png", 1)
    return out


def _ode(policy, noise):
    return G2RPOSampler(policy, num_steps=T, sde_indices=[1], granularities=(1,), group_size=2).rollout(
        noise, policy.encode_prompts([PROMPT]), generator=torch.Generator().manual_seed(1)).anchor[:, -1]


def _pipeline_latents(folder, noise, image, last=None, **call):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(folder, **dtype_kwarg(torch.float32))
    set_timesteps = pipe.scheduler.set_timesteps  # the same schedule: our shifted sigmas
    pipe.scheduler.set_timesteps = lambda n, device=None: set_timesteps(sigmas=list(np.linspace(1.0, 1.0 / T, T)),
                                                                         device=device)
    extra = {} if last is None else {"last_image": Image.open(last).convert("RGB")}
    return pipe(Image.open(image).convert("RGB"), PROMPT, num_inference_steps=T, latents=noise.clone(),
                output_type="latent", **SIZE, **call, **extra).frames


@torch.no_grad()
@pytest.mark.parametrize("variant, guidance, last", [("2.1", 1.0, False), ("2.1", 4.0, False), ("flf2v", 4.0, True),
                                                     ("2.2", 4.0, False), ("2.2", 4.0, True), ("2.2", 1.0, True),
                                                     ("ti2v", 1.0, False), ("ti2v", 4.0, False)])
def test_wan_i2v_ode_equals_the_image_to_video_pipeline(folders, variant, guidance, last):
    policy = load_policy("wan_i2v", folders[variant], dtype=torch.float32, guidance_scale=guidance, **SIZE)
    assert isinstance(policy, WanI2VPolicy) and policy.uses_image_embeds == (variant in ("2.1", "flf2v"))
    last_image = folders["last"] if last else None
    policy.set_prompt_images({PROMPT: ImagePrompt(folders["first"], last_image)})
    noise = policy.prepare_latents(1, torch.Generator().manual_seed(0))
    ref = _pipeline_latents(folders[variant], noise, folders["first"], last_image, guidance_scale=guidance)
    assert torch.allclose(_ode(policy, noise), ref, atol=2e-5, rtol=1e-5)
    cond = policy.encode_prompts([PROMPT])["condition"]
    if variant == "ti2v":  # the image frame is the condition's, its tokens at timestep 0
        assert torch.allclose(ref[:, :, :1], cond, atol=1e-6)
        policy.model_input = lambda x, c: x
    else:
        policy.model_input = lambda x, c: torch.cat([x, torch.zeros_like(cond).expand(x.shape[0], *cond.shape[1:])],
                                                    1)
    assert not torch.allclose(_ode(policy, noise), ref, atol=1e-3)  # without the image condition: no match


@torch.no_grad()
def test_the_condition_is_computed_once_per_prompt_and_shared_by_the_group(folders):
    policy = load_policy("wan_i2v", folders["2.1"], dtype=torch.float32, guidance_scale=1.0, **SIZE)
    policy.set_prompt_images({PROMPT: ImagePrompt(folders["first"]), "a dog": ImagePrompt(folders["last"])})
    calls = []
    real = policy._condition
    policy._condition = lambda p: calls.append(p) or real(p)
    cond = policy.encode_prompts([PROMPT, "a dog", PROMPT])
    cond = policy.encode_prompts([PROMPT, "a dog"])
    assert calls == [PROMPT, "a dog"]
    assert cond["condition"].shape == (2, 8, 2, 4, 4) and cond["image_embeds"].shape[:2] == (2, 1)
    assert not torch.equal(cond["condition"][0], cond["condition"][1])  # each prompt's own image


def test_prompt_files_name_images_and_bad_ones_stop_before_any_model_loads(folders, tmp_path, monkeypatch, capsys):
    from g2rpo.train import main

    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "a.png", 3)
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "a cat", "image": "img/a.png"}) + "\n"
                    + json.dumps({"prompt": "a dog", "image": "img/a.png", "last_image": "img/a.png"}) + "\n")
    images = load_prompt_images(str(good))
    assert images["a dog"].last_image == tmp_path / "img" / "a.png" and load_prompts(str(good)) == ["a cat", "a dog"]
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,image\na cat,img/a.png\n")
    assert load_prompt_images(str(csv)) == {"a cat": ImagePrompt(tmp_path / "img" / "a.png")}
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    cases = {"missing.jsonl": ('{"prompt": "a cat", "image": "img/nope.png"}', "image not found"),
             "broken.jsonl": ('{"prompt": "a cat", "image": "img/broken.png"}', "unreadable image"),
             "noimage.jsonl": ('{"prompt": "a cat"}', "need an 'image' field"),
             "twice.jsonl": ('{"prompt": "a", "image": "img/a.png"}\n{"prompt": "a", "image": "img/broken.png"}',
                             "unreadable image"),
             "plain.txt": ("a cat", "a text file has no images")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text + "\n")
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_prompt_images(str(tmp_path / name))
    _image(tmp_path / "img" / "c.png", 4)
    (tmp_path / "dup.jsonl").write_text('{"prompt": "a", "image": "img/a.png"}\n{"prompt": "a", "image": "img/c.png"}\n')
    with pytest.raises(ValueError, match="given two different images"):
        load_prompt_images(str(tmp_path / "dup.jsonl"))
    from g2rpo.eval import main as eval_main

    loads = []
    monkeypatch.setattr(WanI2VPolicy, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    for name in ("missing.jsonl", "plain.txt"):  # train and eval stop on the prompts (exit 2), no model loaded
        code = main(["model.kind=wan_i2v", f"model.path={folders['2.2']}", f"data.prompts={tmp_path / name}",
                     f"output_dir={tmp_path / 'run'}", "rewards=[{name: 'family_e2e:brightness'}]"])
        assert code == 2
        assert ("image not found" if name == "missing.jsonl" else "a text file has no images") in capsys.readouterr().err
        assert eval_main(["--model", str(folders["2.2"]), "--prompts", str(tmp_path / name), "--rewards", "hps",
                          "--out", str(tmp_path / "ev")]) == 2
        assert ("image not found" if name == "missing.jsonl" else "a text file has no images") in capsys.readouterr().err
    assert loads == []


@torch.no_grad()
def test_first_frame_reward_is_the_clip_similarity_to_the_conditioning_image(folders, tmp_path, tiny_open_clip):
    from g2rpo.rewards import FrameAggregated, make_reward

    name, state = tiny_open_clip
    ckpt = tmp_path / "clip.pt"
    torch.save({"state_dict": state}, ckpt)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a", "image": str(folders["first"])}) + "\n"
                       + json.dumps({"prompt": "b", "image": str(folders["last"])}) + "\n")
    reward = FrameAggregated(make_reward("first_frame", prompt_file=str(prompts), model_name=name,
                                         checkpoint=str(ckpt), num_frames=2), "min")
    first = torch.from_numpy(np.array(Image.open(folders["first"]).convert("RGB"))).permute(2, 0, 1) / 255.0
    other = torch.rand(3, 24, 20, generator=torch.Generator().manual_seed(5))
    videos = torch.stack([torch.stack([first, first, other], 1), torch.stack([other, first, first], 1)])  # [2,3,F,H,W]
    s = reward.score(videos, ["a", "a"])
    assert s.shape == (2,) and abs(float(s[0]) - 1.0) < 1e-4 and float(s[1]) < float(s[0])  # first two frames only
    assert float(reward.score(videos[:1], ["b"])[0]) < 0.9999  # the prompt's own image
    with pytest.raises(KeyError, match="no conditioning image"):
        reward.score(videos[:1], ["unknown"])


@pytest.mark.parametrize("variant", ["2.1", "2.2", "ti2v"])
def test_train_and_eval_end_to_end_on_tiny_wan_i2v(variant, folders, tmp_path, tiny_open_clip):
    name, state = tiny_open_clip
    ckpt = tmp_path / "clip.pt"
    torch.save({"state_dict": state}, ckpt)
    prompts = tmp_path / "p.jsonl"
    last = {"last_image": str(folders["first"])} if variant == "2.2" else {}  # Wan 2.1 I2V, TI2V: no last image
    prompts.write_text(json.dumps({"prompt": "a red cube", "image": str(folders["first"])}) + "\n"
                       + json.dumps({"prompt": "a blue sphere on grass", "image": str(folders["last"]), **last}) + "\n")
    rewards = (f"rewards=[{{name: hps, options: {{checkpoint: {ckpt}, model_name: {name}}}, frames: min}}, "
               f"{{name: first_frame, options: {{checkpoint: {ckpt}, model_name: {name}}}}}]")
    evaluation = []
    if variant == "2.1":  # validation during training: held-out prompts with their own conditioning images
        held_out = tmp_path / "test.jsonl"
        held_out.write_text(json.dumps({"prompt": "a green cone", "image": str(folders["last"])}) + "\n")
        evaluation = ["eval.every=1", f"eval.prompts={held_out}", "eval.steps=3",
                      f"eval.rewards=[{{name: first_frame, options: {{checkpoint: {ckpt}, model_name: {name}}}}}]"]
    out, metrics = train_and_eval("wan_i2v", folders[variant], tmp_path, tiny_open_clip,
                                  ["model.height=16", "model.width=16", "model.num_frames=5",
                                   "model.guidance_scale=4.0", "model.max_sequence_length=16"],
                                  ["--height", "16", "--width", "16", "--num-frames", "5"], frames="min",
                                  train_args=[rewards, *evaluation], prompts=prompts)
    assert all(np.isfinite(m["reward/first_frame"]) for m in metrics)
    if evaluation:
        evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval/first_frame" in x]
        assert [m["iteration"] for m in evals] == [0, 1, 2] and all(np.isfinite(m["eval/first_frame"]) for m in evals)


def test_a_last_image_needs_a_model_that_takes_one(folders):
    policy = load_policy("wan_i2v", folders["2.1"], dtype=torch.float32, guidance_scale=1.0, **SIZE)
    with pytest.raises(ValueError, match="not an FLF2V model"):
        policy.set_prompt_images({PROMPT: ImagePrompt(folders["first"], folders["last"])})
    ti2v = load_policy("wan_i2v", folders["ti2v"], dtype=torch.float32, guidance_scale=1.0, **SIZE)
    with pytest.raises(ValueError, match="TI2V-5B .* does not take"):
        ti2v.set_prompt_images({PROMPT: ImagePrompt(folders["first"], folders["last"])})
    flf2v = load_policy("wan_i2v", folders["flf2v"], dtype=torch.float32, guidance_scale=1.0, **SIZE)
    flf2v.set_prompt_images({PROMPT: ImagePrompt(folders["first"], folders["last"])})
    assert flf2v.encode_prompts([PROMPT])["image_embeds"].shape[:2] == (1, 2)  # both images, one row


@torch.no_grad()
def test_the_drop_in_rollout_takes_an_image_per_prompt(folders):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    from g2rpo.pipelines import rollout
    from g2rpo.testing.tiny import tiny_wan_pipeline

    pipe = WanImageToVideoPipeline.from_pretrained(folders["2.2"], **dtype_kwarg(torch.float32))
    kw = dict(num_steps=4, group_size=2, sde_indices=[0], granularities=(1,), height=16, width=16,
              max_sequence_length=16, num_frames=5)
    out = rollout(pipe, ["a", "b"], images=[folders["first"], (folders["last"], folders["first"])], **kw)
    assert out.images.shape == (2 * 2, 3, 5, 16, 16)
    with pytest.raises(ValueError, match="needs images: one per prompt"):
        rollout(pipe, ["a", "b"], images=[folders["first"]], **kw)
    with pytest.raises(FileNotFoundError, match=r"images\[0\]: image not found"):
        rollout(pipe, ["a"], images=["nope.png"], **kw)
    with pytest.raises(ValueError, match="not an image-to-video pipeline"):
        rollout(tiny_wan_pipeline(), ["a"], images=[folders["first"]], **kw)
    from g2rpo.testing.tiny import tiny_flux_pipeline

    with pytest.raises(ValueError, match=r"num_frames: FluxPipeline does not take it \(only wan, wan_i2v pipelines do\)"):
        rollout(tiny_flux_pipeline(), ["a"], num_frames=5, num_steps=4, group_size=2)
    assert isinstance(tiny_wan_pipeline(), WanPipeline)
