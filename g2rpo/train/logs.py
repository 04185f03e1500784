"""What a run writes besides checkpoints: ``metrics.jsonl``, TensorBoard, wandb, ``config.json`` and
image grids of fixed prompts with fixed noise (comparable from one grid to the next)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig, config_to_dict

__all__ = ["RunLog", "draw_labelled_rows", "read_metrics", "human_config", "save_prompt_grid", "save_video_gif"]

#: ModelConfig fields that only a diffusers pipeline family uses (a family's own options are written only when set).
_PIPELINE_ONLY = ("guidance_scale", "height", "width", "max_sequence_length")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path``; a line that does not parse (a write cut short by a crash) is
    skipped with a warning instead of making every resume fail."""
    out = []
    if not path.is_file():
        return out
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{n}: skipping a line that is not valid JSON (a write cut short?)", stacklevel=2)
    return out


def human_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as ``config.json`` records it: without the pipeline-only model fields for a family that
    sets them itself (the lab world)."""
    from ..models.registry import family

    d = config_to_dict(cfg)
    if not family(cfg.model.kind).pipeline_settings:
        for key in _PIPELINE_ONLY:
            d["model"].pop(key, None)
    return d


class RunLog:
    """Main-rank writer of metrics (JSONL, TensorBoard, wandb); a no-op on other ranks."""

    def __init__(self, out: Path, cfg: TrainConfig, is_main: bool, start_iteration: int, log=print) -> None:
        self.out, self.cfg, self.is_main = out, cfg, is_main
        self._jsonl = self._tb = self._wandb = None
        if not is_main:
            return
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(human_config(cfg), indent=1))
        metrics = out / "metrics.jsonl"
        if metrics.exists():  # keep what the resumed-from checkpoint covers, drop the lost tail
            kept = [m for m in read_metrics(metrics) if m.get("iteration", 0) <= start_iteration]
            metrics.write_text("".join(json.dumps(m) + "\n" for m in kept))
        self._jsonl = metrics.open("a")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run drops the events past its checkpoint (no duplicate steps in TensorBoard)
                self._tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_iteration + 1 if start_iteration
                                         else None)
            except ImportError:  # preflight refuses tensorboard=true without it; a library caller gets a note
                log("tensorboard requested but not installed: pip install tensorboard")
        if cfg.wandb:  # preflight checked that wandb imports
            import wandb

            id_file = out / "wandb_run_id"  # a resumed run continues the same wandb run
            run_id = id_file.read_text().strip() if start_iteration and id_file.is_file() else None
            if not run_id:
                import secrets

                run_id = secrets.token_hex(4)  # the 8 characters of a wandb run id
                id_file.write_text(run_id)
            self._wandb = wandb.init(project=cfg.wandb_project, config=config_to_dict(cfg), dir=str(out), id=run_id,
                                     resume="allow")

    def write(self, m: dict[str, float]) -> None:
        if not self.is_main:
            return
        self._jsonl.write(json.dumps(m) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in m.items():
                if k != "iteration" and v is not None:
                    self._tb.add_scalar(k, v, m["iteration"])
        if self._wandb is not None:
            self._wandb.log(m, step=m["iteration"])

    def images(self, iteration: int, png: Path, gif: Path | None = None, tag: str = "samples") -> None:
        """Send a saved image grid (and a video grid's animated GIF) to TensorBoard and wandb, as ``<tag>/grid``
        (and ``<tag>/video``)."""
        if not self.is_main:
            return
        if self._tb is not None:
            import numpy as np
            from PIL import Image

            self._tb.add_image(f"{tag}/grid", np.asarray(Image.open(png).convert("RGB")), iteration,
                               dataformats="HWC")
            if gif is not None:  # TensorBoard's image dashboard plays an encoded GIF (as add_video writes it)
                from tensorboard.compat.proto.summary_pb2 import Summary

                with Image.open(gif) as im:
                    w, h = im.size
                image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif.read_bytes())
                self._tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=f"{tag}/video",
                                                                                     image=image)]), iteration)
            self._tb.flush()
        if self._wandb is not None:
            import wandb

            media = {f"{tag}/grid": wandb.Image(str(png))}
            if gif is not None:
                media[f"{tag}/video"] = wandb.Video(str(gif), format="gif")
            self._wandb.log(media, step=iteration)

    def close(self) -> None:
        for w in (self._jsonl, self._tb):
            if w is not None:
                w.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl = self._tb = self._wandb = None


def draw_labelled_rows(ax, images: torch.Tensor, labels: list[str], per_row: int, title: str, pad: int = 1,
                       label_size: float | None = None) -> None:
    """Draw ``images [N, C, H, W]`` (or ``[N, H, W]``) in [0, 1] on ``ax``: one row per label, ``per_row``
    images each, on a grey canvas, each row labelled on the left."""
    if images.ndim == 3:
        images = images[:, None]
    images = images.float().cpu()
    n, c, h, w = images.shape
    rows = len(labels)
    canvas = torch.full((c, rows * (h + pad), per_row * (w + pad)), 0.5)
    for i in range(n):
        r, col = divmod(i, per_row)
        canvas[:, r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = images[i]
    arr = canvas.permute(1, 2, 0).numpy()
    ax.imshow(arr[..., 0] if c == 1 else arr.clip(0, 1), cmap="gray" if c == 1 else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_yticks([r * (h + pad) + h / 2 for r in range(rows)], labels, fontsize=label_size)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)


@torch.no_grad()
def save_prompt_grid(path: Path, images: torch.Tensor, prompts: list[str], per_prompt: int, min_px: int = 96) -> None:
    """``images [len(prompts) * per_prompt, C, H, W]`` in [0, 1] as one labelled row per prompt,
    upscaled (nearest) to at least ``min_px`` pixels a side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if images.ndim == 3:
        images = images[:, None]
    scale = max(1, -(-min_px // images.shape[-1]))
    big = torch.nn.functional.interpolate(images.float().cpu(), scale_factor=scale, mode="nearest")
    h, w = big.shape[-2:]
    fig, ax = plt.subplots(figsize=(max(4.0, per_prompt * w / 60 + 3), len(prompts) * h / 60 + 0.6))
    draw_labelled_rows(ax, big, [p if len(p) <= 40 else p[:37] + "..." for p in prompts], per_prompt, path.stem,
                       pad=2, label_size=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")  # long prompt labels stay inside the image
    plt.close(fig)


@torch.no_grad()
def save_video_gif(path: Path, videos: torch.Tensor, per_row: int, min_px: int = 96, fps: int = 8) -> None:
    """``videos [N, C, F, H, W]`` in [0, 1] as one animated GIF of the grid (``per_row`` videos a row)."""
    from PIL import Image
    from torchvision.utils import make_grid

    n, c, f, h, w = videos.shape
    scale = max(1, -(-min_px // w))
    frames = []
    for t in range(f):
        grid = make_grid(videos[:, :, t].float().cpu(), nrow=per_row, padding=2, pad_value=0.5)
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
        arr = (grid.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        frames.append(Image.fromarray(arr[..., 0] if c == 1 else arr))
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)


@torch.no_grad()
def save_sample_grid(path: Path, policy, engine, prompt_list: list[str], seed: int, ctx, on_saved,
                     per_prompt: int = 4) -> None:
    """ODE samples (``engine.sample_ode``) of up to 8 fixed prompts spread over ``prompt_list``, ``per_prompt``
    each, from noise seeded by ``seed``: the same every time, so drift shows. The main rank writes the labelled
    grid to ``path`` (videos: also an animated GIF beside it) and calls ``on_saved(path, gif_or_None)``."""
    prompts = list(dict.fromkeys(prompt_list[:: max(1, len(prompt_list) // 8)]))[:8]
    rows = [p for p in prompts for _ in range(per_prompt)]
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    noise = policy.prepare_latents(len(rows), g, device=ctx.device)
    latents = engine.sample_ode(noise, policy.encode_prompts(rows))
    if not ctx.is_main:
        return
    images, gif = policy.decode(latents), None
    if images.ndim == 5:  # videos: an animated GIF, and the first frames as the labelled grid
        gif = path.with_suffix(".gif")
        save_video_gif(gif, images, per_prompt)
        images = images[:, :, 0]
    save_prompt_grid(path, images, prompts, per_prompt)
    on_saved(path, gif)


class ProgressBar:
    """tqdm over the iterations (main rank, ``progress: true``) named ``name`` (the strategy trained), showing the
    first reward and the first ratio's deviation; a no-op otherwise."""

    def __init__(self, enabled: bool, total: int, initial: int, name: str = "g2rpo") -> None:
        self.bar = None
        if enabled:
            import sys

            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=name, dynamic_ncols=True, file=sys.stdout)

    def update(self, m: dict[str, float]) -> None:
        if self.bar is None:
            return
        main_reward = next(k for k in m if k.startswith("reward/") and k.count("/") == 1)
        self.bar.set_postfix({main_reward.split("/")[1]: f"{m[main_reward]:.4f}",
                              "ratio_dev": f"{m['ratio_first_max_dev']:.1e}"})
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
