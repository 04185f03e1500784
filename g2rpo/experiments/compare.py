"""`python -m g2rpo.experiments compare` (also `python -m g2rpo.lab compare`): the paper's comparison (Tables 1, 2,
4 and Fig. 1a) on a lab world (``--world digits|scenes``), under both preset families
(``configs/methods/<method>-{paper,official}.yaml``).

Every method trains from the same base model on the same prompts with the same seeds and
iteration budget, with its family's preset method keys at lab scale (the same T, group size,
candidate steps and prompts for everyone: ``CompareSettings.lab_scale``), at every learning rate
of the grid; a method whose best lr sits at an edge of the grid is run at the next lr beyond it
(``extend_lr`` times at most), so the grid brackets every method's best. The best-lr table takes,
per method, the lr with the best in-domain reward of ODE samples of the *training* prompts on
seed 0 (never a judge); the equal-lr table shows every method at each lr. Final policies are
evaluated on the held-out prompts at 16, 8 and 4 ODE steps with the in-domain rewards and the
out-of-domain judges. Curves are ODE evaluations every ``eval_every`` iterations (rollout rewards
of different strategies are not comparable).

With a ``budget`` (cumulative cost in forward-row equivalents) every run ends at the *last
iteration whose cumulative cost is within the budget* (the policy of that iteration is the one
evaluated; the cost it used is reported), and the judge and the in-domain rewards are evaluated
on the held-out prompts with fixed noise at ``cost_points`` evenly spaced costs along the way
(judge-vs-cost curves; the reward-hacking report). The ``paper_sde`` variant runs the two G2RPO
methods with the paper preset but the public code's ``per_sde_step`` update schedule, so the
effect of the active clip is seen alone. With ``control`` every compared method also trains at its chosen lr
on ``random_control`` (N(0, 1) draws that ignore the image), with the same seeds: the random-reward control, against
which a judge gain reads as more than the drift of the updates, or not (Welch's t-test of the difference).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..config import default_config_path, load_config, merge_dicts
from ..distributed import rollout_mode
from ..lab.scale import LAB_SCALE
from ..train import Trainer
from ..train.logs import draw_labelled_rows
from .worlds import WORLDS, WorldSpec, world_spec

__all__ = ["LAB_WORLD", "CompareSettings", "run_method", "compare", "preset_path", "LAMBDA_ABLATION"]

METHODS = ("dance_grpo", "flow_grpo", "mix_grpo", "g2rpo_no_mgai", "g2rpo")
PRESET_FAMILIES = ("paper", "official")
EVAL_STEPS = (16, 8, 4)
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
#: Table 2 (the Lambda ablation): G2RPO (paper preset) with each of the paper's granularity sets but {1, 2, 3},
#: which is G2RPO itself.
LAMBDA_ABLATION = {f"g2rpo_lambda{''.join(map(str, lam))}": ("g2rpo", "paper", {"sampler": {"granularities": lam}})
                   for lam in ([1], [1, 2], [1, 3])}
PAPER_ORDER = ("g2rpo", "g2rpo_no_mgai", "mix_grpo", "dance_grpo")  # Table 1, best first


@dataclass
class CompareSettings:
    methods: tuple[str, ...] = METHODS
    families: tuple[str, ...] = PRESET_FAMILIES
    seeds: int = 3
    # seeds run at each lr of the grid (None: all): the lr is chosen on seed 0 whatever this is, and the chosen lr
    # then runs every seed, so 1 spends the grid's other seeds only where they are reported (the best-lr tables)
    grid_seeds: int | None = None
    iterations: int = 32
    lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    extend_lr: int = 2  # at most this many lrs added beyond an edge of the grid that holds a method's best
    eval_every: int = 8
    per_sde_step_variant: bool = True  # paper preset + per_sde_step for g2rpo / g2rpo_no_mgai at their best lr
    # the same scale for every method and family (the presets' T, G and M are Flux-scale)
    lab_scale: dict = field(default_factory=lambda: copy.deepcopy(LAB_SCALE))
    overrides: dict = field(default_factory=dict)  # applied to every run after lab_scale (smoke tests)
    # train every run to this cumulative cost (forward-row equivalents; iterations is then an upper bound)
    budget: float | None = None
    cost_points: int = 8  # with a budget: held-out evaluations at k * budget / cost_points, k = 1..cost_points
    # extra rows: name -> (preset method, preset family, overrides), e.g. the cheaper G2RPO variants; each runs at
    # its preset method's chosen lr (of that family; the whole grid when the method is not compared)
    variants: dict = field(default_factory=dict)
    eval_per_class: int | None = None  # final evaluation: samples per held-out prompt (None: the world's)
    curve_per_class: int | None = None  # curve points: samples per prompt (None: the world's)
    world: str = "digits"
    eval_steps: tuple[int, ...] = EVAL_STEPS  # the final evaluations' step counts (Table 4; 16 comes first)
    # the random-reward control: every compared method also trains at its chosen lr with every reward replaced by
    # random_control (N(0, 1) draws that ignore the image; seeded by the run's seed), same seeds, so that a judge
    # gain can be read against what the drift of the updates alone gives
    control: bool = False


#: The digits world's reset (kept for callers that combine a preset with the digits world by hand).
LAB_WORLD = WORLDS["digits"].reset


def preset_path(method: str, family: str) -> Path:
    """``configs/methods/<method>-<family>.yaml`` (shipped as ``g2rpo.configs``)."""
    return Path(str(resources.files("g2rpo.configs").joinpath("methods", f"{method}-{family}.yaml")))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def run_method(world: Path, method: str, seed: int, lr: float, iterations: int, out: Path, eval_every: int = 8,
               family: str = "paper", overrides: dict | None = None, spec: WorldSpec | str = "digits",
               cache: dict | None = None, budget: float | None = None, cost_points: int = 8,
               eval_per_class: int | None = None, curve_per_class: int | None = None,
               eval_steps: tuple[int, ...] = EVAL_STEPS) -> dict:
    """Train one method (its ``family`` preset over the world's lab config) from the base model; returns curves
    (score against iterations, cumulative cost and seconds), timings, the mean clip fraction, MGAI diagnostics and
    final evaluations. ``budget``: train while the cumulative cost stays within it; the policy evaluated is that
    of the last iteration within the budget (``cost_used``), and held-out evaluations are taken at
    ``cost_points`` evenly spaced costs (``judge_curve``). ``cache`` holds the world's loaded rewards and judges
    between runs; ``eval_per_class`` / ``curve_per_class``: samples per held-out prompt (class, for the digits)
    in the final evaluation and the curve points (None: the world's defaults)."""
    spec = world_spec(spec) if isinstance(spec, str) else spec
    cache = {} if cache is None else cache
    for size, n in (("final", eval_per_class), ("curve", curve_per_class)):
        if n is not None:
            cache[f"{size}_per_class"] = cache[f"{size}_per_prompt"] = n
    o = {"model": {"path": str(world)}, "optim": {"lr": lr}, "iterations": iterations, "seed": 42 + seed,
         "sampler_seed": 1223627 + seed, "output_dir": str(out), "overwrite": True, "checkpoint_every": 0,
         "export_final": False, "progress": False, "tensorboard": False, "image_every": 0}
    if budget is not None:
        o["max_cost"] = float(budget)
    o = merge_dicts(merge_dicts(spec.reset, o), overrides or {})
    cfg = load_config([default_config_path(), preset_path(method, family)], o)
    trainer = Trainer(cfg, log=lambda *a, **k: None)

    def evaluate(steps: int, held_out: bool, size: str) -> dict[str, float]:
        with rollout_mode(trainer.module), trainer.autocast():
            return spec.evaluate(trainer.policy, world, steps, held_out, size, cache)

    # the base model's curve point: the same world, the same fixed noise and settings for every run of a comparison
    # (a LoRA run adds B A x with B = 0), so it is evaluated once
    base_key = ("base_curve", cfg.model.dtype, cfg.lora.enabled, cache.get("curve_per_class"))
    if base_key not in cache:
        cache[base_key] = spec.score(evaluate(16, False, "curve"))
    curve = [(0, cache[base_key])]
    cost_curve = [(0.0, 0.0, curve[0][1])]  # (cumulative cost, cumulative seconds, score)
    times, rows, clips, opt_steps, costs, mgai = [], [], [], [], [], {}
    points = [budget * (k + 1) / cost_points for k in range(cost_points)] if budget is not None else []
    judge_curve: list[dict] = []  # held-out evaluations at the cost points (the state within each point)
    last_within = {"state": _snapshot(trainer.module), "cost": 0.0, "iterations": 0}

    def evaluate_state(state: dict[str, torch.Tensor], size: str, steps: int = 16) -> dict[str, float]:
        current = _snapshot(trainer.module)
        trainer.module.load_state_dict(state)
        try:
            return evaluate(steps, True, size)
        finally:
            trainer.module.load_state_dict(current)

    def callback(tr, m):
        cost = float(m["cost"])
        while points and cost > points[0]:  # the previous state is the last one within this cost point
            judge_curve.append({"cost_point": points.pop(0), "cost": last_within["cost"],
                                "iterations": last_within["iterations"],
                                **evaluate_state(last_within["state"], "curve")})
        if budget is not None and cost > budget:
            return  # past the budget: this iteration is not counted
        times.append(m["time_iteration"])
        rows.append(m["forward_rows"])
        clips.append(m["clip_frac"])
        opt_steps.append(m["optimizer_steps"])
        costs.append(m["cost/iteration"])
        for k, v in m.items():
            if k.startswith("mgai/") and np.isfinite(v):
                mgai.setdefault(k, []).append(float(v))
        it = int(m["iteration"])
        last_within.update(state=_snapshot(tr.module), cost=cost, iterations=it)
        if it % eval_every == 0 or it == iterations or tr.budget_spent:
            curve.append((it, spec.score(evaluate(16, False, "curve"))))
            cost_curve.append((cost, float(np.sum(times)), curve[-1][1]))

    trainer.run(callback=callback)
    if points:  # the budget was not reached (iterations ran out): the last state stands for the rest
        judge_curve += [{"cost_point": p, "cost": last_within["cost"], "iterations": last_within["iterations"],
                         **evaluate_state(last_within["state"], "curve")} for p in points]
    trainer.module.load_state_dict(last_within["state"])  # the last iteration within the budget
    if cost_curve[-1][0] != last_within["cost"]:
        curve.append((last_within["iterations"], spec.score(evaluate(16, False, "curve"))))
        cost_curve.append((last_within["cost"], float(np.sum(times)), curve[-1][1]))
    final = {str(s): evaluate(s, True, "final") for s in eval_steps}
    grid = None
    if seed == 0:  # the grids show each method's seed-0 run
        with rollout_mode(trainer.module):
            grid = spec.grid(trainer.policy)
    return {"method": method, "family": family, "seed": seed, "lr": lr, "curve": curve,
            "sec_per_iter": float(np.mean(times)) if times else float("nan"),
            "forward_rows_per_iter": float(np.mean(rows)) if rows else 0.0,
            "clip_frac": float(np.mean(clips)) if clips else float("nan"),
            "optimizer_steps_per_iter": float(np.mean(opt_steps)) if opt_steps else 0.0,
            "train_score": curve[-1][1], "final": final, "_grid": grid, "cost_curve": cost_curve,
            "cost_per_iter": float(np.mean(costs)) if costs else 0.0, "iterations_run": len(costs),
            "total_cost": float(np.sum(costs)), "cost_used": last_within["cost"], "judge_curve": judge_curve,
            "mgai": {k: float(np.mean(v)) for k, v in mgai.items()}}


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def _lr_key(lr: float) -> str:
    return f"{lr:g}"


def compare(out: str | Path, settings: CompareSettings, world: str | Path | None = None, log=print) -> dict:
    """Run the whole comparison into ``out``; returns the results dict (also ``out/results.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = world_spec(settings.world)
    world = Path(world) if world else spec.build(log=None)
    if not (world / spec.marker).is_file():
        raise FileNotFoundError(f"{world} is not a {spec.name} world (no {spec.marker})")
    cache: dict = {}
    for size, n in (("final", settings.eval_per_class), ("curve", settings.curve_per_class)):
        if n is not None:
            cache[f"{size}_per_class"] = cache[f"{size}_per_prompt"] = n
    t_start = time.perf_counter()
    base_policy = spec.load_policy(world)
    base_eval = {"final": {str(s): spec.evaluate(base_policy, world, s, True, "final", cache)
                           for s in settings.eval_steps},
                 "train_score": spec.score(spec.evaluate(base_policy, world, 16, False, "curve", cache))}
    if settings.budget is not None:
        base_eval["judge_curve"] = spec.evaluate(base_policy, world, 16, True, "curve", cache)
    overrides = merge_dicts(settings.lab_scale, settings.overrides)
    # with a budget every run trains to the same cost: iterations is only an upper bound
    iterations = settings.iterations if settings.budget is None else 10 * settings.iterations
    kw = dict(eval_every=settings.eval_every, overrides=overrides, spec=spec, cache=cache, budget=settings.budget,
              cost_points=settings.cost_points, eval_steps=tuple(settings.eval_steps))

    def runs_at(name: str, method: str, family: str, lr: float, extra=None, seeds: range | None = None) -> list[dict]:
        """One run per seed (``seeds``, default all); ``extra``: overrides on top of the common ones, or
        ``seed -> overrides``."""
        def of(seed: int) -> dict:
            e = extra(seed) if callable(extra) else extra
            return merge_dicts(overrides, e) if e else overrides

        return [run_method(world, method, seed, lr, iterations, out / "runs" / f"{name}_lr{lr:g}_s{seed}",
                           family=family, **dict(kw, overrides=of(seed)))
                for seed in (range(settings.seeds) if seeds is None else seeds)]

    grid_seeds = range(min(settings.seeds, settings.grid_seeds or settings.seeds))

    def tune(name: str, method: str, family: str, extra: dict | None = None) -> tuple[dict[str, list[dict]], float]:
        """Runs per lr over the grid, extended beyond an edge that holds the best (seed 0's training score)."""
        per_lr: dict[str, list[dict]] = {}
        lrs = sorted(settings.lr_grid)
        for lr in lrs:
            per_lr[_lr_key(lr)] = runs_at(name, method, family, lr, extra, grid_seeds)
            log(f"[{time.perf_counter() - t_start:6.0f}s] {name:24s} lr {lr:g}: train score "
                f"{np.mean([r['train_score'] for r in per_lr[_lr_key(lr)]]):.4f} over {len(grid_seeds)} seeds")
        for _ in range(settings.extend_lr):
            best = max(lrs, key=lambda lr: per_lr[_lr_key(lr)][0]["train_score"])
            if len(lrs) < 2 or lrs[0] < best < lrs[-1]:
                break
            step = lrs[1] / lrs[0] if best == lrs[0] else lrs[-1] / lrs[-2]
            new = float(f"{(best / step if best == lrs[0] else best * step):.3g}")  # a round number
            per_lr[_lr_key(new)] = runs_at(name, method, family, new, extra, grid_seeds)
            log(f"[{time.perf_counter() - t_start:6.0f}s] {name:24s} lr {new:g} (beyond the grid's edge): train "
                f"score {np.mean([r['train_score'] for r in per_lr[_lr_key(new)]]):.4f}")
            lrs = sorted(lrs + [new])
        best = max(lrs, key=lambda lr: per_lr[_lr_key(lr)][0]["train_score"])
        rest = range(len(grid_seeds), settings.seeds)
        if len(rest):  # the chosen lr runs every seed
            per_lr[_lr_key(best)] += runs_at(name, method, family, best, extra, rest)
            log(f"[{time.perf_counter() - t_start:6.0f}s] {name:24s} lr {best:g} (chosen): train score "
                f"{np.mean([r['train_score'] for r in per_lr[_lr_key(best)]]):.4f} over {settings.seeds} seeds")
        return {_lr_key(lr): per_lr[_lr_key(lr)] for lr in lrs}, best

    # grid[family][method][lr] = [run per seed]
    grid: dict[str, dict[str, dict[str, list[dict]]]] = {}
    images: dict[str, dict[str, tuple]] = {}
    lr_choice: dict[str, dict[str, float]] = {}
    for family in settings.families:
        grid[family], images[family], lr_choice[family] = {}, {}, {}
        for method in settings.methods:
            per_lr, best = tune(f"{family}_{method}", method, family)
            lr_choice[family][method] = best
            images[family][method] = per_lr[_lr_key(best)][0]["_grid"]
            grid[family][method] = per_lr
    cheaper: dict[str, dict[str, list[dict]]] = {}  # name -> lr -> runs per seed
    for name, (base_method, family, extra) in settings.variants.items():
        lr = lr_choice.get(family, {}).get(base_method)
        if lr is None:
            cheaper[name], _ = tune(f"variant_{name}", base_method, family, extra)
        else:  # at its method's chosen lr
            cheaper[name] = {_lr_key(lr): runs_at(f"variant_{name}", base_method, family, lr, extra)}
            log(f"[{time.perf_counter() - t_start:6.0f}s] variant {name} lr {lr:g}: train score "
                f"{np.mean([r['train_score'] for r in cheaper[name][_lr_key(lr)]]):.4f}")
    controls: dict[str, dict[str, list[dict]]] = {}  # family -> method -> runs per seed on random_control
    for family, chosen in (lr_choice.items() if settings.control else ()):
        controls[family] = {}
        for method, lr in chosen.items():
            controls[family][method] = runs_at(f"control_{family}_{method}", method, family, lr, control_rewards)
            log(f"[{time.perf_counter() - t_start:6.0f}s] control {family}_{method} lr {lr:g}: train score "
                f"{np.mean([r['train_score'] for r in controls[family][method]]):.4f} on random_control")
    variant: dict[str, list[dict]] = {}
    if settings.per_sde_step_variant and "paper" in lr_choice:
        for method in (m for m in ("g2rpo_no_mgai", "g2rpo") if m in settings.methods):
            lr = lr_choice["paper"][method]
            variant[method] = runs_at(f"paper_sde_{method}", method, "paper", lr,
                                      {"optim": {"update_schedule": "per_sde_step"}})
            log(f"[{time.perf_counter() - t_start:6.0f}s] paper+per_sde_step {method}: train score "
                f"{np.mean([r['train_score'] for r in variant[method]]):.4f}")
    grid_labels = None
    for runs in [v for f in grid.values() for m in f.values() for v in m.values()] + list(variant.values()) + [
            v for per_lr in cheaper.values() for v in per_lr.values()] + [
            v for f in controls.values() for v in f.values()]:
        for r in runs:
            g = r.pop("_grid", None)
            grid_labels = g[1] if g is not None else grid_labels
    results = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.__dict__.items()},
               "world": str(world), "world_name": spec.name, "in_domain": list(spec.in_domain),
               "judge_key": spec.judge, "cols": list(spec.cols), "base": base_eval, "lr_choice": lr_choice,
               "grid": grid, "per_sde_step_variant": variant, "variants": cheaper, "controls": controls,
               "total_seconds": time.perf_counter() - t_start}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    with torch.no_grad():
        base_images = spec.grid(base_policy)
    _write_figures(out, results, images, base_images)
    (out / "tables.md").write_text(budget_markdown(results) + "\n" + control_markdown(results)
                                   + tables_markdown(results))
    _write_cost_figures(out, results)
    log(f"comparison written to {out} in {results['total_seconds']:.0f} s")
    return results


def control_rewards(seed: int) -> dict:
    """The overrides of a random-reward control run: every reward replaced by ``random_control`` (its seed the
    run's)."""
    return {"rewards": [{"name": "random_control", "weight": 1.0, "options": {"seed": int(seed)}}]}


def control_markdown(results: dict) -> str:
    """The random-reward control: each method's judge with its rewards against the same method, lr and seeds
    trained on ``random_control``; Welch's t-test of the difference (a gain reads as more than drift at p < 0.05)."""
    controls = results.get("controls") or {}
    if not controls:
        return ""
    from scipy.stats import ttest_ind

    key = results["judge_key"]
    lines = ["## The random-reward control\n",
             f"Each method at its chosen lr, trained on its rewards and on `random_control` (N(0, 1) draws that ignore "
             f"the image), with the same seeds; {key} on the held-out prompts at 16 ODE steps, mean ± std over seeds. "
             "t and p: Welch's t-test of the difference; a gain reads as more than the drift of the updates only at "
             "p < 0.05.\n",
             f"| method | lr | {key}, its rewards | {key}, random_control | random_control, min - max | difference "
             "| t | p | reading |", "|---|---|---|---|---|---|---|---|---|"]
    for family, methods in controls.items():
        for method, ctrl in methods.items():
            lr = results["lr_choice"][family][method]
            real = [_judge(results, r) for r in results["grid"][family][method][_lr_key(lr)]]
            noise = [_judge(results, r) for r in ctrl]
            diff = float(np.mean(real) - np.mean(noise))
            t = p = float("nan")
            if min(len(real), len(noise)) > 1 and np.var(real) + np.var(noise) > 0:
                test = ttest_ind(real, noise, equal_var=False)
                t, p = float(test.statistic), float(test.pvalue)
            reading = ("no spread to read it by (one seed)" if np.isnan(p) else "within drift" if p >= 0.05 else
                       "more than drift" if diff > 0 else "below drift")
            lines.append(f"| {method} ({family}) | {lr:g} | {_mean_std(real)} | {_mean_std(noise)} | "
                         f"{min(noise):.3f} - {max(noise):.3f} | {diff:+.3f} | {t:.1f} | {p:.2f} | {reading} |")
    return "\n".join(lines) + "\n\n"


def _score(results: dict, ev: dict[str, float]) -> float:
    """The training reward's combination (each in-domain reward at weight 1)."""
    return float(sum(ev[k] for k in results["in_domain"]))


def _judge(results: dict, r: dict, steps: str = "16") -> float:
    return r["final"][steps][results["judge_key"]]


def best_runs(results: dict, family: str) -> dict[str, list[dict]]:
    """Per method: the runs (all seeds) at the lr chosen on seed 0."""
    return {m: per_lr[_lr_key(results["lr_choice"][family][m])] for m, per_lr in results["grid"][family].items()}


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


def _table1(lines: list[str], results: dict, runs: dict[str, list[dict]], lr_of) -> None:
    cols, base = results["cols"], results["base"]
    lines += ["| method | lr | " + " | ".join(cols) + " | clip frac | opt. steps / iter | s / iter | rows / iter |",
              "|---|---|" + "---|" * (len(cols) + 4)]
    lines.append("| base model | - | " + " | ".join(f"{base['final']['16'][c]:.3f}" for c in cols) + " | - | - | - | - |")
    for m, rs in runs.items():
        lines.append(f"| {m} | {lr_of(m)} | " + " | ".join(_mean_std([r["final"]["16"][c] for r in rs]) for c in cols)
                     + f" | {np.mean([r['clip_frac'] for r in rs]):.3f} | "
                       f"{np.mean([r['optimizer_steps_per_iter'] for r in rs]):.0f} | "
                       f"{np.mean([r['sec_per_iter'] for r in rs]):.2f} | "
                       f"{np.mean([r['forward_rows_per_iter'] for r in rs]):.0f} |")


def _budget_rows(results: dict) -> list[tuple[str, float, list[dict]]]:
    """(label, lr, runs) of every method (its chosen lr per family) and variant (its best lr on seed 0)."""
    rows = []
    for family, methods in results["grid"].items():
        for method, per_lr in methods.items():
            lr = results["lr_choice"][family][method]
            rows.append((f"{method} ({family})", lr, per_lr[_lr_key(lr)]))
    for name, per_lr in results.get("variants", {}).items():
        lr = max(per_lr, key=lambda k: per_lr[k][0]["train_score"])
        rows.append((f"{name} (variant)", float(lr), per_lr[lr]))
    return rows


def budget_markdown(results: dict) -> str:
    """The equal-compute view: every method and variant within the same cumulative cost (its best lr per family on
    seed 0's training score, as the equal-iteration tables choose), with the cost it actually used and what that
    bought; the judge against cost; the reward-hacking report; MGAI diagnostics."""
    budget = results["settings"].get("budget")
    if budget is None:
        return ""
    key = results["judge_key"]
    rows = sorted(_budget_rows(results), key=lambda r: -np.mean([_judge(results, x) for x in r[2]]))
    lines = [f"## Equal compute: every run within a cumulative cost of {budget:,.0f} forward-row equivalents\n",
             "Each run ends at its last iteration within the budget (the cost it used is shown). Best lr per row "
             f"(seed 0's training score); mean ± std over seeds; {key} on the held-out prompts at 16 ODE steps; the "
             "in-domain score on the training prompts.\n",
             f"| method | lr | iterations run | cost used | cost / iteration | {key} | in-domain score (train prompts) |",
             "|---|---|---|---|---|---|---|"]
    for label, lr, runs in rows:
        lines.append(f"| {label} | {lr:g} | {np.mean([r['iterations_run'] for r in runs]):.1f} | "
                     f"{np.mean([r['cost_used'] for r in runs]):,.0f} | "
                     f"{np.mean([r['cost_per_iter'] for r in runs]):,.0f} | "
                     f"{_mean_std([_judge(results, r) for r in runs])} | {_mean_std([r['train_score'] for r in runs])} |")
    base_curve = results["base"].get("judge_curve")
    points = [p["cost_point"] for p in rows[0][2][0]["judge_curve"]] if rows and rows[0][2][0]["judge_curve"] else []
    if points:
        lines += ["", f"### {key} against cost (held-out prompts, fixed noise; mean over seeds; the state within each "
                      "cost point)", "",
                  "| method | base | " + " | ".join(f"{p:,.0f}" for p in points) + " |",
                  "|---|---|" + "---|" * len(points)]
        for label, _, runs in rows:
            cells = [f"{np.mean([r['judge_curve'][i][key] for r in runs]):.3f}" for i in range(len(points))]
            lines.append(f"| {label} | {base_curve[key]:.3f} | " + " | ".join(cells) + " |")
        lines += ["", "### Reward hacking over training: each learned reward against the judge (held-out prompts, "
                      "mean over seeds; + rose, - fell between consecutive cost points)", ""]
        for label, _, runs in rows:
            parts = []
            for name in results["in_domain"] + [key]:
                vals = [base_curve[name]] + [np.mean([r["judge_curve"][i][name] for r in runs])
                                             for i in range(len(points))]
                parts.append(f"{name} {vals[0]:.3f}->{vals[-1]:.3f}")
            rises = {name: [np.mean([r["judge_curve"][i][name] for r in runs]) for i in range(len(points))]
                     for name in results["in_domain"] + [key]}
            hacked = [i for i in range(1, len(points)) if all(rises[n][i] > rises[n][i - 1] for n in results["in_domain"])
                      and rises[key][i] < rises[key][i - 1]]
            flag = (f"rewards rose while {key} fell at cost points {', '.join(f'{points[i]:,.0f}' for i in hacked)}"
                    if hacked else "no segment where the rewards rose and the judge fell")
            lines.append(f"- {label}: {'; '.join(parts)} — {flag}")
    mgai_rows = [(label, runs) for label, _, runs in rows if any(r["mgai"] for r in runs)]
    if mgai_rows:
        lines += ["", "### MGAI: how alike the granularities rank a group's branches (mean over SDE steps, iterations "
                      "and seeds)", "", "| method | granularity | Spearman with the finest | variance share |",
                  "|---|---|---|---|"]
        for label, runs in mgai_rows:
            lambdas = sorted({k.split("/")[2] for r in runs for k in r["mgai"] if k.count("/") == 3})
            for lam in lambdas:
                sp = [v for r in runs for k, v in r["mgai"].items() if k.endswith(f"/{lam}/spearman")]
                vs = [v for r in runs for k, v in r["mgai"].items() if k.endswith(f"/{lam}/var_share")]
                lines.append(f"| {label} | {lam.removeprefix('lambda')} | "
                             f"{np.mean(sp) if sp else float('nan'):.3f} | {np.mean(vs) if vs else float('nan'):.3f} |")
    return "\n".join(lines) + "\n"


def _write_cost_figures(out: Path, results: dict) -> None:
    """Curves of the training-prompt score against cumulative cost and seconds, the judge against cost (held-out
    prompts, mean over seeds) and the cost-vs-judge frontier."""
    if results["settings"].get("budget") is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = results["judge_key"]
    fig, axes = plt.subplots(1, 4, figsize=(24, 5))
    for label, _, runs in _budget_rows(results):
        curve = np.array(runs[0]["cost_curve"])
        axes[0].plot(curve[:, 0], curve[:, 2], label=label, marker=".")
        axes[1].plot(curve[:, 1], curve[:, 2], label=label, marker=".")
        if runs[0]["judge_curve"]:
            xs = [0.0] + [p["cost_point"] for p in runs[0]["judge_curve"]]
            ys = [results["base"]["judge_curve"][key]] + [np.mean([r["judge_curve"][i][key] for r in runs])
                                                          for i in range(len(xs) - 1)]
            axes[2].plot(xs, ys, label=label, marker=".")
        x, y = np.mean([r["cost_per_iter"] for r in runs]), np.mean([_judge(results, r) for r in runs])
        axes[3].scatter([x], [y])
        axes[3].annotate(label, (x, y), fontsize=7)
    axes[0].set(xlabel="cumulative cost (forward-row equivalents)", ylabel="in-domain score, training prompts",
                title="score vs cost (seed 0)")
    axes[1].set(xlabel="seconds (2 CPU cores)", ylabel="in-domain score, training prompts", title="score vs time")
    axes[2].set(xlabel="cumulative cost", ylabel=f"{key}, held-out prompts", title=f"{key} vs cost (mean over seeds)")
    axes[3].set(xlabel="cost per iteration", ylabel=f"{key} at the equal budget",
                title=f"cost per iteration vs {key} (mean over seeds)")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "cost_curves.png", dpi=100)
    plt.close(fig)


def tables_markdown(results: dict) -> str:
    base = results["base"]
    s = results["settings"]
    cols, key = results["cols"], results["judge_key"]
    score_name = " + ".join(results["in_domain"])
    lines: list[str] = [f"# World `{results.get('world_name', 'digits')}`", ""]
    judge = lambda r: _judge(results, r)  # noqa: E731
    indomain = lambda r: _score(results, r["final"]["16"])  # noqa: E731
    for family in results["grid"]:
        runs = best_runs(results, family)
        lines += [f"## Family `{family}` (configs/methods/*-{family}.yaml at lab scale)", "",
                  f"### Table 1 analogue, best lr per method (chosen on seed 0 by the training-prompt score; "
                  f"16 ODE steps, held-out prompts, mean ± std over {s['seeds']} seeds)", ""]
        _table1(lines, results, runs, lambda m, f=family: f"{results['lr_choice'][f][m]:g}")
        lrs = sorted({lr for per_lr in results["grid"][family].values() for lr in per_lr}, key=float)
        seeds_note = ("mean over seeds" if not s.get("grid_seeds") or s["grid_seeds"] >= s["seeds"] else
                      f"mean over {s['grid_seeds']} seed(s) but at the chosen lr, which ran {s['seeds']}")
        lines += ["", f"### Equal-lr table: every method at each lr ({key} / {score_name}, 16 steps, held-out prompts, "
                      f"{seeds_note}; - not run)", "",
                  "| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
        for m, per_lr in results["grid"][family].items():
            cells = [f"{np.mean([judge(r) for r in per_lr[lr]]):.3f} / {np.mean([indomain(r) for r in per_lr[lr]]):.3f}"
                     if lr in per_lr else "-" for lr in lrs]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", "### Orderings (mean over seeds; the paper's: g2rpo > g2rpo_no_mgai > mix_grpo > dance_grpo)", ""]
        common = [lr for lr in lrs if all(lr in p for p in results["grid"][family].values())]
        for label, by in (("best lr", runs), *((f"lr {lr}", {m: p[lr] for m, p in results["grid"][family].items()})
                                              for lr in common)):
            for name, fn in ((key, judge), (score_name, indomain)):
                order = ordering(by, fn)
                lines.append(f"- {label}, by {name}: {' > '.join(order)} -> paper ordering "
                             f"{'appears' if _paper_order_holds(order) else 'does not appear'}")
        steps = results["settings"].get("eval_steps", EVAL_STEPS)
        lines += ["", f"### Table 4 analogue: fewer inference steps, best lr ({key} / {score_name})", "",
                  "| method | " + " | ".join(f"{st} steps" for st in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        lines.append("| base model | " + " | ".join(
            f"{base['final'][str(st)][key]:.3f} / {_score(results, base['final'][str(st)]):.3f}"
            for st in steps) + " |")
        for m, rs in runs.items():
            cells = [f"{np.mean([_judge(results, r, str(st)) for r in rs]):.3f} / "
                     f"{np.mean([_score(results, r['final'][str(st)]) for r in rs]):.3f}" for st in steps]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        if "dance_grpo" in runs:
            target = float(np.mean([r["train_score"] for r in runs["dance_grpo"]]))
            lines += ["", f"### Fig. 1a analogue: iterations and seconds to reach DanceGRPO's final train score "
                          f"({target:.4f}; ODE evaluation every {s['eval_every']} iterations)", "",
                      "| method | iterations | seconds |", "|---|---|---|"]
            for m, rs in runs.items():
                it, sec = _threshold(rs, target)
                lines.append(f"| {m} | {it} | {sec} |")
        lines += ["", "### Reward hacking check (best lr; final policy against the base model)", ""]
        for m, rs in runs.items():
            d = {c: np.mean([r["final"]["16"][c] for r in rs]) - base["final"]["16"][c]
                 for c in results["in_domain"] + [key, "diversity"]}
            rose = all(d[c] > 0 for c in results["in_domain"])
            verdict = (f"the in-domain rewards rose while {key} fell: reward hacking" if rose and d[key] < 0
                       else "the rewards and the judge moved together" if rose == (d[key] > 0)
                       else "the rewards and the judge moved apart")
            lines.append(f"- {m}: " + ", ".join(f"{c} {d[c]:+.3f}" for c in d) + f" -> {verdict}")
        lines.append("")
    variant = results.get("per_sde_step_variant") or {}
    if variant:
        lines += ["## G2RPO vs w/o MGAI: the update schedule alone (paper preset, same lr)", "",
                  "| method | schedule | " + " | ".join(cols) + " | clip frac | opt. steps / iter |",
                  "|---|---|" + "---|" * (len(cols) + 2)]
        paper = best_runs(results, "paper")
        for m, rs in variant.items():
            for sched, runs_ in (("per_iteration", paper[m]), ("per_sde_step", rs)):
                lines.append(f"| {m} | {sched} | " + " | ".join(_mean_std([r["final"]["16"][c] for r in runs_])
                                                                for c in cols)
                             + f" | {np.mean([r['clip_frac'] for r in runs_]):.3f} | "
                               f"{np.mean([r['optimizer_steps_per_iter'] for r in runs_]):.0f} |")
        lines.append("")
    ablation = {n: per_lr for n, per_lr in results.get("variants", {}).items() if n in LAMBDA_ABLATION}
    if ablation and "paper" in results["grid"] and "g2rpo" in results["grid"]["paper"]:
        g = best_runs(results, "paper")["g2rpo"]
        lines += ["## Table 2 analogue: the granularities Lambda (G2RPO, paper preset, its lr; 16 steps, held-out "
                  "prompts)", "", "| Lambda | " + " | ".join(cols) + " | cost / iteration |",
                  "|---|" + "---|" * (len(cols) + 1)]
        for label, runs_ in [(str(LAMBDA_ABLATION[n][2]["sampler"]["granularities"]), next(iter(p.values())))
                             for n, p in ablation.items()] + [("[1, 2, 3] (g2rpo)", g)]:
            lines.append(f"| {label} | " + " | ".join(_mean_std([r["final"]["16"][c] for r in runs_]) for c in cols)
                         + f" | {np.mean([r['cost_per_iter'] for r in runs_]):,.0f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _write_figures(out: Path, results: dict, images: dict[str, dict[str, tuple]], base_images: tuple) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(results["grid"])
    fig, axes = plt.subplots(1, len(families), figsize=(6.5 * len(families), 4.5), squeeze=False, sharey=True)
    for ax, family in zip(axes[0], families):
        for m, rs in best_runs(results, family).items():
            its = [it for it, _ in rs[0]["curve"]]
            n = min(len(r["curve"]) for r in rs)
            vals = np.array([[v for _, v in r["curve"][:n]] for r in rs])
            mean, std = vals.mean(0), vals.std(0)
            ax.plot(its[:n], mean, label=f"{m} (lr {results['lr_choice'][family][m]:g})")
            ax.fill_between(its[:n], mean - std, mean + std, alpha=0.2)
        ax.axhline(results["base"]["train_score"], color="gray", ls="--", lw=1, label="base model")
        ax.set_xlabel("iteration")
        ax.set_title(f"presets: {family} (band: ± std over seeds)", fontsize=10)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"{' + '.join(results['in_domain'])} (ODE, 16 steps, training prompts)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    (out / "grids").mkdir(exist_ok=True)
    b_images, labels, per_row = base_images
    for family, per_method in images.items():
        n = len(per_method) + 1
        fig, axes = plt.subplots(1, n, figsize=(1.1 * per_row * n * 0.45 + 1 + (2.5 if len(labels[0]) > 3 else 0),
                                                0.55 * len(labels) + 1), squeeze=False)
        draw_labelled_rows(axes[0][0], b_images, labels, per_row, "base model", label_size=6)
        for ax, (m, (imgs, _, _)) in zip(axes[0][1:], per_method.items()):
            draw_labelled_rows(ax, imgs, [""] * len(labels), per_row, f"{m}\nlr {results['lr_choice'][family][m]:g}")
        fig.suptitle(f"held-out prompts, one row per prompt, fixed noise (presets: {family})", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "grids" / f"{family}.png", dpi=110)
        plt.close(fig)
