import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from g2rpo.lab import LabWorldConfig, build_world, load_judge, load_lab_policy, load_rewards, sample_images
from g2rpo.lab.__main__ import main as lab_main
from g2rpo.lab.data import load_splits, to_unit
from g2rpo.lab.prompts import class_prompts, prompt_label
from g2rpo.lab.world import lab_prompts_for


def test_splits_are_fixed_disjoint_and_scaled():
    a, b = load_splits(0), load_splits(0)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    assert a.train_x.min() >= -1 and a.train_x.max() <= 1 and a.train_x.min() == -1
    n = len(a.train_y) + len(a.val_y) + len(a.test_y)
    assert n == 1797 and abs(len(a.train_y) / n - 0.6) < 0.01
    assert load_splits(0, size=16).train_x.shape[1:] == (16, 16)
    assert not torch.equal(load_splits(1).train_y, a.train_y)


def test_prompts_name_their_class():
    for label in range(10):
        for p in class_prompts(label) + class_prompts(label, test=True):
            assert prompt_label(p) == label
    with pytest.raises(ValueError, match="which digit"):
        prompt_label("a cat")


def test_base_model_has_headroom(lab_world):
    policy = load_lab_policy(lab_world)
    judge = load_judge(lab_world)
    labels = [i % 10 for i in range(300)]
    images = sample_images(policy, lab_prompts_for(labels), steps=16, seed=123)
    assert images.shape == (300, 8, 8) and images.min() >= 0 and images.max() <= 1
    acc = judge.evaluate(images, torch.tensor(labels))["judge_accuracy"]
    s = load_splits(0)
    real_acc = judge.evaluate(to_unit(s.test_x), s.test_y)["judge_accuracy"]
    assert 0.3 < acc < real_acc - 0.1, (acc, real_acc)  # well above chance (0.1), below real digits
    rewards = load_rewards(lab_world)
    prompts = lab_prompts_for(labels)
    gen_align = rewards["digit_alignment"].score(images, prompts).mean()
    real_align = rewards["digit_alignment"].score(to_unit(s.test_x), lab_prompts_for(s.test_y.tolist())).mean()
    assert gen_align < real_align


def test_realism_ranks_real_digits_above_saturated_noise(lab_world):
    rewards = load_rewards(lab_world)
    s = load_splits(0)
    real = to_unit(s.test_x[:100])
    g = torch.Generator().manual_seed(0)
    saturated = (torch.rand(100, 8, 8, generator=g) > 0.5).float()  # the classifier hack's look
    prompts = lab_prompts_for(s.test_y[:100].tolist())
    r_real = rewards["digit_realism"].score(real, prompts)
    r_sat = rewards["digit_realism"].score(saturated, prompts)
    assert r_real.mean() > r_sat.mean() + 0.1 and (r_real.median() > r_sat.max())


def test_building_twice_gives_identical_weights(tmp_path):
    cfg = LabWorldConfig(pretrain_steps=5)
    a = build_world(tmp_path / "a", cfg, log=None)
    b = build_world(tmp_path / "b", cfg, log=None)
    for part in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "rewards/digit_alignment.safetensors"):
        wa, wb = load_file(str(a / part)), load_file(str(b / part))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # a second build with the same config is a cache hit; another seed is another model
    assert build_world(tmp_path / "a", cfg, log=None) == a
    c = build_world(tmp_path / "c", LabWorldConfig(pretrain_steps=5, seed=1), log=None)
    wc = load_file(str(c / "transformer/diffusion_pytorch_model.safetensors"))
    wa = load_file(str(a / "transformer/diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_lab_model_loads_through_the_diffusers_code_path(lab_world):
    direct = FluxTransformer2DModel.from_pretrained(lab_world / "transformer")
    policy = load_lab_policy(lab_world)
    for (k, v), (k2, v2) in zip(direct.state_dict().items(), policy.transformer.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(FileNotFoundError, match="lab_world.json"):
        load_lab_policy(lab_world / "transformer")


def test_cli_sample_and_grid(lab_world, tmp_path):
    out = tmp_path / "s.npz"
    lab_main(["sample", "--checkpoint", str(lab_world), "--n", "12", "--steps", "8", "--seed", "3", "--out", str(out)])
    data = np.load(out)
    assert data["images"].shape == (12, 8, 8) and data["images"].dtype == np.float32
    assert data["labels"].dtype == np.int64 and data["labels"].tolist() == [i % 10 for i in range(12)]
    assert 0 <= data["images"].min() and data["images"].max() <= 1
    png = tmp_path / "g.png"
    lab_main(["grid", "--checkpoint", str(lab_world), "--per-class", "3", "--steps", "4", "--out", str(png)])
    from PIL import Image

    im = Image.open(png)
    assert im.size[1] > im.size[0]  # 10 rows (classes) x 3 columns
