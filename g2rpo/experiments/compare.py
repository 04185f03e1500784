"""`python -m g2rpo.experiments compare` (also `python -m g2rpo.lab compare`): the paper's comparison (Tables 1, 4 and Fig. 1a) on the lab world,
under both preset families (``configs/methods/<method>-{paper,official}.yaml``).

Every method trains from the same base model on the same prompts with the same seeds and
iteration budget, with its family's preset method keys at lab scale (the same T, group size,
candidate steps and prompts for everyone: ``CompareSettings.lab_scale``), at every learning rate
of the grid. The best-lr table takes, per method, the lr with the best in-domain reward of ODE
samples of the *training* prompts on seed 0 (never a judge); the equal-lr table shows every
method at each lr. Final policies are evaluated on the held-out paraphrases at 16, 8 and 4 ODE
steps with the in-domain rewards and the out-of-domain judges. Curves are ODE evaluations every
``eval_every`` iterations (rollout rewards of different strategies are not comparable). The
``paper_sde`` variant runs the two G2RPO methods with the paper preset but the public code's
``per_sde_step`` update schedule, so the effect of the active clip is seen alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..config import default_config_path, load_config
from ..distributed import rollout_mode
from ..train import Trainer
from ..train.logs import draw_labelled_rows
from ..lab.world import build_world, evaluate_lab, load_judge, load_rewards

__all__ = ["LAB_WORLD", "CompareSettings", "run_method", "compare", "preset_path"]

METHODS = ("dance_grpo", "flow_grpo", "mix_grpo", "g2rpo_no_mgai", "g2rpo")
FAMILIES = ("paper", "official")
IN_DOMAIN = ("digit_alignment", "digit_realism")
EVAL_STEPS = (16, 8, 4)
COLS = ("digit_alignment", "digit_realism", "judge_accuracy", "judge_realism", "diversity")
DIGITS = [str(d) for d in range(10)]  # the grids' row labels
#: The cheaper G2RPO variants of the equal-compute comparison (issue 21): name -> (preset method, family,
#: overrides). Each reduces to G2RPO when its option is off.
CHEAPER_VARIANTS = {
    "g2rpo_subset2": ("g2rpo", "paper", {"sampler": {"sde_subset": 2}}),  # 2 random steps of M per iteration
    "g2rpo_x0": ("g2rpo", "paper", {"sampler": {"granularities": [15]}}),  # score the one-step x0 prediction
    "g2rpo_coarse": ("g2rpo", "paper", {"sampler": {"granularities": [2, 4]}}),  # no lambda = 1 continuation
    "g2rpo_efficient": ("g2rpo", "efficient", {}),  # configs/methods/g2rpo-efficient.yaml
    # later SDE steps branch from the previous step's first branch (shared continuations across k)
    "g2rpo_chain": ("g2rpo", "paper", {"sampler": {"chain_sources": True}}),
    "g2rpo_coarse_chain": ("g2rpo", "paper", {"sampler": {"granularities": [2, 4], "chain_sources": True}}),
    # stop evaluating a granularity that ranks the branches like the finest (Spearman > 0.8 for 4 iterations)
    "g2rpo_auto": ("g2rpo", "paper", {"sampler": {"auto_granularity_threshold": 0.8,
                                                  "auto_granularity_window": 4}}),
}
PAPER_ORDER = ("g2rpo", "g2rpo_no_mgai", "mix_grpo", "dance_grpo")  # Table 1, best first


@dataclass
class CompareSettings:
    methods: tuple[str, ...] = METHODS
    families: tuple[str, ...] = FAMILIES
    seeds: int = 3
    iterations: int = 32
    lr_grid: tuple[float, ...] = (1e-4, 3e-4)
    eval_every: int = 8
    per_sde_step_variant: bool = True  # paper preset + per_sde_step for g2rpo / g2rpo_no_mgai at their best lr
    # the same scale for every method and family (the presets' T, G and M are Flux-scale)
    lab_scale: dict = field(default_factory=lambda: {"sampler": {"num_steps": 16, "group_size": 8,
                                                                 "sde_indices": [0, 1, 2, 3], "max_batch": 512}})
    overrides: dict = field(default_factory=dict)  # applied to every run after lab_scale (smoke tests)
    # train every run to this cumulative cost (forward-row equivalents; iterations is then an upper bound)
    budget: float | None = None
    # extra rows: name -> (preset method, preset family, overrides), e.g. the cheaper G2RPO variants
    variants: dict = field(default_factory=dict)
    eval_per_class: int = 20  # final evaluation: held-out prompts x classes, at 16, 8, 4 steps
    curve_per_class: int = 10  # curve points: training prompts


#: What the lab comparison resets after a preset: a preset that carries its codebase's whole setting (Flow-GRPO's:
#: model size, LoRA, rewards, prompts per iteration, the pipeline's dynamic shift) is compared at lab scale on the
#: lab's own model settings, rewards and prompts; its method keys (sampler, loss, advantage, optim, EMA) stay.
LAB_WORLD = {"model": {"dtype": "float32", "cfg_detach_uncond": False, "height": None, "width": None,
                       "max_sequence_length": None, "guidance_scale": None},
             "lora": {"enabled": False}, "sampler": {"dynamic_shift": False},
             "rewards": [{"name": "digit_alignment", "weight": 1.0}, {"name": "digit_realism", "weight": 1.0}],
             "data": {"prompts": "builtin:lab", "prompts_per_iteration": 8}}


def preset_path(method: str, family: str) -> Path:
    """``configs/methods/<method>-<family>.yaml`` (shipped as ``g2rpo.configs``)."""
    return Path(str(resources.files("g2rpo.configs").joinpath("methods", f"{method}-{family}.yaml")))


def _score(ev: dict[str, float]) -> float:
    """The training reward's combination (alignment + realism, weights 1 and 1)."""
    return ev["digit_alignment"] + ev["digit_realism"]


def _deep_update(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_method(world: Path, method: str, seed: int, lr: float, iterations: int, out: Path, eval_every: int = 8,
               family: str = "paper", overrides: dict | None = None, judge=None, rewards=None,
               eval_per_class: int = 20, curve_per_class: int = 10, budget: float | None = None) -> dict:
    """Train one method (its ``family`` preset over the lab config) from the base model; returns curves (score
    against iterations, cumulative cost and seconds), timings, the mean clip fraction and final evaluations.
    ``budget``: train to that cumulative cost (``max_cost``; ``iterations`` is then an upper bound)."""
    judge = judge or load_judge(world)
    rewards = rewards or load_rewards(world)
    o = {"model": {"path": str(world)}, "optim": {"lr": lr}, "iterations": iterations, "seed": 42 + seed,
         "sampler_seed": 1223627 + seed, "output_dir": str(out), "overwrite": True, "checkpoint_every": 0,
         "export_final": False, "progress": False, "tensorboard": False, "image_every": 0}
    if budget is not None:
        o["max_cost"] = float(budget)
    o = _deep_update(_deep_update(LAB_WORLD, o), overrides or {})
    cfg = load_config([default_config_path(), preset_path(method, family)], o)
    trainer = Trainer(cfg, log=lambda *a, **k: None)

    def evaluate(steps: int, test: bool, per_class: int) -> dict[str, float]:
        with rollout_mode(trainer.module), trainer.autocast():
            return evaluate_lab(trainer.policy, world, per_class=per_class, steps=steps, test_prompts=test,
                                judge=judge, rewards=rewards)

    curve = [(0, _score(evaluate(16, False, curve_per_class)))]
    cost_curve = [(0.0, 0.0, curve[0][1])]  # (cumulative cost, cumulative seconds, score)
    times, rows, clips, opt_steps, costs = [], [], [], [], []

    def callback(tr, m):
        times.append(m["time_iteration"])
        rows.append(m["forward_rows"])
        clips.append(m["clip_frac"])
        opt_steps.append(m["optimizer_steps"])
        costs.append(m["cost/iteration"])
        it = int(m["iteration"])
        if it % eval_every == 0 or it == iterations or tr.budget_spent:
            curve.append((it, _score(evaluate(16, False, curve_per_class))))
            cost_curve.append((m["cost"], float(np.sum(times)), curve[-1][1]))

    trainer.run(callback=callback)
    final = {str(s): evaluate(s, True, eval_per_class) for s in EVAL_STEPS}
    result = {"method": method, "family": family, "seed": seed, "lr": lr, "curve": curve,
              "sec_per_iter": float(np.mean(times)), "forward_rows_per_iter": float(np.mean(rows)),
              "clip_frac": float(np.mean(clips)), "optimizer_steps_per_iter": float(np.mean(opt_steps)),
              "train_score": curve[-1][1], "final": final, "_grid": _grid_images(trainer),
              "cost_curve": cost_curve, "cost_per_iter": float(np.mean(costs)), "iterations_run": len(costs),
              "total_cost": float(np.sum(costs))}
    return result


@torch.no_grad()
def _grid_images(trainer: Trainer, per_digit: int = 6) -> torch.Tensor:
    """ODE samples of the held-out prompts: ``[10 * per_digit, S, S]``, digit-major (fixed noise)."""
    from ..lab.world import lab_prompts_for, sample_images

    labels = [c for c in range(10) for _ in range(per_digit)]
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
    base_eval = _evaluate_base(world, judge, rewards, settings.eval_per_class, settings.curve_per_class)
    overrides = _deep_update(settings.lab_scale, settings.overrides)
    # with a budget every run trains to the same cost: iterations is only an upper bound
    iterations = settings.iterations if settings.budget is None else 10 * settings.iterations
    kw = dict(eval_every=settings.eval_every, overrides=overrides, judge=judge, rewards=rewards,
              eval_per_class=settings.eval_per_class, curve_per_class=settings.curve_per_class, budget=settings.budget)
    # grid[family][method][lr] = [run per seed]
    grid: dict[str, dict[str, dict[str, list[dict]]]] = {}
    images: dict[str, dict[str, torch.Tensor]] = {}
    lr_choice: dict[str, dict[str, float]] = {}
    for family in settings.families:
        grid[family], images[family], lr_choice[family] = {}, {}, {}
        for method in settings.methods:
            per_lr = {}
            for lr in settings.lr_grid:
                per_lr[f"{lr:g}"] = []
                for seed in range(settings.seeds):
                    r = run_method(world, method, seed, lr, iterations,
                                   out / "runs" / f"{family}_{method}_lr{lr:g}_s{seed}", family=family, **kw)
                    per_lr[f"{lr:g}"].append(r)
                log(f"[{time.perf_counter() - t_start:6.0f}s] {family:8s} {method:14s} lr {lr:g}: train score "
                    f"{np.mean([r['train_score'] for r in per_lr[f'{lr:g}']]):.4f} over {settings.seeds} seeds")
            best = max(settings.lr_grid, key=lambda lr: per_lr[f"{lr:g}"][0]["train_score"])  # chosen on seed 0
            lr_choice[family][method] = best
            images[family][method] = per_lr[f"{best:g}"][0]["_grid"]
            grid[family][method] = per_lr
    cheaper: dict[str, dict[str, list[dict]]] = {}  # name -> lr -> runs per seed
    for name, (base_method, family, extra) in settings.variants.items():
        cheaper[name] = {}
        for lr in settings.lr_grid:
            cheaper[name][f"{lr:g}"] = [run_method(world, base_method, seed, lr, iterations,
                                                   out / "runs" / f"variant_{name}_lr{lr:g}_s{seed}", family=family,
                                                   **dict(kw, overrides=_deep_update(overrides, extra)))
                                        for seed in range(settings.seeds)]
            log(f"[{time.perf_counter() - t_start:6.0f}s] variant {name} lr {lr:g}: train score "
                f"{np.mean([r['train_score'] for r in cheaper[name][f'{lr:g}']]):.4f}")
    variant: dict[str, list[dict]] = {}
    if settings.per_sde_step_variant and "paper" in lr_choice:
        for method in (m for m in ("g2rpo_no_mgai", "g2rpo") if m in settings.methods):
            lr = lr_choice["paper"][method]
            over = _deep_update(overrides, {"optim": {"update_schedule": "per_sde_step"}})
            variant[method] = [run_method(world, method, seed, lr, iterations,
                                          out / "runs" / f"paper_sde_{method}_s{seed}", family="paper",
                                          **dict(kw, overrides=over)) for seed in range(settings.seeds)]
            log(f"[{time.perf_counter() - t_start:6.0f}s] paper+per_sde_step {method}: train score "
                f"{np.mean([r['train_score'] for r in variant[method]]):.4f}")
    for runs in [v for f in grid.values() for m in f.values() for v in m.values()] + list(variant.values()) + [
            v for per_lr in cheaper.values() for v in per_lr.values()]:
        for r in runs:
            r.pop("_grid", None)
    results = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.__dict__.items()},
               "world": str(world), "base": base_eval, "lr_choice": lr_choice, "grid": grid,
               "per_sde_step_variant": variant, "variants": cheaper, "total_seconds": time.perf_counter() - t_start}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    base_images = _base_grid(world)
    _write_figures(out, results, images, base_images)
    (out / "tables.md").write_text(budget_markdown(results) + "\n" + tables_markdown(results))
    _write_cost_figures(out, results)
    log(f"comparison written to {out} in {results['total_seconds']:.0f} s")
    return results


def _evaluate_base(world: Path, judge, rewards, eval_per_class: int, curve_per_class: int) -> dict:
    from ..lab.generator import load_lab_policy

    policy = load_lab_policy(world)
    return {"final": {str(s): evaluate_lab(policy, world, per_class=eval_per_class, steps=s, judge=judge,
                                           rewards=rewards) for s in EVAL_STEPS},
            "train_score": _score(evaluate_lab(policy, world, per_class=curve_per_class, steps=16, test_prompts=False,
                                               judge=judge, rewards=rewards))}


@torch.no_grad()
def _base_grid(world: Path) -> torch.Tensor:
    from ..lab.generator import load_lab_policy
    from ..lab.world import lab_prompts_for, sample_images

    labels = [c for c in range(10) for _ in range(6)]
    return sample_images(load_lab_policy(world), lab_prompts_for(labels, test=True), steps=16, seed=777)


def best_runs(results: dict, family: str) -> dict[str, list[dict]]:
    """Per method: the runs (all seeds) at the lr chosen on seed 0."""
    return {m: per_lr[f"{results['lr_choice'][family][m]:g}"] for m, per_lr in results["grid"][family].items()}


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


def ordering(runs: dict[str, list[dict]], key) -> list[str]:
    """Methods ordered best first by the mean over seeds of ``key(run)``."""
    return sorted(runs, key=lambda m: -np.mean([key(r) for r in runs[m]]))


def _paper_order_holds(order: list[str]) -> bool:
    """Whether the paper's ordering G2RPO > w/o MGAI > MixGRPO > DanceGRPO appears in ``order``."""
    ranks = [order.index(m) for m in PAPER_ORDER if m in order]
    return len(ranks) == len(PAPER_ORDER) and ranks == sorted(ranks)


def _table1(lines: list[str], base: dict, runs: dict[str, list[dict]], lr_of) -> None:
    lines += ["| method | lr | " + " | ".join(COLS) + " | clip frac | opt. steps / iter | s / iter | rows / iter |",
              "|---|---|" + "---|" * (len(COLS) + 4)]
    lines.append("| base model | - | " + " | ".join(f"{base['final']['16'][c]:.3f}" for c in COLS) + " | - | - | - | - |")
    for m, rs in runs.items():
        lines.append(f"| {m} | {lr_of(m)} | " + " | ".join(_mean_std([r["final"]["16"][c] for r in rs]) for c in COLS)
                     + f" | {np.mean([r['clip_frac'] for r in rs]):.3f} | "
                       f"{np.mean([r['optimizer_steps_per_iter'] for r in rs]):.0f} | "
                       f"{np.mean([r['sec_per_iter'] for r in rs]):.2f} | "
                       f"{np.mean([r['forward_rows_per_iter'] for r in rs]):.0f} |")


def _judge(r: dict) -> float:
    return r["final"]["16"]["judge_accuracy"]


def budget_markdown(results: dict) -> str:
    """The equal-compute view: every method and variant at the same cumulative cost (its best lr per family on
    seed 0's training score, as the equal-iteration tables choose), with what that cost bought."""
    budget = results["settings"].get("budget")
    if budget is None:
        return ""
    rows = []
    for family, methods in results["grid"].items():
        for method, per_lr in methods.items():
            lr = results["lr_choice"][family][method]
            rows.append((f"{method} ({family})", lr, per_lr[f"{lr:g}"]))
    for name, per_lr in results.get("variants", {}).items():
        lr = max(per_lr, key=lambda k: per_lr[k][0]["train_score"])
        rows.append((f"{name} (variant)", float(lr), per_lr[lr]))
    rows.sort(key=lambda r: -np.mean([_judge(x) for x in r[2]]))
    lines = [f"## Equal compute: every run to a cumulative cost of {budget:,.0f} forward-row equivalents\n",
             "Best lr per row (seed 0's training score); mean ± std over seeds; judge accuracy on the held-out "
             "paraphrases at 16 ODE steps; the in-domain score on the training prompts.\n",
             "| method | lr | iterations run | cost / iteration | judge accuracy | in-domain score (train prompts) |",
             "|---|---|---|---|---|---|"]
    for label, lr, runs in rows:
        lines.append(f"| {label} | {lr:g} | {np.mean([r['iterations_run'] for r in runs]):.1f} | "
                     f"{np.mean([r['cost_per_iter'] for r in runs]):,.0f} | {_mean_std([_judge(r) for r in runs])} | "
                     f"{_mean_std([r['train_score'] for r in runs])} |")
    return "\n".join(lines) + "\n"


def _write_cost_figures(out: Path, results: dict) -> None:
    """Curves of the training-prompt score against cumulative cost and seconds, and the cost-vs-judge frontier."""
    if results["settings"].get("budget") is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    for family, methods in results["grid"].items():
        for method, per_lr in methods.items():
            series.append((f"{method} ({family})", per_lr[f"{results['lr_choice'][family][method]:g}"]))
    for name, per_lr in results.get("variants", {}).items():
        series.append((name, per_lr[max(per_lr, key=lambda k: per_lr[k][0]["train_score"])]))
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for label, runs in series:
        curve = np.array(runs[0]["cost_curve"])
        axes[0].plot(curve[:, 0], curve[:, 2], label=label, marker=".")
        axes[1].plot(curve[:, 1], curve[:, 2], label=label, marker=".")
        axes[2].scatter([np.mean([r["cost_per_iter"] for r in runs])], [np.mean([_judge(r) for r in runs])])
        axes[2].annotate(label, (np.mean([r["cost_per_iter"] for r in runs]), np.mean([_judge(r) for r in runs])),
                         fontsize=7)
    axes[0].set(xlabel="cumulative cost (forward-row equivalents)", ylabel="in-domain score, training prompts",
                title="score vs cost (seed 0)")
    axes[1].set(xlabel="seconds (2 CPU cores)", ylabel="in-domain score, training prompts", title="score vs time")
    axes[2].set(xlabel="cost per iteration", ylabel="judge accuracy at the equal budget",
                title="cost per iteration vs judge accuracy (mean over seeds)")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "cost_curves.png", dpi=100)
    plt.close(fig)


def tables_markdown(results: dict) -> str:
    base = results["base"]
    s = results["settings"]
    lines: list[str] = []
    judge = lambda r: r["final"]["16"]["judge_accuracy"]  # noqa: E731
    indomain = lambda r: _score(r["final"]["16"])  # noqa: E731
    for family in results["grid"]:
        runs = best_runs(results, family)
        lines += [f"## Family `{family}` (configs/methods/*-{family}.yaml at lab scale)", "",
                  f"### Table 1 analogue, best lr per method (chosen on seed 0 by the training-prompt score; "
                  f"16 ODE steps, held-out prompts, mean ± std over {s['seeds']} seeds)", ""]
        _table1(lines, base, runs, lambda m, f=family: f"{results['lr_choice'][f][m]:g}")
        lines += ["", "### Equal-lr table: every method at each lr (judge accuracy / alignment + realism, "
                      "16 steps, held-out prompts, mean over seeds)", "",
                  "| method | " + " | ".join(f"lr {lr:g}" for lr in s["lr_grid"]) + " |",
                  "|---|" + "---|" * len(s["lr_grid"])]
        for m, per_lr in results["grid"][family].items():
            cells = [f"{np.mean([judge(r) for r in rs]):.3f} / {np.mean([indomain(r) for r in rs]):.3f}"
                     for rs in per_lr.values()]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", "### Orderings (mean over seeds; the paper's: g2rpo > g2rpo_no_mgai > mix_grpo > dance_grpo)", ""]
        for label, by in (("best lr", runs), *((f"lr {lr}", {m: p[lr] for m, p in results["grid"][family].items()})
                                              for lr in next(iter(results["grid"][family].values())))):
            for name, key in (("judge accuracy", judge), ("alignment + realism", indomain)):
                order = ordering(by, key)
                lines.append(f"- {label}, by {name}: {' > '.join(order)} -> paper ordering "
                             f"{'appears' if _paper_order_holds(order) else 'does not appear'}")
        lines += ["", "### Table 4 analogue: fewer inference steps, best lr (judge accuracy / alignment + realism)", "",
                  "| method | " + " | ".join(f"{st} steps" for st in EVAL_STEPS) + " |",
                  "|---|" + "---|" * len(EVAL_STEPS)]
        lines.append("| base model | " + " | ".join(
            f"{base['final'][str(st)]['judge_accuracy']:.3f} / {_score(base['final'][str(st)]):.3f}"
            for st in EVAL_STEPS) + " |")
        for m, rs in runs.items():
            cells = [f"{np.mean([r['final'][str(st)]['judge_accuracy'] for r in rs]):.3f} / "
                     f"{np.mean([_score(r['final'][str(st)]) for r in rs]):.3f}" for st in EVAL_STEPS]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        if "dance_grpo" in runs:
            target = float(np.mean([r["train_score"] for r in runs["dance_grpo"]]))
            lines += ["", f"### Fig. 1a analogue: iterations and seconds to reach DanceGRPO's final train score "
                          f"({target:.4f}; ODE evaluation every {s['eval_every']} iterations)", "",
                      "| method | iterations | seconds |", "|---|---|---|"]
            for m, rs in runs.items():
                it, sec = _threshold(rs, target)
                lines.append(f"| {m} | {it} | {sec} |")
        lines += ["", "### Reward hacking check (best lr)", ""]
        for m, rs in runs.items():
            d = {c: np.mean([r["final"]["16"][c] for r in rs]) - base["final"]["16"][c] for c in COLS}
            verdict = ("alignment rose while the out-of-domain judge fell: reward hacking"
                       if d["digit_alignment"] > 0 > d["judge_accuracy"] else "alignment and judge moved together")
            lines.append(f"- {m}: alignment {d['digit_alignment']:+.3f}, judge accuracy {d['judge_accuracy']:+.3f}, "
                         f"diversity {d['diversity']:+.3f} -> {verdict}")
        lines.append("")
    variant = results.get("per_sde_step_variant") or {}
    if variant:
        lines += ["## G2RPO vs w/o MGAI: the update schedule alone (paper preset, same lr)", "",
                  "| method | schedule | " + " | ".join(COLS) + " | clip frac | opt. steps / iter |",
                  "|---|---|" + "---|" * (len(COLS) + 2)]
        paper = best_runs(results, "paper")
        for m, rs in variant.items():
            for sched, runs_ in (("per_iteration", paper[m]), ("per_sde_step", rs)):
                lines.append(f"| {m} | {sched} | " + " | ".join(_mean_std([r["final"]["16"][c] for r in runs_])
                                                                for c in COLS)
                             + f" | {np.mean([r['clip_frac'] for r in runs_]):.3f} | "
                               f"{np.mean([r['optimizer_steps_per_iter'] for r in runs_]):.0f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _write_figures(out: Path, results: dict, images: dict[str, dict[str, torch.Tensor]],
                   base_images: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(results["grid"])
    fig, axes = plt.subplots(1, len(families), figsize=(6.5 * len(families), 4.5), squeeze=False, sharey=True)
    for ax, family in zip(axes[0], families):
        for m, rs in best_runs(results, family).items():
            its = [it for it, _ in rs[0]["curve"]]
            vals = np.array([[v for _, v in r["curve"]] for r in rs])
            mean, std = vals.mean(0), vals.std(0)
            ax.plot(its, mean, label=f"{m} (lr {results['lr_choice'][family][m]:g})")
            ax.fill_between(its, mean - std, mean + std, alpha=0.2)
        ax.axhline(results["base"]["train_score"], color="gray", ls="--", lw=1, label="base model")
        ax.set_xlabel("iteration")
        ax.set_title(f"presets: {family} (band: ± std over seeds)", fontsize=10)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("alignment + realism (ODE, 16 steps, training prompts)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    (out / "grids").mkdir(exist_ok=True)
    per_digit = base_images.shape[0] // 10
    for family, per_method in images.items():
        n = len(per_method) + 1
        fig, axes = plt.subplots(1, n, figsize=(1.1 * per_digit * n * 0.45 + 1, 6.2), squeeze=False)
        draw_labelled_rows(axes[0][0], base_images, DIGITS, per_digit, "base model")
        for ax, (m, imgs) in zip(axes[0][1:], per_method.items()):
            draw_labelled_rows(ax, imgs, DIGITS, per_digit, f"{m}\nlr {results['lr_choice'][family][m]:g}")
        fig.suptitle(f"held-out prompts, one row per digit, fixed noise (presets: {family})", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "grids" / f"{family}.png", dpi=110)
        plt.close(fig)
