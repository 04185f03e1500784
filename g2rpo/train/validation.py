"""Validation during training (the ``eval:`` section): ODE samples of held-out prompts on fixed noise, scored by
their own rewards, at iteration 0 (the base model) and every ``eval.every`` iterations.

* Every rank samples its share of the prompts (the shares padded to one length: sharded forwards are collective);
  the scores are reduced over ranks. The evaluation draws from no global RNG stream (its noise comes from its own
  generators, and the RNG state is restored after it), so turning it on leaves the training run's metrics unchanged.
* Logged under ``eval/``: each reward's mean and std, per prompt group for a reward that groups prompts (the scenes
  judges: GenEval's categories), the within-prompt diversity (mean pairwise distance of a prompt's samples: cosine
  distance of CLIP image embeddings where a CLIP-like reward is configured, else RMS pixel distance), the cost
  (``eval/cost_rows``: ODE rows, never part of the training cost nor of ``max_cost``), a labelled grid (and a GIF
  for video) of the first ``grid_prompts`` prompts, the same noise every time.
* Reward hacking: when the training reward rose and an eval reward fell over ``hacking_patience`` evaluations in a
  row, one warning line names both and the iterations, and ``eval/hacking_suspected`` is 1.
* ``keep_best: eval/<reward>``: the best evaluation so far is exported to ``output_dir/best`` (``best.json`` says
  which iteration and value), beside ``final/``.
* A stateful component: the last evaluated iteration, the best value and the history travel in checkpoints, so a
  resumed run neither evaluates twice nor forgets its streaks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import rng_state, set_rng_state
from ..config import ConfigError, RewardSpec, TrainConfig
from ..distributed import DistContext
from ..rewards.diversity import diversity
from .setup import schedule_sigmas

__all__ = ["Validator", "sample_and_score", "eval_specs", "eval_prompt_source", "hacking_streaks", "diversity"]


def eval_prompt_source(cfg: TrainConfig) -> str:
    """``eval.prompts``, or the family's held-out set; ConfigError when neither exists."""
    from ..models.registry import family

    source = cfg.eval.prompts or family(cfg.model.kind).eval_prompts
    if source is None:
        raise ConfigError(f"eval.prompts: set a held-out prompt file ({family(cfg.model.kind).title} has no built-in "
                          "held-out set), e.g. eval.prompts=prompts/test.txt")
    return source


def eval_specs(cfg: TrainConfig) -> list[RewardSpec]:
    """``eval.rewards``, or the family's judges (the lab worlds'), or the training rewards."""
    from ..models.registry import family

    if cfg.eval.rewards:
        return list(cfg.eval.rewards)
    own = family(cfg.model.kind).eval_rewards
    return [RewardSpec(name=n) for n in own] if own else list(cfg.rewards)


def _noise(policy, positions: Sequence[int], samples: int, seed: int, device) -> torch.Tensor:
    from .setup import seed_of

    return torch.cat([policy.prepare_latents(1, torch.Generator(device=device).manual_seed(seed_of(seed, p, s)),
                                             device=device) for p in positions for s in range(samples)])


@torch.no_grad()
def sample_and_score(policy, prompts: list[str], positions: list[int], rewards: list[tuple[str, Any]],
                     sigmas: torch.Tensor, seed: int, max_batch: int, device, samples: int = 1
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scores per reward ``[N * samples]`` and the images (prompt-major: each prompt's samples together) of ODE
    samples on ``sigmas``; the noise of (prompt position p, sample s) is seeded by ``(seed, p, s)`` alone."""
    from ..rollout.engine import RolloutEngine

    noise = _noise(policy, positions, samples, seed, device)
    rows = [p for p in prompts for _ in range(samples)]
    engine = RolloutEngine(policy, num_steps=len(sigmas) - 1, max_batch=max_batch, sigmas=sigmas)
    images = policy.decode(engine.sample_ode(noise, policy.encode_prompts(rows)))
    scores = {name: model.score(images, rows).float().cpu() for name, model in rewards}
    return scores, images.cpu()


def hacking_streaks(history: list[dict[str, float]], train_keys: Sequence[str], eval_keys: Sequence[str],
                    patience: int) -> list[tuple[str, str, int]]:
    """``[(training reward, eval reward, first iteration of the streak)]`` for the pairs whose training reward
    rose and eval reward fell at each of the last ``patience`` evaluations of ``history`` (records with
    ``iteration``, the training rewards' means since the previous evaluation, and the eval rewards)."""
    if len(history) < patience + 1:
        return []
    recent = history[-(patience + 1):]
    out = []
    for t in train_keys:
        for e in eval_keys:
            if e.split("/", 1)[1] == t.split("/", 1)[1]:
                continue  # the training reward on held-out prompts: not a sign of hacking
            pairs = list(zip(recent[:-1], recent[1:]))
            if all(a.get(t) is not None and b.get(t) is not None and b[t] > a[t] and b[e] < a[e] for a, b in pairs):
                out.append((t, e, int(recent[0]["iteration"])))
    return out


class Validator:
    """The ``eval:`` section at work (a checkpointed component)."""

    def __init__(self, cfg: TrainConfig, policy, ctx: DistContext, base_path: Path,
                 train_rewards: Sequence[tuple[str, Any, float]] = (), log=print) -> None:
        self.cfg, self.e, self.policy, self.ctx, self.log = cfg, cfg.eval, policy, ctx, log
        self.enabled = cfg.eval.every > 0
        self.last: int | None = None  # the newest evaluated iteration
        self.best: tuple[int, float] | None = None  # keep_best: (iteration, value)
        self.history: list[dict[str, float]] = []  # per evaluation: iteration, training means, eval means
        self.cost_rows = 0.0
        self.warned: set[tuple[str, str]] = set()
        self.pending: dict[str, list[float]] = {}  # the training rewards since the last evaluation: [sum, count]
        if not self.enabled:
            return
        from ..models.registry import family
        from ..prompts import load_prompts
        from ..rewards.configured import build_rewards
        from ..rewards.registry import takes_prompt_file

        source = eval_prompt_source(cfg)
        self.prompts = load_prompts(source)[: cfg.eval.max_prompts]
        if family(cfg.model.kind).prompt_images:  # image-to-video: the held-out prompts' images join the training's
            from ..prompts import load_prompt_images

            policy.set_prompt_images({**getattr(policy, "prompt_images", {}), **load_prompt_images(source)})
        built = {self._key(spec): model for spec, (_, model, _) in zip(cfg.rewards, train_rewards)}
        self.rewards = []  # a reward the training already loaded is shared, not loaded twice
        for spec in eval_specs(cfg):  # a reward reading the prompt file (first_frame) reads the held-out one
            model = None if takes_prompt_file(spec.name) else built.get(self._key(spec))
            if model is None:
                (_, model, _), = build_rewards([spec], cfg.model, base_path, prompt_file=source)
            self.rewards.append((f"eval/{spec.metric_name}", model))
        self.steps = cfg.eval.steps or family(cfg.model.kind).defaults.eval_steps or cfg.sampler.num_steps
        self.sigmas = schedule_sigmas(cfg, policy, self.steps)
        self.groups = {}
        for name, model in self.rewards:  # a reward that groups prompts (GenEval's categories) reports per group
            group_of = getattr(getattr(model, "model", model), "prompt_group", None)
            if group_of is not None:
                self.groups[name] = [group_of(p) for p in self.prompts]
        # the diversity's features: a CLIP-like image embedding among the rewards (eval ones first), else pixels
        self.features = next((inner.image_features for inner in (getattr(m, "model", m) for m in
                              [m for _, m in self.rewards] + [m for _, m, _ in train_rewards])
                              if hasattr(inner, "image_features")), None)

    @staticmethod
    def _key(spec: RewardSpec) -> str:
        return json.dumps([spec.name, spec.options, spec.frames], sort_keys=True, default=str)

    # ---- when ---------------------------------------------------------------------------
    def due(self, iteration: int, last_iteration: bool = False) -> bool:
        """Evaluate after ``iteration`` completed iterations (0: the base model)?"""
        if not self.enabled or (self.last is not None and iteration <= self.last):
            return False
        return iteration % self.e.every == 0 or (last_iteration and iteration > 0)

    def observe(self, m: dict[str, float]) -> None:
        """An iteration's (reduced) metrics: its training rewards' means count towards the next evaluation's."""
        if not self.enabled:
            return
        for k, v in m.items():
            if k.startswith("reward/") and k.count("/") == 1:
                acc = self.pending.setdefault(k, [0.0, 0.0])
                acc[0] += float(v)
                acc[1] += 1.0

    def take_train_means(self) -> dict[str, float]:
        """The training rewards' means since the previous evaluation (then forgotten)."""
        out = {k: s / n for k, (s, n) in self.pending.items() if n}
        self.pending = {}
        return out

    # ---- one evaluation -----------------------------------------------------------------
    def _my_positions(self) -> tuple[list[int], int]:
        """This rank's prompt positions, padded (with its first) to the longest share; and how many are real."""
        mine = list(range(self.ctx.rank, len(self.prompts), self.ctx.world))
        longest = -(-len(self.prompts) // self.ctx.world)
        real = len(mine)
        return mine + [mine[0] if mine else 0] * (longest - real), real

    @torch.no_grad()
    def evaluate(self, iteration: int, train_means: dict[str, float], module, autocast, out: Path,
                 on_grid: Callable[[Path, Path | None], None]) -> dict[str, float]:
        """Evaluate the policy now; ``train_means``: the training rewards' means since the previous evaluation
        (empty at iteration 0). Returns the ``eval/`` metrics (the same on every rank)."""
        from ..distributed import rollout_mode

        rng = rng_state()  # nothing below may move a training RNG stream
        t0 = time.perf_counter()
        S = self.e.samples
        positions, real = self._my_positions()
        per_batch = max(1, self.cfg.sampler.max_batch // S)
        scores: dict[str, list[torch.Tensor]] = {n: [] for n, _ in self.rewards}
        feats, grid = [], []
        with rollout_mode(module), autocast():
            for lo in range(0, len(positions), per_batch):
                pos = positions[lo:lo + per_batch]
                s, images = sample_and_score(self.policy, [self.prompts[i] for i in pos], pos, self.rewards,
                                             self.sigmas, self.e.seed, per_batch * S, self.ctx.device, S)
                keep = max(0, min(len(pos), real - lo)) * S  # padding rows are scored by no one
                for n in scores:
                    scores[n].append(s[n][:keep])
                images = images[:keep]
                frames = images[:, :, 0] if images.ndim == 5 else images
                feats.append(self.features(frames) if self.features is not None else frames.flatten(1))
                grid += [(i, images[j * S:(j + 1) * S]) for j, i in enumerate(pos[: keep // S])
                         if i < self.e.grid_prompts]
        m = self._reduce(scores, positions[:real], torch.cat(feats) if feats else torch.zeros(0, 1))
        self.cost_rows += float(len(self.prompts) * S * self.steps * self.policy.transformer_rows_per_row)
        m["eval/cost_rows"] = self.cost_rows
        m["eval/time"] = time.perf_counter() - t0
        self._grid(iteration, grid, out, on_grid)
        self._watch(iteration, train_means, m)
        set_rng_state(rng)
        self.last = iteration
        return m

    def _reduce(self, scores: dict[str, list[torch.Tensor]], mine: list[int], feats: torch.Tensor
                ) -> dict[str, float]:
        """Sums over ranks: each reward's mean and std, per group, and the diversity."""
        keys, vals = [], []
        groups_of_rows = {n: [g[i] for i in mine for _ in range(self.e.samples)] for n, g in self.groups.items()}
        for n, parts in scores.items():
            x = torch.cat(parts).double() if parts else torch.zeros(0, dtype=torch.float64)
            keys += [(n, "n"), (n, "s"), (n, "ss")]
            vals += [float(x.numel()), float(x.sum()), float((x * x).sum())]
            for g in sorted(set(self.groups.get(n, []))):
                sel = torch.tensor([gr == g for gr in groups_of_rows[n]], dtype=torch.bool)
                keys += [(f"{n}/{g}", "n"), (f"{n}/{g}", "s")]
                vals += [float(sel.sum()), float(x[sel].sum()) if sel.numel() else 0.0]
        div = diversity(feats, self.e.samples, cosine=self.features is not None) if self.e.samples > 1 else 0.0
        keys += [("eval/diversity", "s"), ("eval/diversity", "n")]
        has = len(mine) > 0 and self.e.samples > 1 and div == div
        vals += [div * len(mine) if has else 0.0, float(len(mine)) if has else 0.0]
        total = torch.tensor(vals, dtype=torch.float64, device=self.ctx.device)
        total = self.ctx.all_reduce_sum(total).cpu().tolist()
        sums = dict(zip(keys, total))
        m: dict[str, float] = {}
        for (name, kind), v in sums.items():
            if kind != "n":
                continue
            n = max(v, 1.0)
            mean = sums[(name, "s")] / n
            m[name] = mean
            if (name, "ss") in sums:
                m[f"{name}_std"] = max(sums[(name, "ss")] / n - mean * mean, 0.0) ** 0.5
        if sums[("eval/diversity", "n")] == 0:
            m.pop("eval/diversity", None)
        return m

    def _grid(self, iteration: int, grid: list[tuple[int, torch.Tensor]], out: Path, on_grid) -> None:
        """The labelled grid of the first prompts (gathered on the main rank)."""
        if not self.e.grid_prompts:
            return
        if self.ctx.enabled:
            import torch.distributed as dist

            parts = [None] * self.ctx.world
            dist.all_gather_object(parts, grid)
            grid = [g for part in parts for g in part]
        if not self.ctx.is_main or not grid:
            return
        from .logs import save_prompt_grid, save_video_gif

        grid.sort(key=lambda g: g[0])
        images = torch.cat([g[1] for g in grid]).float()
        path, gif = out / "images" / f"eval_iter_{iteration:06d}.png", None
        if images.ndim == 5:
            gif = path.with_suffix(".gif")
            save_video_gif(gif, images, self.e.samples)
            images = images[:, :, 0]
        save_prompt_grid(path, images, [self.prompts[i] for i, _ in grid], self.e.samples)
        on_grid(path, gif)

    def _watch(self, iteration: int, train_means: dict[str, float], m: dict[str, float]) -> None:
        """The hacking check and keep_best's bookkeeping (every rank alike: the metrics are reduced)."""
        eval_keys = [n for n, _ in self.rewards]
        self.history.append({"iteration": float(iteration), **train_means, **{k: m[k] for k in eval_keys}})
        found = hacking_streaks(self.history, list(train_means), eval_keys, self.e.hacking_patience)
        m["eval/hacking_suspected"] = float(bool(found))
        for t, e, start in found:
            if (t, e) not in self.warned:
                self.warned.add((t, e))
                self.log(f"warning: reward hacking suspected: {t} rose while {e} fell at each of the last "
                         f"{self.e.hacking_patience} evaluations (iterations {start} to {iteration})")
        for t, e in list(self.warned):  # a pair warns again only after its streak broke
            if not any((t, e) == (a, b) for a, b, _ in found):
                self.warned.discard((t, e))

    def step(self, iteration: int, m: dict[str, float] | None, module, autocast, out: Path, runlog,
             export: Callable[[Path, int], Path]) -> None:
        """Evaluate after ``iteration`` iterations: the metrics into the iteration's ``m`` (iteration 0, the base
        model: a record of its own in ``runlog``), the grid to ``runlog``; ``keep_best`` exports an improvement
        with ``export(folder, iteration)``."""
        em = self.evaluate(iteration, self.take_train_means(), module, autocast, out,
                           lambda path, gif: runlog.images(iteration, path, gif, tag="eval"))
        if m is None:
            runlog.write({"iteration": iteration, **em})
        else:
            m.update(em)
        if iteration > 0 and self.improved(em, iteration):
            self.write_best(export(out / "best", iteration))

    def improved(self, m: dict[str, float], iteration: int) -> bool:
        """``keep_best``: whether this evaluation is the best so far (then remembered)."""
        key = self.e.keep_best
        if key is None:
            return False
        if key not in m:
            raise ConfigError(f"eval.keep_best: {key} is not an evaluation metric; have "
                              f"{', '.join(k for k in m if not k.endswith(('_std', 'time', 'cost_rows')))}")
        if self.best is None or m[key] > self.best[1]:
            self.best = (iteration, float(m[key]))
            return True
        return False

    def write_best(self, folder: Path) -> None:
        """``best.json`` beside the export (main rank)."""
        if self.ctx.is_main and self.best is not None:
            (folder / "best.json").write_text(json.dumps({"metric": self.e.keep_best, "iteration": self.best[0],
                                                          "value": self.best[1]}, indent=1))

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last, "best": list(self.best) if self.best else None, "history": list(self.history),
                "cost_rows": self.cost_rows, "pending": {k: list(v) for k, v in self.pending.items()},
                "warned": sorted(self.warned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last = state.get("last")
        self.best = tuple(state["best"]) if state.get("best") else None
        self.history = list(state.get("history", []))
        self.cost_rows = float(state.get("cost_rows", 0.0))
        self.pending = {k: list(v) for k, v in state.get("pending", {}).items()}
        self.warned = {tuple(p) for p in state.get("warned", [])}
