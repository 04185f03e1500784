import csv
import json

import pytest
import torch

from g2rpo.eval import main as eval_main


def test_eval_end_to_end_on_tiny_flux_and_tiny_hps(tmp_path, tiny_open_clip, flux_dir):
    name, state = tiny_open_clip
    model = flux_dir
    ckpt = tmp_path / "hps.pt"
    torch.save({"state_dict": state}, ckpt)
    (tmp_path / "rewards.yaml").write_text(f"hps: {{checkpoint: {ckpt}, model_name: {name}}}\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue sphere\na green cone\n")
    args = ["--model", str(model), "--prompts", str(prompts), "--steps", "4", "--height", "32", "--width", "32",
            "--rewards", "hps", "--reward-options", str(tmp_path / "rewards.yaml"), "--batch", "2", "--samples", "1"]
    assert eval_main(args + ["--out", str(tmp_path / "a")]) == 0
    rows = list(csv.DictReader((tmp_path / "a" / "scores.csv").open()))
    assert [r["prompt"] for r in rows] == ["a red cube", "a blue sphere", "a green cone"]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["n"] == 3 and summary["mean"]["hps"] == pytest.approx(
        sum(float(r["hps"]) for r in rows) / 3, abs=1e-6)
    assert "| method | HPS-v2.1 |" in (tmp_path / "a" / "summary.md").read_text()
    assert (tmp_path / "a" / "grid.png").is_file()
    # deterministic: the same model and seed give the same scores
    assert eval_main(args + ["--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "scores.csv").read_text() == (tmp_path / "b" / "scores.csv").read_text()


def test_eval_checkpoint_swap_on_the_lab_world(lab_world, tmp_path):
    from diffusers import FluxTransformer2DModel

    trained = tmp_path / "run" / "final"
    tr = FluxTransformer2DModel.from_pretrained(lab_world / "transformer")
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tr.save_pretrained(trained / "transformer")
    common = ["--model", str(lab_world), "--prompts", "builtin:lab_test", "--steps", "8",
              "--rewards", "digit_alignment,digit_realism"]
    assert eval_main(common + ["--out", str(tmp_path / "base")]) == 0
    assert eval_main(common + ["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "new")]) == 0
    base = json.loads((tmp_path / "base" / "summary.json").read_text())["mean"]
    new = json.loads((tmp_path / "new" / "summary.json").read_text())["mean"]
    assert base.keys() == new.keys() == {"digit_alignment", "digit_realism"}
    assert base != new
    assert eval_main(common + ["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


def test_eval_uses_the_family_defaults_several_samples_and_one_table_for_base_and_trained(lab_world, tmp_path):
    """On the lab: 16 steps at the world's size (not Flux's 50 at 1024), 4 samples per prompt, the base
    and the trained policy in one table on identical noise, a labelled, upscaled grid."""
    from PIL import Image
    from diffusers import FluxTransformer2DModel

    trained = tmp_path / "run" / "final"
    tr = FluxTransformer2DModel.from_pretrained(lab_world / "transformer")
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tr.save_pretrained(trained / "transformer")
    assert eval_main(["--model", str(lab_world), "--checkpoint", str(tmp_path / "run"), "--prompts",
                      "builtin:lab_test", "--max-prompts", "3", "--rewards", "digit_alignment", "--label", "g2rpo",
                      "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert (summary["steps"], summary["height"], summary["width"]) == (16, 8, 8)
    assert summary["samples_per_prompt"] == 4 and summary["n"] == 12 and summary["policies"] == ["base", "g2rpo"]
    rows = list(csv.DictReader((tmp_path / "ev" / "scores.csv").open()))
    assert len(rows) == 24 and {r["policy"] for r in rows} == {"base", "g2rpo"}
    table = (tmp_path / "ev" / "summary.md").read_text()
    assert "| base |" in table and "| g2rpo |" in table
    assert summary["by_policy"]["base"]["digit_alignment"]["mean"] != summary["by_policy"]["g2rpo"][
        "digit_alignment"]["mean"]
    w, h = Image.open(tmp_path / "ev" / "grid.png").size
    assert w > 200 and h > 200  # upscaled from 8x8 images, with room for the row labels


@pytest.mark.parametrize("args, msg", [(["--max-prompts", "0"], "--max-prompts must be >= 1"),
                                       (["--max-prompts", "-1"], "--max-prompts must be >= 1"),
                                       (["--batch", "0"], "--batch must be >= 1"),
                                       (["--steps", "0"], "--steps must be >= 1")])
def test_eval_refuses_nonsense_counts(lab_world, tmp_path, capsys, args, msg):
    with pytest.raises(SystemExit) as err:
        eval_main(["--model", str(lab_world), "--prompts", "builtin:lab_test", "--rewards", "digit_alignment",
                   "--out", str(tmp_path), *args])
    assert err.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "random", "cut_config"])
def test_eval_names_a_damaged_export(lab_world, tmp_path, capsys, damage):
    import shutil

    final = tmp_path / "run" / "final"
    shutil.copytree(lab_world, final)
    weights = final / "transformer" / "diffusion_pytorch_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "random":
        weights.write_bytes(bytes(range(256)) * 64)
    else:
        cfg = final / "transformer" / "config.json"
        cfg.write_text(cfg.read_text()[:40])
    code = eval_main(["--model", str(lab_world), "--checkpoint", str(tmp_path / "run"), "--prompts", "builtin:lab_test",
                      "--rewards", "digit_alignment", "--out", str(tmp_path / "ev")])
    assert code == 2 and "does not load" in capsys.readouterr().err
