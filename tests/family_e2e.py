"""`python -m g2rpo.train` for 2 iterations then `python -m g2rpo.eval` on a tiny model family (shared by
test_video.py, test_qwen_image.py and test_flux2.py)."""

import json

import numpy as np
import torch


def train_and_eval(kind, model_dir, tmp_path, tiny_open_clip, model_args, eval_args, frames=None, train_args=(),
                   prompts=None):
    from g2rpo.eval import main as eval_main
    from g2rpo.train import main as train_main

    name, state = tiny_open_clip
    ckpt = tmp_path / "hps.pt"
    torch.save({"state_dict": state}, ckpt)
    if prompts is None:
        prompts = tmp_path / "p.txt"
        prompts.write_text("a red cube\na blue sphere on grass\n")
    out = tmp_path / "run"
    reward = f"{{name: hps, options: {{checkpoint: {ckpt}, model_name: {name}}}" + (f", frames: {frames}" if frames else "")
    args = [f"model.kind={kind}", f"model.path={model_dir}", "model.dtype=float32", *model_args,
            f"rewards=[{reward}}}]", f"data.prompts={prompts}", "data.prompts_per_iteration=2",
            "sampler.num_steps=4", "sampler.sde_indices=[0, 1]", "sampler.granularities=[1, 2]",
            "sampler.group_size=2", "iterations=2", "checkpoint_every=1", "progress=false", "tensorboard=false",
            f"output_dir={out}", "optim.lr=1e-4", *train_args]
    assert train_main(args) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "loss" in m]  # training records (eval.every adds evaluation records)
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["reward/hps"]) and m["ratio_first_max_dev"] < 1e-5 for m in metrics)
    assert (out / "final" / "transformer" / "config.json").is_file()
    (tmp_path / "rewards.yaml").write_text(f"hps: {{checkpoint: {ckpt}, model_name: {name}}}\n")
    assert eval_main(["--model", str(model_dir), "--checkpoint", str(out), "--prompts", str(prompts), "--steps", "4",
                      *eval_args, "--samples", "1", "--rewards", "hps", "--reward-options", str(tmp_path / "rewards.yaml"),
                      "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["n"] == 2
    return out, metrics


def brightness(images, prompts):
    """A scoring function reward (``family_e2e:brightness``) for runs in subprocesses: mean brightness."""
    return images.float().mean(dim=tuple(range(1, images.ndim)))
