"""Training configuration: nested dataclasses, strict YAML loading and CLI overrides.

``load_config(path, overrides)`` reads a YAML file (or the embedded lab default), applies
overrides ``a.b=value`` / ``--a.b value`` (values parsed as YAML), and checks everything
before any model loads: unknown keys, wrong types and impossible combinations raise a
:class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .models.registry import DEFAULT_FAMILY, FAMILIES, all_family_options
from .yaml_numbers import load_yaml

__all__ = ["ConfigError", "ModelConfig", "LoraConfig", "SamplerConfig", "RewardSpec", "EvalConfig", "LossConfig",
           "AdvantageConfig", "OptimConfig", "DataConfig", "TrainConfig", "load_config", "parse_overrides",
           "config_to_dict"]


class ConfigError(ValueError):
    """A configuration problem, naming the offending key."""


@dataclass
class ModelConfig:
    """The policy. Fields left null take the model family's own default (``g2rpo.models.registry``: the
    diffusers pipeline's, e.g. guidance 3.5 for Flux, 7.0 for SD3, 5.0 for Wan)."""

    kind: str = DEFAULT_FAMILY  # a family of g2rpo.models.registry.FAMILIES
    path: str | None = None  # a local folder or a Hugging Face id; null: the family's default (the lab world)
    dtype: str = "float32"  # float32 | bfloat16 | float16: parameters of the policy
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    # the family options (g2rpo.models.registry's FamilyOption rows, e.g. a video family's frames): written flat,
    # ``model.<option>: value``, kept here by name; read them as attributes (``cfg.model.<option>``: the row's default
    # when unset)
    options: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False
    cfg_detach_uncond: bool = False  # CFG families: no gradient through the negative branch (Flow-GRPO's SD3 training)
    attention_backend: str | None = None  # diffusers attention dispatch: native (SDPA) default; flash, _flash_3, ...

    #: the field holding the family options, and their specs (the decoder's hook: flat keys, one dict field)
    @staticmethod
    def flat_options() -> tuple[str, dict[str, Any]]:
        return "options", {name: spec.hint for name, spec in all_family_options().items()}

    def __getattr__(self, name: str) -> Any:  # only called for names that are not fields: the family options
        spec = all_family_options().get(name)
        if spec is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return self.__dict__.get("options", {}).get(name, spec.default)


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 32
    alpha: float = 64.0
    target_modules: list[str] = field(default_factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "proj_mlp", "proj_out"])


@dataclass
class SamplerConfig:
    strategy: str = "g2rpo"  # g2rpo | g2rpo_no_mgai | dance_grpo | flow_grpo | mix_grpo
    num_steps: int = 16
    # pipeline: the sigmas the model family's diffusers pipeline samples with by default (its scheduler config:
    # shift, dynamic shift, shift_terminal, sigma_min); shift: sigma = shift * s / (1 + (shift - 1) s) on
    # s = linspace(1, 0, T + 1), as the public G2RPO / DanceGRPO / MixGRPO scripts shift it themselves;
    # null: the family's (pipeline for Flux, SD3, Qwen-Image, FLUX.2; shift for Wan and the lab worlds)
    schedule: str | None = None
    shift: float | None = None  # the static shift of schedule: shift (null: 3.0)
    eta: float | None = None  # None: the strategy's published default
    sde_indices: list[int] | None = None  # None: the strategy's (G2RPO: the first 8 steps)
    granularities: list[int] | None = None  # None: the strategy's (G2RPO: Lambda = {1, 2, 3})
    # G2RPO: roll out a random subset of this many sde_indices per iteration (drawn from sampler_seed and the
    # iteration: the same on every rank and after --resume); null: all (the paper)
    sde_subset: int | None = None
    # G2RPO: stop evaluating a granularity whose within-group Spearman correlation with the finest one (mean over
    # the SDE steps, mgai/.../spearman) stays above this for auto_granularity_window iterations in a row; null: never
    auto_granularity_threshold: float | None = None
    auto_granularity_window: int = 8
    # G2RPO: each later SDE step branches from the state its predecessor's first branch reaches (shared
    # continuations, BranchGRPO-style) instead of from a separate anchor ODE trajectory; false: the paper
    chain_sources: bool = False
    group_size: int = 12
    max_batch: int = 64
    quantize_timesteps: bool = False
    # the dtype the initial noise is drawn in (then used as fp32): float32 | bfloat16 (the public Flux GRPO code) |
    # float16 (Flow-GRPO's SD3 pipeline draws it in the fp16 prompt embeddings' dtype)
    noise_dtype: str = "float32"
    # the dtype each SDE step's noise is drawn in: float32 (DanceGRPO, Flow-GRPO) | bfloat16 (G2RPO and MixGRPO:
    # randn_tensor(..., dtype=model_output.dtype) under bf16 autocast) | float16
    step_noise_dtype: str = "float32"
    schedule_precision: str = "float64"  # float64 | float32: the shifted sigmas computed in fp32 as the public code
    # schedule: shift only: the static shift exp(mu) from the image's sequence length as FluxPipeline and
    # QwenImagePipeline compute mu, instead of sampler.shift (schedule: pipeline is the pipeline's whole schedule)
    dynamic_shift: bool = False
    cuda_graphs: bool = False  # rollouts under torch.compile(mode="reduce-overhead") on GPU
    # rollouts under torch.compile (inductor, one graph over any row count: no padding) on any device; on the CPU
    # lab worlds the transformer's many small elementwise ops fuse (scenes: 170 -> 130 us per row); the first
    # rollout compiles (about 30 s on 2 cores, a few seconds once inductor's cache holds it)
    compile: bool = False
    # trajectory strategies (None: the strategy's default)
    train_fraction: float | None = None
    shared_noise: bool | None = None
    window_size: int | None = None
    window_stride: int | None = None
    shift_interval: int | None = None
    window_max_start: int | None = None
    train_selection: str | None = None  # per_iteration | per_sample (DanceGRPO's code) | first (Flow-GRPO's code)
    train_last_step: bool | None = None  # false: never train the last grid step (DanceGRPO's code)
    window_end: int | None = None  # MixGRPO's code: windows end before T-2 ...
    window_roll_back: bool | None = None  # ... and the start rolls back to 0 past it
    score_x0: bool | None = None  # score the last step's x0 prediction (DanceGRPO's code; its default) or the sample

    @property
    def compile_options(self) -> dict | None:
        """The rollout engine's torch.compile options: one graph over any row count with ``compile``, else none."""
        return {"dynamic": True} if self.compile else None

    def resolved_schedule(self, kind: str) -> str:
        """``schedule``, or model family ``kind``'s default (``pipeline`` or ``shift``)."""
        return self.schedule or FAMILIES[kind].defaults.schedule

    @property
    def static_shift(self) -> float:
        """The shift of the ``shift`` schedule (3.0 when unset)."""
        return 3.0 if self.shift is None else float(self.shift)


#: The dtypes noise may be drawn in (sampler.noise_dtype, sampler.step_noise_dtype).
NOISE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class RewardSpec:
    name: str = "digit_alignment"
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    frames: str = "mean"  # videos: the image reward per frame, reduced by mean | min | max
    label: str | None = None  # the name of its metrics (reward/<label>); null: its name

    @property
    def metric_name(self) -> str:
        return self.label or self.name


@dataclass
class LossConfig:
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    kl_beta: float = 0.0
    # old log-probs recomputed in the training layout (no-grad forwards) before the first update:
    # true | false | auto (on when model.dtype is not float32: batch-shape-dependent low-precision
    # kernels could otherwise move the on-policy ratio off 1)
    recompute_old_logprob: bool | str = "auto"
    # KL(policy || reference) of the step's Gaussians: "transition" divides the squared mean gap by
    # 2 std^2 with the transition std sigma_t sqrt|dt|; "flow_grpo" by 2 sigma_t^2 (Flow-GRPO's code)
    kl_convention: str = "transition"
    # leave samples whose advantages are zero at every trained step out of the loss and its normalisation
    # (Flow-GRPO's train_*.py: mask = advantages.abs().sum(dim=1) != 0)
    skip_zero_advantage: bool = False


@dataclass
class AdvantageConfig:
    """How rewards become advantages (Eq. 4, 11)."""

    # group: std over the G samples of each prompt (per granularity); batch: the std of all the
    # iteration's rewards over every prompt and rank (Flow-GRPO's global_std); the mean is per prompt
    std: str = "group"
    unbiased: bool = True  # torch .std() as G2RPO/DanceGRPO; false: np.std as Flow-GRPO
    eps: float = 1e-8  # added to the std: 1e-8 G2RPO/DanceGRPO, 1e-4 Flow-GRPO
    # several rewards: their weights as given (Eq. 11; G2RPO's code sums its per-reward advantages at weight 1), or
    # divided by their sum first (MixGRPO's train_grpo_flux.py: reward_weights normalised to sum to 1)
    normalize_weights: bool = False


@dataclass
class OptimConfig:
    lr: float = 2e-6
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    schedule: str = "constant"  # constant | linear | cosine (after warmup)
    warmup_iterations: int = 0
    # per_iteration: optimizer steps per `minibatches` of the trained step slots (the paper's
    # Algorithm 1); per_sde_step: one step per trained slot, in order, on that slot's loss, ratios
    # against the rollout's log-probs (the public G2RPO/Flow-GRPO/DanceGRPO loops)
    update_schedule: str = "per_iteration"
    # split each minibatch's samples into this many optimizer steps, step s taking the s-th part of every
    # prompt's group: gradient accumulation over samples (DanceGRPO: 12 / 4 = 3), the same on any number of ranks
    sample_minibatches: int = 1
    # shuffle the samples (one permutation per epoch) before splitting them into sample_minibatches
    # (Flow-GRPO's train_*.py: torch.randperm over the samples); false: contiguous prompt-major chunks
    shuffle_samples: bool = False


@dataclass
class DataConfig:
    prompts: str = "builtin:lab"  # a .txt (one per line), .jsonl or .json file, or builtin:lab / builtin:lab_test
    prompts_per_iteration: int = 8  # global, split evenly over ranks
    shuffle: bool = True


@dataclass
class EvalConfig:
    """Validation during training (``g2rpo.train.validation``): ODE samples of held-out prompts on fixed noise,
    scored by their own rewards, at iteration 0 (the base model) and every ``every`` iterations."""

    every: int = 0  # iterations between evaluations; 0: off
    prompts: str | None = None  # held-out prompts; null: the family's held-out set (the lab worlds'), else required
    samples: int = 2  # images per prompt (>= 2 for the diversity metric)
    steps: int | None = None  # ODE steps; null: the family's evaluation default
    seed: int = 0  # the noise: the same at every evaluation
    max_prompts: int | None = None  # the first N prompts of the file
    rewards: list[RewardSpec] = field(default_factory=list)  # empty: the family's judges (lab), else the training's
    grid_prompts: int = 4  # prompts shown in the eval grid (the same noise every time)
    keep_best: str | None = None  # eval/<reward>: export the best evaluation so far to output_dir/best
    hacking_patience: int = 3  # evaluations in a row with the training reward up and an eval reward down -> warn

    def problems(self) -> list[tuple[str, bool, str]]:
        """The section's own checks (:meth:`TrainConfig.validate` runs them)."""
        labels = [r.metric_name for r in self.rewards]
        return [
            ("eval.every", self.every >= 0, "must be >= 0 (0: off)"),
            ("eval.samples", self.samples >= 1, "must be >= 1"),
            ("eval.steps", self.steps is None or self.steps >= 1, "must be >= 1 or null"),
            ("eval.seed", self.seed >= 0, f"must be >= 0, got {self.seed}"),
            ("eval.max_prompts", self.max_prompts is None or self.max_prompts >= 1, "must be >= 1 or null"),
            ("eval.grid_prompts", self.grid_prompts >= 0, "must be >= 0"),
            ("eval.hacking_patience", self.hacking_patience >= 1, "must be >= 1"),
            ("eval.rewards", len(set(labels)) == len(labels),
             "log under eval/<label or name>: two of them would share a name; give each a label"),
            ("eval.keep_best", self.keep_best is None or (self.keep_best.startswith("eval/")
                                                          and len(self.keep_best) > 5),
             f"names an evaluation metric, eval/<reward> (e.g. eval/clip), got {self.keep_best!r}"),
            ("eval.keep_best", self.keep_best is None or self.every > 0,
             "needs evaluations: set eval.every > 0"),
        ]


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    loss: LossConfig = field(default_factory=LossConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    iterations: int = 300  # an upper bound when max_cost is set
    # stop once the run's cumulative cost (forward-row equivalents: forward rows + 3 x rows through forward and
    # backward, 4 x with gradient checkpointing) reaches this; null: no budget
    max_cost: float | None = None
    inner_epochs: int = 1
    minibatches: int = 1
    train_batch: int = 64  # max rows per training forward
    reward_batch: int = 32  # final latents decoded and scored per chunk (bounds the decoded images' memory)
    ops_backend: str = "auto"  # fused log-prob ops: auto | torch | triton | cpp | cuda (g2rpo.ops)
    seed: int = 42
    sampler_seed: int = 1223627
    ema_decay: float | None = None
    ema_every: int = 1  # update the EMA after every N-th optimizer step (Flow-GRPO: 8)
    # EMA updates toward the same weights at each qualifying optimizer step (Flow-GRPO's train_*.py call ema.step
    # once per sample micro-batch, with the optimizer step count: gradient_accumulation_steps times, Flux 6, SD3 2;
    # the effective decay is ema_decay ** ema_repeats)
    ema_repeats: int = 1
    # constant: decay ema_decay after optimizer steps s = N, 2N, ...; flow_grpo: EMAModuleWrapper's, decay
    # min((1 + s) / (10 + s), ema_decay) after steps with (s + 1) % N == 0 (s = N - 1, 2N - 1, ...)
    ema_schedule: str = "constant"
    output_dir: str = "runs/default"
    checkpoint_every: int = 50
    resume: bool = False
    overwrite: bool = False  # a fresh run may replace an earlier run's checkpoints in output_dir
    export_final: bool = True
    image_every: int = 0
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "g2rpo"
    progress: bool = True
    dist_timeout_s: int = 900  # torch.distributed collectives: a hung rank stops the others after this

    def validate(self) -> None:
        """Impossible combinations of the config's own keys, named by key (nothing above the config is imported:
        the strategy's and the rewards' own checks are :func:`g2rpo.train.check_config`'s)."""
        s = self.sampler
        checks = [
            ("iterations", self.iterations >= 1, "must be >= 1"),
            ("max_cost", self.max_cost is None or (math.isfinite(self.max_cost) and self.max_cost > 0),
             f"must be a number > 0 or null, got {self.max_cost}"),
            ("inner_epochs", self.inner_epochs >= 1, "must be >= 1"),
            ("minibatches", self.minibatches >= 1, "must be >= 1"),
            ("train_batch", self.train_batch >= 1, "must be >= 1"),
            ("reward_batch", self.reward_batch >= 1, "must be >= 1"),
            ("loss.recompute_old_logprob", self.loss.recompute_old_logprob in (True, False, "auto"),
             f"must be true, false or auto, got {self.loss.recompute_old_logprob!r}"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0 (0: only at the end)"),
            ("image_every", self.image_every >= 0, "must be >= 0"),
            ("sampler.max_batch", s.max_batch >= 1, "must be >= 1"),
            ("sampler.compile", not (s.compile and s.cuda_graphs),
             "and sampler.cuda_graphs both compile the rollouts: pick one (cuda_graphs on GPU, compile elsewhere)"),
            ("sampler.auto_granularity_threshold", s.auto_granularity_threshold is None or
             -1.0 <= s.auto_granularity_threshold <= 1.0, "must be a correlation in [-1, 1] or null"),
            ("sampler.auto_granularity_window", s.auto_granularity_window >= 1, "must be >= 1"),
            ("sampler.noise_dtype", s.noise_dtype in NOISE_DTYPES,
             f"must be one of {', '.join(NOISE_DTYPES)}, got {s.noise_dtype!r}"),
            ("sampler.step_noise_dtype", s.step_noise_dtype in NOISE_DTYPES,
             f"must be one of {', '.join(NOISE_DTYPES)}, got {s.step_noise_dtype!r}"),
            ("sampler.schedule_precision", s.schedule_precision in ("float64", "float32"),
             f"must be float64 or float32, got {s.schedule_precision!r}"),
            ("sampler.shift", s.shift is None or (math.isfinite(s.shift) and s.shift > 0), "must be > 0 or null"),
            ("sampler.schedule", s.schedule in (None, "pipeline", "shift"),
             f"must be pipeline, shift or null (the model family's), got {s.schedule!r}"),
            ("sampler.num_steps", s.num_steps >= 1, "must be >= 1"),
            ("sampler.group_size", s.group_size >= 2, "must be >= 2"),
            ("data.prompts_per_iteration", self.data.prompts_per_iteration >= 1, "must be >= 1"),
            ("loss.clip_range", self.loss.clip_range > 0, "must be > 0"),
            ("loss.adv_clip_max", self.loss.adv_clip_max > 0, "must be > 0"),
            ("loss.kl_beta", self.loss.kl_beta >= 0, "must be >= 0"),
            ("optim.lr", self.optim.lr > 0, "must be > 0"),
            ("optim.betas", len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas),
             "must be two numbers in [0, 1)"),
            ("optim.max_grad_norm", self.optim.max_grad_norm > 0, "must be > 0"),
            ("optim.schedule", self.optim.schedule in ("constant", "linear", "cosine"),
             "must be constant, linear or cosine"),
            ("optim.warmup_iterations", self.optim.warmup_iterations >= 0, "must be >= 0"),
            ("optim.update_schedule", self.optim.update_schedule in ("per_iteration", "per_sde_step"),
             f"must be per_iteration or per_sde_step, got {self.optim.update_schedule!r}"),
            ("optim.sample_minibatches", self.optim.sample_minibatches >= 1, "must be >= 1"),
            ("minibatches", self.optim.update_schedule == "per_iteration" or self.minibatches == 1,
             "must be 1 with optim.update_schedule=per_sde_step (it makes one step per trained slot)"),
            ("optim.sample_minibatches", self.optim.sample_minibatches <= (
                self.sampler.group_size * self.data.prompts_per_iteration if self.optim.shuffle_samples
                else self.sampler.group_size),
             "must be <= sampler.group_size (step s trains part s of every prompt's group; with optim.shuffle_samples "
             "<= the samples per iteration)"),
            ("advantage.std", self.advantage.std in ("group", "batch"), f"must be group or batch, "
             f"got {self.advantage.std!r}"),
            ("advantage.eps", self.advantage.eps >= 0, "must be >= 0"),
            ("advantage.normalize_weights", not self.advantage.normalize_weights or
             sum(r.weight for r in self.rewards) > 0,
             "divides the rewards' weights by their sum, which must be > 0; got weights "
             f"{[r.weight for r in self.rewards]}"),
            ("loss.kl_convention", self.loss.kl_convention in ("transition", "flow_grpo"),
             f"must be transition or flow_grpo, got {self.loss.kl_convention!r}"),
            ("ema_decay", self.ema_decay is None or 0 < self.ema_decay < 1, "must be in (0, 1) or null"),
            ("ema_every", self.ema_every >= 1, "must be >= 1"),
            ("ema_repeats", self.ema_repeats >= 1, "must be >= 1"),
            ("ema_schedule", self.ema_schedule in ("constant", "flow_grpo"),
             f"must be constant or flow_grpo, got {self.ema_schedule!r}"),
            ("model.kind", self.model.kind in FAMILIES, f"must be one of {', '.join(FAMILIES)}"),
            ("model.height", self.model.height is None or self.model.height >= 1, "must be >= 1"),
            ("model.width", self.model.width is None or self.model.width >= 1, "must be >= 1"),
            ("model.dtype", self.model.dtype in ("float32", "bfloat16", "float16"),
             "must be float32, bfloat16 or float16"),
            ("lora.rank", self.lora.rank >= 1, "must be >= 1"),
            ("rewards", len(self.rewards) >= 1, "must name at least one reward model"),
            ("rewards", len({r.metric_name for r in self.rewards}) == len(self.rewards),
             "log under reward/<label or name>: two of them would share " + ", ".join(sorted(
                 f"reward/{n}" for n in {r.metric_name for r in self.rewards}
                 if [s.metric_name for s in self.rewards].count(n) > 1)) + " (one overwriting the other); give "
             "each a label: rewards: [{name: remote, label: alignment, ...}, {name: remote, label: realism, ...}]"),
            ("rewards", all(r.label is None or (r.label.strip() and "/" not in r.label) for r in self.rewards),
             "labels name metrics: non-empty, without '/'"),
            ("ops_backend", self.ops_backend in ("auto", "torch", "triton", "cpp", "cuda"),
             "must be auto, torch, triton, cpp or cuda"),
        ]
        if self.model.kind in FAMILIES:  # a family option set for a family without it is an error, never dropped
            fam, specs = FAMILIES[self.model.kind], all_family_options()
            for key, value in self.model.options.items():
                if key not in fam.option_names:
                    raise ConfigError(f"model.{key} does not apply to model.kind {self.model.kind!r} (only to "
                                      f"{', '.join(n for n, f in FAMILIES.items() if key in f.option_names)})")
                problem = specs[key].problem(value)
                if problem:
                    raise ConfigError(f"model.{key} {problem}")
        if self.model.kind in FAMILIES and s.schedule in (None, "pipeline", "shift"):
            fam = FAMILIES[self.model.kind]
            sched = s.resolved_schedule(fam.name)
            if sched == "pipeline":
                why = "sampler.schedule: pipeline takes the pipeline scheduler's own"
                checks += [
                    ("sampler.schedule", fam.defaults.schedule == "pipeline",
                     f"pipeline: {fam.title} has no flow-match Euler pipeline schedule ("
                     + ("its pipeline's default scheduler is UniPC" if fam.pipeline else "it has no diffusers pipeline")
                     + "); use sampler.schedule: shift"),
                    ("sampler.shift", s.shift is None, f"is set ({s.shift}), but {why} (set sampler.schedule: shift "
                     f"to shift linspace(1, 0, T+1) as the public GRPO scripts do)"),
                    ("sampler.dynamic_shift", not s.dynamic_shift, f"is set, but {why} (dynamic or not)"),
                    ("sampler.schedule_precision", s.schedule_precision == "float64",
                     f"is {s.schedule_precision}, but {why} (fp32, as the scheduler computes it)"),
                ]
            else:
                checks.append(("sampler.dynamic_shift", not s.dynamic_shift or s.shift is None,
                               f"replaces sampler.shift ({s.shift}) by the pipeline's exp(mu): set one of them"))
        finite = math.isfinite
        checks += [
            ("seed", self.seed >= 0, f"must be >= 0, got {self.seed}"),
            ("sampler_seed", self.sampler_seed >= 0, f"must be >= 0, got {self.sampler_seed}"),
            ("optim.lr", finite(self.optim.lr), f"must be finite, got {self.optim.lr}"),
            ("optim.lr", self.optim.lr <= 1.0, f"must be <= 1 (AdamW fine-tuning uses 1e-6 to 3e-4), got {self.optim.lr}"),
            ("loss.clip_range", finite(self.loss.clip_range), f"must be finite, got {self.loss.clip_range}"),
            ("loss.adv_clip_max", finite(self.loss.adv_clip_max), f"must be finite, got {self.loss.adv_clip_max}"),
            ("loss.kl_beta", finite(self.loss.kl_beta), f"must be finite, got {self.loss.kl_beta}"),
            ("dist_timeout_s", self.dist_timeout_s >= 1, "must be >= 1"),
            ("output_dir", all(len(part.encode()) <= 255 for part in Path(self.output_dir).parts),
             "has a folder name over 255 bytes, longer than file systems allow: "
             f"{next((p for p in Path(self.output_dir).parts if len(p.encode()) > 255), '')[:60]}..."),
        ]
        checks += self.eval.problems()
        for key, ok, msg in checks:
            if not ok:
                raise ConfigError(f"{key} {msg}")


# ---- strict (de)serialisation -----------------------------------------------------------

def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:  # X | None: X's own message (it says how to write the value)
            raise errors[0]
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(hint, value, key)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            hint = (f" (write a YAML list: {key}=[{value}] on the command line, or [{value}] in a file)"
                    if isinstance(value, str) and "," in value else "")
            raise ConfigError(f"{key}: expected a list, got {value!r}{hint}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover


def _schema(cls: type) -> tuple[dict[str, Any], set[str], str | None]:
    """``(type hints, keys, flat-options field)`` of a config dataclass: a class with ``flat_options()`` takes
    the keys it lists flat and keeps them in that one dict field (ModelConfig's family options)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    flat = getattr(cls, "flat_options", None)
    if flat is None:
        return hints, names, None
    field_name, extra = flat()
    return {**hints, **extra}, (names - {field_name}) | set(extra), field_name


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints, names, flat = _schema(cls)
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise ConfigError(_unknown_key_message(f"{prefix}." if prefix else "", unknown[0], names))
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    if flat is not None:
        own = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in kwargs.items() if k in own} | {flat: {k: v for k, v in kwargs.items()
                                                                       if k not in own}}
    return cls(**kwargs)


def _unknown_key_message(where: str, key: str, names: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.6)
    hint = f"; did you mean {where}{close[0]}?" if close else ""
    return f"unknown config key {where}{key!s}{hint} (valid keys here: {sorted(names)})"


def _unknown_keys(cls: type, data: Any, prefix: str = "") -> list[str]:
    """Messages for the keys of ``data`` that ``cls`` (a config dataclass) does not have, at any depth."""
    if not isinstance(data, dict):
        return []
    hints, names, _ = _schema(cls)
    out = []
    for key, value in data.items():
        if key not in names:
            out.append(_unknown_key_message(prefix, key, names))
            continue
        hint = hints[key]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        if dataclasses.is_dataclass(hint):
            out += _unknown_keys(hint, value, f"{prefix}{key}.")
        elif typing.get_origin(hint) is list and isinstance(value, list):
            (item,) = typing.get_args(hint)
            if dataclasses.is_dataclass(item):
                for i, v in enumerate(value):
                    out += _unknown_keys(item, v, f"{prefix}{key}[{i}].")
    return out


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as the nested mapping a YAML file holds (``model``'s family options flat, as written)."""
    d = dataclasses.asdict(cfg)
    d["model"].update(d["model"].pop("options"))
    return d


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["a.b=1", "--c.d", "x", "--e=2"]`` -> nested dict, values parsed as YAML."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            arg = arg[2:]
            if "=" not in arg:
                if i + 1 >= len(args) or args[i + 1].startswith("--") or "=" in args[i + 1]:
                    raise ConfigError(f"--{arg} needs a value (--{arg} VALUE or {arg}=VALUE)")
                arg = f"{arg}={args[i + 1]}"
                i += 1
        if "=" not in arg:
            raise ConfigError(f"cannot parse override {args[i]!r}: use key=value or --key value")
        key, raw = arg.split("=", 1)
        key = key.replace("-", "_")
        try:
            value = load_yaml(raw) if raw != "" else ""
        except RecursionError:
            raise ConfigError(f"override {key}: the value is nested too deeply to be a setting") from None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key} conflicts with another override")
        node[parts[-1]] = value
        i += 1
    return out


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, mappings merged key by key (a reward's ``options`` replaced whole), anything else
    replaced; neither input is changed."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def default_config_path() -> Path:
    """The embedded default: ``configs/lab.yaml``, shipped with the package as ``g2rpo.configs``."""
    from importlib import resources

    return Path(str(resources.files("g2rpo.configs").joinpath("lab.yaml")))


def read_config_file(path: Path) -> dict[str, Any]:
    """One YAML config file as a mapping (ConfigError naming the file when it is missing or unreadable)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err})") from None
    try:
        data = load_yaml(text) or {}
    except RecursionError:
        raise ConfigError(f"{path}: a value is nested too deeply to be a setting") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error: {str(err).replace('<unicode string>', str(path))}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _family_alias(data: dict[str, Any], where: str) -> dict[str, Any]:
    """``model.family`` (the registry's word for a model family) read as ``model.kind`` (the config's key)."""
    model = data.get("model")
    if not isinstance(model, dict) or "family" not in model:
        return data
    if "kind" in model and model["kind"] != model["family"]:
        raise ConfigError(f"{where}: model.family ({model['family']!r}) and model.kind ({model['kind']!r}) name the "
                          "same setting (the model family): give one")
    model = {("kind" if k == "family" else k): v for k, v in model.items()}
    return {**data, "model": model}


def load_config(path: str | Path | list[str | Path] | tuple | None = None,
                overrides: list[str] | dict[str, Any] | None = None, log=None,
                base: dict[str, Any] | None = None, after_files: dict[str, Any] | None = None) -> TrainConfig:
    """Load and validate a config (the embedded lab default when ``path`` is None).

    ``path`` may be several YAML files, merged left to right (a model config, then a method
    preset from ``configs/methods/``); ``overrides`` are applied last. Files that hold no ``model``
    section are method presets: given alone, they combine with the embedded lab default, and
    ``log`` (when given) is told so. ``base`` (a stored run's config, for ``--resume``) replaces the
    embedded default as the starting point. ``after_files`` is merged over the files, before the overrides (``--lab``:
    a preset at lab scale, :func:`g2rpo.lab.scale.at_lab_scale`). An unknown key is named with the file that holds it.
    """
    paths = [] if path is None else ([Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)])
    files = [(p, _family_alias(read_config_file(p), str(p))) for p in paths]
    for p, d in files:
        problems = _unknown_keys(TrainConfig, d)
        if problems:
            raise ConfigError(f"{p}: {problems[0]}")
    if base is not None:
        data = dict(base)
    elif not files or all("model" not in d for _, d in files):
        data = read_config_file(default_config_path())
        if files and log is not None:
            log(f"note: {', '.join(str(p) for p, _ in files)} holds no model section (a method preset): "
                f"combined with the embedded lab default ({default_config_path().name}); add a model config "
                "first to train a real model, e.g. --config configs/flux_hps.yaml --config " + str(files[-1][0]))
    else:
        data = {}
    for _, d in files:
        data = merge_dicts(data, d)
    if after_files:
        data = merge_dicts(data, after_files)
    if overrides:
        extra = _family_alias(parse_overrides(overrides) if isinstance(overrides, list) else overrides, "command line")
        problems = _unknown_keys(TrainConfig, extra)
        if problems:
            raise ConfigError(f"command line: {problems[0]}")
        data = merge_dicts(data, extra)
    try:
        cfg = from_dict(TrainConfig, data)
    except RecursionError:  # a value nested thousands deep (a YAML list of lists of ...)
        raise ConfigError("a config value is nested too deeply to be a setting (lists of lists of ...)") from None
    cfg.validate()
    return cfg
