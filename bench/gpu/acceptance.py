"""GPU acceptance and benchmark stages (issue 11), one stage per process, driven by ``run.sh``.

    python bench/gpu/acceptance.py --stage rollout --device cuda --out DIR     # one stage -> DIR/stage_rollout.json
    python bench/gpu/acceptance.py --report --out DIR                         # DIR/report.json + report.md

Stages: ``rollout`` (a: paper-setting G2RPO rollout of one prompt vs the public loop structure and a
DanceGRPO-style rollout, achieved TFLOP/s against a measured bf16 matmul peak), ``graphs`` (b: compiled
rollouts with bucketed chunk shapes, on/off), ``ops`` (c: fused ops vs torch eager and a copy's
bandwidth), ``train_step`` (d: one G2RPO training step with FSDP2 bf16 on one device at full width,
reduced depth), ``ratio`` (e: the on-policy ratio in bf16 through the trainer), ``memory`` (f: rollout
peak memory at max_batch 16/32/64). ``--tiny`` runs every stage on tiny models (CPU, CI); items that
need a GPU are reported as skipped, with the reason. Nothing is downloaded: full-size models are the
Flux.1-dev architecture with random bf16 weights built from its config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from g2rpo.testing import PAPER_SETTING as PAPER

STAGES = ("rollout", "graphs", "ops", "train_step", "ratio", "memory")
STAGE_ORDER = ("ops", "rollout", "ratio", "train_step", "memory", "graphs")  # by value: what a short lease runs first


@dataclass
class Ctx:
    device: torch.device
    tiny: bool
    out: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def skip(self, what: str) -> dict:
        return {"skipped": f"{what} needs a GPU (this run: {self.device.type}{', tiny' if self.tiny else ''})"}


# ---- helpers -------------------------------------------------------------------------------

def _sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def _timed(ctx: Ctx, fn):
    _sync(ctx)
    t0 = time.perf_counter()
    out = fn()
    _sync(ctx)
    return time.perf_counter() - t0, out


def _flux(ctx: Ctx, depth: tuple[int, int] | None = None, fp32_master: bool = False):
    """(velocity, cond, noise): tiny Flux at 64x64 (CPU) or the Flux.1-dev architecture at 720x720, bf16."""
    from g2rpo.testing.tiny import FLUX_DEV_TRANSFORMER, TINY_FLUX_TRANSFORMER, random_flux_velocity

    cfg = dict(TINY_FLUX_TRANSFORMER if ctx.tiny else FLUX_DEV_TRANSFORMER)
    if depth is not None and not ctx.tiny:
        cfg["num_layers"], cfg["num_single_layers"] = depth
    size, text_len = (64, 8) if ctx.tiny else (720, 512)
    dtype = torch.float32 if (ctx.tiny or fp32_master) else torch.bfloat16
    return random_flux_velocity(cfg, size, size, device=ctx.device, dtype=dtype, text_len=text_len)


def _flops_per_row(velocity, cond, noise) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        velocity(noise, torch.ones(1, device=noise.device), cond)
    return float(counter.get_total_flops())


def _matmul_peak(ctx: Ctx) -> dict:
    """Measured matmul throughput in the same run: 8192^3 bf16 on a GPU, 1024^3 fp32 on CPU."""
    n, dtype = (8192, torch.bfloat16) if ctx.cuda else (1024, torch.float32)
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 10 if ctx.cuda else 3
    sec, _ = _timed(ctx, lambda: [a @ b for _ in range(reps)])
    return {"matmul": f"{n}^3 {str(dtype).split('.')[-1]}", "tflops": 2 * n ** 3 * reps / sec / 1e12}


def _gen(ctx: Ctx, seed: int = 1) -> torch.Generator:
    return torch.Generator(device=ctx.device).manual_seed(seed)


def _public_rows(setting: dict, latent_shape) -> int:
    """Forward rows of the public loop for ``setting`` (counted on a zero velocity, cheap)."""
    from g2rpo.testing import public_loop_rollout

    zero = lambda x, s, c: torch.zeros_like(x)  # noqa: E731
    _, rows = public_loop_rollout(zero, torch.zeros(1, *latent_shape), None, generator=torch.Generator(), **setting)
    return rows


def _rate(rows: int, sec: float, flop_row: float, peak: float) -> dict:
    tflops = rows * flop_row / sec / 1e12
    return {"seconds": sec, "forward_rows": rows, "rows_per_s": rows / sec, "tflops": tflops,
            "pct_of_matmul_peak": 100 * tflops / peak}


# ---- stages --------------------------------------------------------------------------------

def stage_rollout(ctx: Ctx) -> dict:
    """(a) one prompt, paper setting: the engine vs the public loop structure vs a DanceGRPO-style rollout."""
    from g2rpo import G2RPOSampler
    from g2rpo.testing import public_loop_rollout

    velocity, cond, noise = _flux(ctx)
    flop_row = _flops_per_row(velocity, cond, noise)
    peak = _matmul_peak(ctx)
    max_batch = 64 if ctx.tiny else 24
    engine = G2RPOSampler(velocity, max_batch=max_batch, **PAPER)
    if ctx.cuda:  # warm-up: kernels, allocator (one full chunk; the cond rows follow the latent rows)
        rows = {k: v.expand(max_batch, *v.shape[1:]) for k, v in cond.items()}
        with torch.no_grad():
            velocity(noise.expand(max_batch, *noise.shape[1:]), torch.ones(max_batch, device=ctx.device), rows)
    sec, ro = _timed(ctx, lambda: engine.rollout(noise, cond, generator=_gen(ctx)))
    res = {"model": "tiny Flux 64x64 fp32" if ctx.tiny else "Flux.1-dev architecture 720x720 bf16 (random)",
           "setting": {k: list(v) if isinstance(v, tuple) else v for k, v in PAPER.items()}, "max_batch": max_batch,
           "flop_per_row": flop_row, "matmul_peak": peak, "engine": _rate(ro.forward_rows, sec, flop_row,
                                                                           peak["tflops"])}
    # the public loop: batch 1 per branch, v_k recomputed per branch; a subset of k on the full model
    sub = dict(PAPER, sde_indices=(0, 7))  # scaled to all of M by rows (CPU and GPU alike)
    psec, (_, prow) = _timed(ctx, lambda: public_loop_rollout(velocity, noise, cond, generator=_gen(ctx), **sub))
    full_rows = _public_rows(PAPER, noise.shape[1:])
    est = psec * full_rows / prow
    res["public_loop"] = dict(_rate(full_rows, est, flop_row, peak["tflops"]), measured_k=list(sub["sde_indices"]),
                              measured_rows=prow, measured_seconds=psec, scaled=prow != full_rows)
    dance = G2RPOSampler(velocity, max_batch=max_batch, strategy="dance_grpo", num_steps=16, group_size=12)
    dnoise = dance.initial_noise(1, tuple(noise.shape[1:]), generator=_gen(ctx, 2), device=ctx.device)
    dsec, dro = _timed(ctx, lambda: dance.rollout(dnoise, cond, generator=_gen(ctx)))
    res["dance_grpo"] = _rate(dro.forward_rows, dsec, flop_row, peak["tflops"])
    res["speedup_vs_public_loop"] = est / sec
    res["time_ratio_vs_dance_grpo"] = sec / dsec
    return res


def stage_graphs(ctx: Ctx) -> dict:
    """(b) compiled rollouts (CUDA graphs on a GPU) vs eager; the number of compiled graphs and the padding."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from g2rpo import G2RPOSampler

    velocity, cond, noise = _flux(ctx, depth=(2, 4))
    max_batch = 64 if ctx.tiny else 24
    eager = G2RPOSampler(velocity, max_batch=max_batch, **PAPER)
    sec_eager, ro_eager = _timed(ctx, lambda: eager.rollout(noise, cond, generator=_gen(ctx)))
    dynamo.reset()
    counters.clear()
    opts = {} if ctx.cuda else {"compile_options": {"backend": "eager"}}
    graphed = G2RPOSampler(velocity, max_batch=max_batch, cuda_graphs=ctx.cuda, **opts, **PAPER)
    with dynamo.config.patch(fail_on_recompile_limit_hit=True):
        sec_first, _ = _timed(ctx, lambda: graphed.rollout(noise, cond, generator=_gen(ctx)))
        sec_graph, ro = _timed(ctx, lambda: graphed.rollout(noise, cond, generator=_gen(ctx)))
    res = {"model": "tiny Flux" if ctx.tiny else "Flux.1-dev width, 2+4 blocks, 720x720 bf16 (random)",
           "compile": "cuda_graphs (reduce-overhead)" if ctx.cuda else "torch.compile backend=eager (graph count only)",
           "compiled_graphs": int(counters["stats"]["unique_graphs"]),
           "graph_breaks": int(sum(counters["graph_break"].values())),
           "buckets": list(graphed.engine.batch_buckets), "forward_rows": ro.forward_rows,
           "padded_rows": ro.padded_rows, "padding_waste_pct": 100 * ro.padded_rows / (ro.forward_rows + ro.padded_rows),
           "max_abs_diff_vs_eager": float((ro.finals - ro_eager.finals).abs().max()),
           "eager_seconds": sec_eager}
    if ctx.cuda:
        res.update(first_rollout_seconds_with_capture=sec_first, graphed_seconds=sec_graph,
                   speedup=sec_eager / sec_graph)
    else:
        res["timing"] = ctx.skip("CUDA-graph timing")
    dynamo.reset()
    return res


def stage_ops(ctx: Ctx) -> dict:
    """(c) fused ops vs torch eager (12 x 2025 x 64 fp32: one group of 720x720 latents) and bandwidth."""
    from g2rpo.ops import available_backends, logprob_ratio_loss, sde_step_logprob

    B, shape = 12, (2025, 64)
    backends = [b for b in ("torch", "triton", "cpp", "cuda") if b in available_backends()
                and (ctx.cuda or b in ("torch", "cpp"))]
    g = torch.Generator().manual_seed(0)

    def inputs(shared: bool, rows: int = B):
        n = 1 if shared else rows
        t = [torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g),
             torch.randn(rows, *shape, generator=g), 1 + 0.1 * torch.rand(rows, generator=g),
             -0.1 * torch.rand(rows, generator=g), 0.1 + 0.2 * torch.rand(rows, generator=g)]
        return [x.to(ctx.device) for x in t]

    def best(fn, reps: int = 20) -> float:
        fn()
        times = []
        for _ in range(reps):
            times.append(_timed(ctx, fn)[0])
        return min(times)

    res: dict = {"shape": f"{B}x2025x64 fp32", "backends": backends}
    for shared in (True, False):
        x, v, z, a, b, s = inputs(shared)
        x_next = sde_step_logprob(x, v, z, a, b, s, backend="torch")[0]
        old, adv = torch.zeros(B, device=ctx.device), torch.randn(B, generator=g).to(ctx.device)
        vv = v.clone().requires_grad_(True)
        for be in backends:
            def loss(be=be):
                vv.grad = None
                logprob_ratio_loss(x, x_next, vv, old, adv, a, b, s, 1e-4, 5.0, backend=be).loss.sum().backward()

            key = f"{'shared' if shared else 'per_row'}/{be}"
            res[f"sde_step_ms/{key}"] = 1e3 * best(lambda be=be: sde_step_logprob(x, v, z, a, b, s, backend=be))
            res[f"loss_fwd_bwd_ms/{key}"] = 1e3 * best(loss)
        for be in backends[1:]:
            key = f"{'shared' if shared else 'per_row'}"
            for what in ("sde_step_ms", "loss_fwd_bwd_ms"):
                res[f"speedup_vs_torch/{what}/{key}/{be}"] = res[f"{what}/{key}/torch"] / res[f"{what}/{key}/{be}"]
    for be in ("triton", "cuda"):
        if not ctx.cuda:
            res[f"{be}"] = ctx.skip(f"the {be} backend")
        elif be not in backends:
            res[f"{be}"] = {"skipped": f"{be} backend not available here"}
    if ctx.cuda:  # bandwidth: per-row sde_step on 256 rows (x, v, noise read; x_next written) vs a copy
        x, v, z, a, b, s = inputs(False, rows=256)
        src = torch.empty(z.numel() * 4, dtype=torch.float32, device=ctx.device)
        dst = torch.empty_like(src)
        copy_bw = 2 * src.numel() * 4 / best(lambda: dst.copy_(src)) / 1e9
        res["copy_GBps"] = copy_bw
        for be in backends:
            bw = 4 * z.numel() * 4 / best(lambda be=be: sde_step_logprob(x, v, z, a, b, s, backend=be)) / 1e9
            res[f"sde_step_GBps/{be}"] = bw
            res[f"sde_step_pct_of_copy/{be}"] = 100 * bw / copy_bw
    else:
        res["bandwidth"] = ctx.skip("bandwidth vs a device-to-device copy")
    return res


def _init_single_process_group(ctx: Ctx) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        store = tempfile.mktemp(prefix="g2rpo_pg_")
        dist.init_process_group("nccl" if ctx.cuda else "gloo", init_method=f"file://{store}", rank=0, world_size=1)


def stage_train_step(ctx: Ctx) -> dict:
    """(d)+(e) one G2RPO training step (forward+backward at the shared x_k for 8 k, AdamW) under FSDP2
    with a bf16 param dtype on one device; full width, reduced depth. Also the first ratio, with and
    without the old log-probs recomputed in the training layout."""
    from g2rpo import G2RPOSampler
    from g2rpo.distributed import rollout_mode, shard_module
    from g2rpo.loss import clipped_surrogate
    from g2rpo.rollout.scoring import TrainingUnit, recompute_old_logprobs, score_unit

    _init_single_process_group(ctx)
    velocity, cond, noise = _flux(ctx, depth=(2, 4), fp32_master=True)
    module = velocity.transformer.requires_grad_(True)
    shard_module(module, [*module.transformer_blocks, *module.single_transformer_blocks], ctx.device,
                 param_dtype=torch.bfloat16)
    velocity.compute_dtype = torch.bfloat16
    autocast = lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16)  # noqa: E731
    sampler = G2RPOSampler(velocity, max_batch=64 if ctx.tiny else 24, **PAPER)
    with rollout_mode(module), autocast():
        ro = sampler.rollout(noise, cond, generator=_gen(ctx))
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    adv = torch.randn(1, 8, 12, generator=torch.Generator().manual_seed(0)).to(ctx.device)
    module.train()
    with autocast():  # the training layout: one unit (prompt 0, all 12 branches) per SDE step
        old, _ = recompute_old_logprobs(velocity, ro, [[TrainingUnit(k, slice(0, 1))] for k in range(8)], cond)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    first = {}

    def step():
        opt.zero_grad(set_to_none=True)
        for k in range(8):
            with autocast():
                logp = score_unit(velocity, ro, TrainingUnit(k, slice(0, 1)), cond).log_prob
            if k == 0:
                first["rollout"] = float((logp.detach() - ro.log_probs[0, 0]).exp().sub(1).abs().max())
                first["recomputed"] = float((logp.detach() - old[0, 0]).exp().sub(1).abs().max())
            sur = clipped_surrogate(logp, old[0, k], adv[0, k], 1e-4, 5.0)
            (sur.loss.sum() / (8 * 12)).backward()
        opt.step()

    sec, _ = _timed(ctx, step)
    res = {"model": "tiny Flux (fp32 masters, bf16 FSDP2)" if ctx.tiny else
           "Flux.1-dev width, 2+4 blocks, 720x720, fp32 masters, FSDP2 param bf16 / reduce fp32",
           "step_seconds": sec, "forward_rows": 8, "branches_scored": 8 * 12,
           "ratio_first_max_dev": first["rollout"], "ratio_first_max_dev_recomputed": first["recomputed"]}
    res["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30 if ctx.cuda else ctx.skip("peak memory")
    import torch.distributed as dist

    dist.destroy_process_group()
    return res


def stage_ratio(ctx: Ctx) -> dict:
    """(e) the on-policy ratio in bf16 through the trainer (lab world, first minibatch), with the old
    log-probs from the rollout and recomputed in the training layout."""
    from g2rpo.config import load_config
    from g2rpo.lab import build_world
    from g2rpo.train import Trainer

    world = build_world(log=None)  # $G2RPO_CACHE/lab/base: built there once, reused by later runs
    res: dict = {"model": "lab world (tiny Flux transformer), model.dtype=bfloat16, 8 prompts, paper setting"}
    for recompute in (False, True):
        cfg = load_config(None, {"model": {"path": str(world), "dtype": "bfloat16"}, "iterations": 1,
                                 "loss": {"recompute_old_logprob": recompute}, "progress": False,
                                 "tensorboard": False, "export_final": False, "checkpoint_every": 0,
                                 "output_dir": str(ctx.out / f"ratio_run_{recompute}"), "overwrite": True})
        m = Trainer(cfg, log=lambda *a, **k: None).run()[0]
        key = "recomputed" if recompute else "rollout"
        res[f"ratio_first_max_dev/{key}"] = m["ratio_first_max_dev"]
        res[f"forward_rows/{key}"] = m["forward_rows"]
        if recompute:
            res["recompute_forward_rows"] = m["recompute_forward_rows"]
            res["old_logprob_max_dev"] = m["old_logprob_max_dev"]
    res["ratio_first_max_dev"] = res["ratio_first_max_dev/rollout"]
    return res


def stage_memory(ctx: Ctx) -> dict:
    """(f) rollout peak memory at max_batch 16/32/64 (full-size Flux, e 0..3 so every bucket fills)."""
    from g2rpo import G2RPOSampler

    velocity, cond, noise = _flux(ctx)
    setting = dict(PAPER, sde_indices=(0, 1, 2, 3))
    res: dict = {"setting": "T=16, e 0..3, Lambda {1,2,3}, G=12, one prompt"}
    if ctx.cuda:
        res["weights_GiB"] = torch.cuda.memory_allocated() / 2 ** 30
    for mb in (16, 32, 64):
        if ctx.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sampler = G2RPOSampler(velocity, max_batch=mb, **setting)
        sec, ro = _timed(ctx, lambda: sampler.rollout(noise, cond, generator=_gen(ctx)))
        res[f"max_batch_{mb}"] = {"seconds": sec, "forward_rows": ro.forward_rows, "forward_calls": ro.forward_calls,
                                  "peak_GiB": torch.cuda.max_memory_allocated() / 2 ** 30 if ctx.cuda
                                  else ctx.skip("CUDA peak memory")}
    return res


# ---- report --------------------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and "skipped" not in v:
            out += _flatten(v, key + ".")
        else:
            out.append((key, v["skipped"] if isinstance(v, dict) else v))
    return out


def write_report(out: Path) -> dict:
    setup = json.loads((out / "setup.json").read_text()) if (out / "setup.json").is_file() else {}
    report = {"device": setup.get("device"), "setup": setup, "stages": {}}
    for name in STAGES:
        f = out / f"stage_{name}.json"
        report["stages"][name] = (json.loads(f.read_text()) if f.is_file()
                                  else {"status": "not run", "reason": "no result in this folder (--stage ran others)"})
    report["stages"] = {n: report["stages"][n] for n in STAGE_ORDER}  # in order of value, as run.sh runs them
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = ["# g2rpo GPU acceptance report\n", f"device: {report['device']}\n"]
    for key, value in _flatten(setup):
        lines.append(f"- {key}: {value}")
    for name, stage in report["stages"].items():
        lines += [f"\n## {name}: {stage.get('status')}\n", "| item | value |", "|---|---|"]
        for key, value in _flatten({k: v for k, v in stage.items() if k != "status"}):
            value = f"{value:.4g}" if isinstance(value, float) else value
            lines.append(f"| {key} | {str(value).replace('|', '/')} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny models (CPU and CI)")
    p.add_argument("--out", required=True)
    p.add_argument("--report", action="store_true", help="collect the stages into report.json / report.md")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.report:
        report = write_report(out)
        bad = [n for n, s in report["stages"].items() if s.get("status") not in ("ok", "not run")]
        skipped = [n for n, s in report["stages"].items() if s.get("status") == "not run"]
        if skipped:
            print(f"not run (budget or --stage): {skipped}")
        print(f"report: {out / 'report.json'}" + (f" (not ok: {bad})" if bad else ""))
        return 1 if bad else 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda but torch sees no GPU: use --device cpu --tiny", file=sys.stderr)
        return 2
    ctx = Ctx(torch.device(a.device), a.tiny, out)
    print(f"[{a.stage}] start on {torch.cuda.get_device_name() if ctx.cuda else 'cpu'}", flush=True)
    t0 = time.perf_counter()
    try:
        res = {"status": "ok", **globals()[f"stage_{a.stage}"](ctx)}
    except Exception as err:  # noqa: BLE001  (a failed stage is reported, the run goes on)
        traceback.print_exc()
        res = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    res["device"] = torch.cuda.get_device_name() if ctx.cuda else "cpu"
    res["stage_seconds"] = time.perf_counter() - t0
    (out / f"stage_{a.stage}.json").write_text(json.dumps(res, indent=1))
    print(f"[{a.stage}] {res['status']} in {res['stage_seconds']:.1f} s", flush=True)
    return 0 if res["status"] == "ok" else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
