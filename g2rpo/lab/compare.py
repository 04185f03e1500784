"""`python -m g2rpo.lab compare`: the paper's comparison (Tables 1, 2, 4 and Fig. 1a) on the lab world.

Every method trains from the same base model on the same prompts with the same seeds and
iteration budget; each gets its learning rate from the same grid (chosen on seed 0 by the
in-domain reward of ODE samples of the *training* prompts, never by a judge); then every
final policy is evaluated on the held-out paraphrases at 16, 8 and 4 ODE steps with the
in-domain rewards and the out-of-domain judges. Curves are ODE evaluations every
``eval_every`` iterations (rollout rewards of different strategies are not comparable).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import load_config
from ..distributed import rollout_mode
from ..train import Trainer
from .world import build_world, evaluate_lab, load_judge, load_rewards

__all__ = ["CompareSettings", "run_method", "compare"]

METHODS = ("dance_grpo", "flow_grpo", "mix_grpo", "g2rpo_no_mgai", "g2rpo")
IN_DOMAIN = ("digit_alignment", "digit_realism")
EVAL_STEPS = (16, 8, 4)


@dataclass
class CompareSettings:
    methods: tuple[str, ...] = METHODS
    seeds: int = 3
    iterations: int = 48
    lr_grid: tuple[float, ...] = (3e-5, 1e-4, 3e-4)
    eval_every: int = 8
    ablation: tuple[tuple[int, ...], ...] = ((1,), (1, 2), (1, 3), (1, 2, 3))
    overrides: dict = field(default_factory=dict)  # applied to every run (e.g. a smaller group for smoke tests)
    eval_per_class: int = 20  # final evaluation: held-out prompts x classes, at 16, 8, 4 steps
    curve_per_class: int = 10  # curve points: training prompts


def _score(ev: dict[str, float]) -> float:
    """The training reward's combination (alignment + realism, weights 1 and 1)."""
    return ev["digit_alignment"] + ev["digit_realism"]


def run_method(world: Path, method: str, seed: int, lr: float, iterations: int, out: Path, eval_every: int = 8,
               granularities: tuple[int, ...] | None = None, overrides: dict | None = None,
               judge=None, rewards=None, eval_per_class: int = 20, curve_per_class: int = 10) -> dict:
    """Train one method/seed/lr from the base model; returns curves, timings and final evaluations."""
    judge = judge or load_judge(world)
    rewards = rewards or load_rewards(world)
    o = {"model": {"path": str(world)}, "sampler": {"strategy": method}, "optim": {"lr": lr},
         "iterations": iterations, "seed": 42 + seed, "sampler_seed": 1223627 + seed, "output_dir": str(out),
         "checkpoint_every": 0, "export_final": False, "progress": False, "tensorboard": False, "image_every": 0}
    if method not in ("g2rpo", "g2rpo_no_mgai"):
        o["sampler"]["eta"] = None  # the baseline's published noise level
    if granularities is not None:
        o["sampler"]["granularities"] = list(granularities)
    for k, v in (overrides or {}).items():
        if isinstance(v, dict):
            o.setdefault(k, {}).update(v)
        else:
            o[k] = v
    cfg = load_config(None, o)
    trainer = Trainer(cfg, log=lambda *a, **k: None)

    def evaluate(steps: int, test: bool, per_class: int) -> dict[str, float]:
        with rollout_mode(trainer.module), trainer.autocast():
            return evaluate_lab(trainer.policy, world, per_class=per_class, steps=steps, test_prompts=test,
                                judge=judge, rewards=rewards)

    curve = [(0, _score(evaluate(16, False, curve_per_class)))]
    times, rows = [], []

    def callback(tr, m):
        times.append(m["time_iteration"])
        rows.append(m["forward_rows"])
        it = int(m["iteration"])
        if it % eval_every == 0 or it == iterations:
            curve.append((it, _score(evaluate(16, False, curve_per_class))))

    trainer.run(callback=callback)
    final = {str(s): evaluate(s, True, eval_per_class) for s in EVAL_STEPS}
    result = {"method": method, "seed": seed, "lr": lr, "granularities": granularities,
              "curve": curve, "sec_per_iter": float(np.mean(times)), "forward_rows_per_iter": float(np.mean(rows)),
              "train_score": curve[-1][1], "final": final}
    grid = _grid_images(trainer)
    result["_grid"] = grid
    return result


@torch.no_grad()
def _grid_images(trainer: Trainer) -> torch.Tensor:
    from .world import lab_prompts_for, sample_images

    labels = [c for c in range(10) for _ in range(8)]
    with rollout_mode(trainer.module):
        return sample_images(trainer.policy, lab_prompts_for(labels, test=True), steps=16, seed=777)


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def compare(out: str | Path, settings: CompareSettings, world: str | Path | None = None, log=print) -> dict:
    """Run the whole comparison into ``out``; returns the results dict (also ``out/results.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = Path(world) if world else build_world(log=None)
    judge, rewards = load_judge(world), load_rewards(world)
    t_start = time.perf_counter()
    base_policy_eval = _evaluate_base(world, judge, rewards, settings.eval_per_class, settings.curve_per_class)
    runs: dict[str, list[dict]] = {}
    lr_choice, lr_search = {}, {}
    grids = {}
    for method in settings.methods:
        search = {}
        for lr in settings.lr_grid:
            r = run_method(world, method, 0, lr, settings.iterations, out / "runs" / f"{method}_lr{lr:g}_s0",
                           settings.eval_every, overrides=settings.overrides, judge=judge, rewards=rewards,
                           eval_per_class=settings.eval_per_class, curve_per_class=settings.curve_per_class)
            search[lr] = r
            log(f"[{time.perf_counter() - t_start:6.0f}s] {method:14s} seed 0 lr {lr:g}: train score "
                f"{r['train_score']:.4f} ({r['sec_per_iter']:.2f} s/iter)")
        best = max(search, key=lambda lr: search[lr]["train_score"])
        lr_choice[method] = best
        lr_search[method] = {f"{lr:g}": search[lr]["train_score"] for lr in search}
        runs[method] = [search[best]]
        grids[method] = search[best].pop("_grid")
        for seed in range(1, settings.seeds):
            r = run_method(world, method, seed, best, settings.iterations, out / "runs" / f"{method}_s{seed}",
                           settings.eval_every, overrides=settings.overrides, judge=judge, rewards=rewards,
                           eval_per_class=settings.eval_per_class, curve_per_class=settings.curve_per_class)
            r.pop("_grid")
            runs[method].append(r)
            log(f"[{time.perf_counter() - t_start:6.0f}s] {method:14s} seed {seed} lr {best:g}: train score "
                f"{r['train_score']:.4f}")
        for r in search.values():
            r.pop("_grid", None)

    ablation = {}
    if "g2rpo" in lr_choice and settings.ablation:
        lr = lr_choice["g2rpo"]
        for lam in settings.ablation:
            key = "{" + ",".join(map(str, lam)) + "}"
            if tuple(lam) == tuple(load_config().sampler.granularities) and "g2rpo" in runs:
                ablation[key] = runs["g2rpo"]
                continue
            ablation[key] = []
            for seed in range(settings.seeds):
                r = run_method(world, "g2rpo", seed, lr, settings.iterations,
                               out / "runs" / f"g2rpo_lambda{'-'.join(map(str, lam))}_s{seed}", settings.eval_every,
                               granularities=tuple(lam), overrides=settings.overrides, judge=judge, rewards=rewards,
                               eval_per_class=settings.eval_per_class, curve_per_class=settings.curve_per_class)
                r.pop("_grid")
                ablation[key].append(r)
            log(f"[{time.perf_counter() - t_start:6.0f}s] ablation Lambda={key} done")

    results = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.__dict__.items()},
               "world": str(world), "base": base_policy_eval, "lr_choice": lr_choice, "lr_search": lr_search,
               "runs": runs, "ablation": ablation, "total_seconds": time.perf_counter() - t_start}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    _write_figures(out, results, grids)
    (out / "tables.md").write_text(tables_markdown(results))
    log(f"comparison written to {out} in {results['total_seconds']:.0f} s")
    return results


def _evaluate_base(world: Path, judge, rewards, eval_per_class: int, curve_per_class: int) -> dict:
    from .generator import load_lab_policy

    policy = load_lab_policy(world)
    return {"final": {str(s): evaluate_lab(policy, world, per_class=eval_per_class, steps=s, judge=judge,
                                           rewards=rewards) for s in EVAL_STEPS},
            "train_score": _score(evaluate_lab(policy, world, per_class=curve_per_class, steps=16, test_prompts=False,
                                               judge=judge, rewards=rewards))}


def _threshold(runs: list[dict], target: float) -> tuple[str, str]:
    """Mean (over seeds that get there) first evaluated iteration and seconds with train score >= target."""
    its, secs, reached = [], [], 0
    for r in runs:
        hit = next((it for it, s in r["curve"] if s >= target), None)
        if hit is not None:
            reached += 1
            its.append(hit)
            secs.append(hit * r["sec_per_iter"])
    if not reached:
        return "not reached", "-"
    return (f"{np.mean(its):.0f} ({reached}/{len(runs)} seeds)", f"{np.mean(secs):.0f}")


def tables_markdown(results: dict) -> str:
    runs, base = results["runs"], results["base"]
    cols = ("digit_alignment", "digit_realism", "judge_accuracy", "judge_realism", "diversity")
    lines = ["### Table 1 analogue: in-domain rewards and out-of-domain judges (16 ODE steps, held-out prompts, "
             "mean ± std over seeds)", "",
             "| method | lr | " + " | ".join(cols) + " | s / iter | forward rows / iter |",
             "|---|---|" + "---|" * (len(cols) + 2)]
    lines.append("| base model | - | " + " | ".join(f"{base['final']['16'][c]:.3f}" for c in cols) + " | - | - |")
    for m, rs in runs.items():
        lines.append(f"| {m} | {results['lr_choice'][m]:g} | "
                     + " | ".join(_mean_std([r["final"]["16"][c] for r in rs]) for c in cols)
                     + f" | {np.mean([r['sec_per_iter'] for r in rs]):.2f} | "
                       f"{np.mean([r['forward_rows_per_iter'] for r in rs]):.0f} |")
    if results["ablation"]:
        lines += ["", "### Table 2 analogue: granularities Lambda (G2RPO, same lr, 16 steps)", "",
                  "| Lambda | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for lam, rs in results["ablation"].items():
            lines.append(f"| {lam} | " + " | ".join(_mean_std([r["final"]["16"][c] for r in rs]) for c in cols) + " |")
    lines += ["", "### Table 4 analogue: fewer inference steps (judge accuracy / alignment + realism)", "",
              "| method | " + " | ".join(f"{s} steps" for s in EVAL_STEPS) + " |", "|---|" + "---|" * len(EVAL_STEPS)]
    lines.append("| base model | " + " | ".join(
        f"{base['final'][str(s)]['judge_accuracy']:.3f} / {_score(base['final'][str(s)]):.3f}" for s in EVAL_STEPS) + " |")
    for m, rs in runs.items():
        cells = []
        for s in EVAL_STEPS:
            acc = np.mean([r["final"][str(s)]["judge_accuracy"] for r in rs])
            sc = np.mean([_score(r["final"][str(s)]) for r in rs])
            cells.append(f"{acc:.3f} / {sc:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if "dance_grpo" in runs:
        target = float(np.mean([r["train_score"] for r in runs["dance_grpo"]]))
        lines += ["", f"### Fig. 1a analogue: iterations and seconds to reach DanceGRPO's final train score "
                      f"({target:.4f}, ODE evaluation every {results['settings']['eval_every']} iterations)", "",
                  "| method | iterations | seconds |", "|---|---|---|"]
        for m, rs in runs.items():
            it, sec = _threshold(rs, target)
            lines.append(f"| {m} | {it} | {sec} |")
    lines += ["", "### Learning-rate search (seed 0, train score = alignment + realism on training prompts)", "",
              "| method | " + " | ".join(f"lr {k}" for k in next(iter(results["lr_search"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(results["lr_search"].values())))]
    for m, d in results["lr_search"].items():
        lines.append(f"| {m} | " + " | ".join(f"{v:.4f}" for v in d.values()) + " |")
    lines += ["", "### Reward hacking check", ""]
    for m, rs in runs.items():
        d_align = np.mean([r["final"]["16"]["digit_alignment"] for r in rs]) - base["final"]["16"]["digit_alignment"]
        d_judge = np.mean([r["final"]["16"]["judge_accuracy"] for r in rs]) - base["final"]["16"]["judge_accuracy"]
        d_div = np.mean([r["final"]["16"]["diversity"] for r in rs]) - base["final"]["16"]["diversity"]
        verdict = ("alignment rose while the out-of-domain judge fell: reward hacking" if d_align > 0 > d_judge
                   else "alignment and judge moved together")
        lines.append(f"- {m}: alignment {d_align:+.3f}, judge accuracy {d_judge:+.3f}, diversity {d_div:+.3f} "
                     f"-> {verdict}")
    return "\n".join(lines) + "\n"


def _write_figures(out: Path, results: dict, grids: dict[str, torch.Tensor]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import save_image

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, rs in results["runs"].items():
        its = [it for it, _ in rs[0]["curve"]]
        vals = np.array([[s for _, s in r["curve"]] for r in rs])
        mean, std = vals.mean(0), vals.std(0)
        ax.plot(its, mean, label=m)
        ax.fill_between(its, mean - std, mean + std, alpha=0.2)
    ax.axhline(results["base"]["train_score"], color="gray", ls="--", lw=1, label="base model")
    ax.set_xlabel("iteration")
    ax.set_ylabel("alignment + realism (ODE, 16 steps)")
    ax.set_title("Lab world: in-domain reward vs iteration (band: ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    (out / "grids").mkdir(exist_ok=True)
    for m, images in grids.items():
        big = torch.nn.functional.interpolate(images[:, None], scale_factor=4, mode="nearest")
        save_image(big, out / "grids" / f"{m}.png", nrow=8, padding=2, pad_value=0.5)
