"""One row per model family: where it loads from, what its folder holds, its own defaults.

Everything that depends on the family asks this table: the loaders (:func:`load_family`), the
trainer's preflight (the files), eval (which family a folder holds, its defaults), the drop-in
``pipelines`` (which family a pipeline object is) and config validation (the names). Adding a
family is a row here and an adapter file. No heavy import happens here: adapters and pipeline
classes are named by import path and imported when used.

Defaults are the diffusers pipeline's own ``__call__`` defaults (diffusers 0.42), read from
``pipelines/<family>/pipeline_*.py``: the resolution is ``default_sample_size * vae_scale_factor``
for the image pipelines. ``eval_steps`` is the evaluation protocol g2rpo follows: the paper's
(Sec. 5.1: 50 steps at 1024x1024) for Flux, the pipeline's own steps for the others. ``schedule`` is the
schedule a config without ``sampler.schedule`` samples with: the pipeline's own default one where its scheduler
is flow-match Euler (an ODE rollout then equals ``pipe(prompt, num_inference_steps=T)``), else the static
``shift`` (Wan: the scheduler config's 3.0 at 480p, as DanceGRPO's Wan code uses).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_FAMILY", "FAMILIES", "FamilyDefaults", "FamilyOption", "ModelFamily", "all_family_options", "family",
           "family_of_folder",
           "family_of_pipeline", "import_path", "load_family", "require_files", "settings"]

_DIFFUSERS = ("model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json")


@dataclass(frozen=True)
class FamilyDefaults:
    height: int | None  # None: set by the model itself (the lab world's image size)
    width: int | None
    steps: int  # the pipeline's num_inference_steps
    eval_steps: int
    guidance_scale: float | None  # None: no guidance input
    max_sequence_length: int
    shift: float = 3.0  # the static shift of sampler.schedule: shift (and of eval under it)
    num_frames: int | None = None  # video families
    # sampler.schedule's default: "pipeline", the sigmas the family's diffusers pipeline samples with by default (its
    # scheduler is flow-match Euler: Flux, SD3, Qwen-Image, FLUX.2); "shift", the static shift of linspace(1, 0, T+1)
    # (the lab worlds; Wan, whose pipelines default to UniPC, with the Euler schedule the public GRPO code uses)
    schedule: str = "shift"


@dataclass(frozen=True)
class FamilyOption:
    """A ``model.<name>`` key that only some families take: its type, its default, what it means and its checks.
    The config reads these rows (it names no option itself); the adapter receives the value as a setting."""

    name: str
    hint: Any  # the type the config decodes, e.g. int | None
    default: Any  # the config's value when unset (None: the family's own default, FamilyDefaults)
    help: str
    minimum: int | None = None
    choices: tuple[str, ...] = ()
    flag: str | None = None  # python -m g2rpo.eval's flag for it (a list is written comma-separated); None: none
    setting: bool = True  # given to the adapter (from_pretrained); False: read by the family's trainer hooks only

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (a decoded one), or None."""
        if value is None:
            return None
        if self.minimum is not None and any(v < self.minimum for v in (value if isinstance(value, list) else [value])):
            return f"must be >= {self.minimum}, got {value!r}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        return None


_NUM_FRAMES = FamilyOption("num_frames", int | None, None, "frames per sample (null: the family's default)",
                           minimum=1, flag="--num-frames")
_GUIDANCE_2 = FamilyOption("guidance_scale_2", float | None, None, "Wan 2.2 A14B: the low-noise expert's "
                           "(transformer_2) guidance; null: guidance_scale, as WanPipeline", flag="--guidance-scale-2")
_TRAIN_EXPERTS = FamilyOption("train_experts", str, "auto", "Wan 2.2 A14B: which experts train: auto (those that own "
                              "the trained SDE steps), transformer (high noise), transformer_2 (low noise; also high / "
                              "low) or both; the others stay frozen",
                              choices=("auto", "both", "transformer", "transformer_2", "high", "low"), setting=False)
_TEXT_LAYERS = FamilyOption("text_encoder_out_layers", list[int], [10, 20, 30], "FLUX.2: the Mistral-3 hidden layers "
                            "stacked as the text embedding", minimum=0, flag="--text-encoder-layers")
_WAN_OPTIONS = (_NUM_FRAMES, _GUIDANCE_2, _TRAIN_EXPERTS)


@dataclass(frozen=True)
class ModelFamily:
    name: str
    title: str  # for messages
    adapter: str  # "module:Class" of the adapter; Class.from_pretrained(path, dtype, **settings)
    files: tuple[str, ...]  # what a folder of this family must hold
    defaults: FamilyDefaults
    pipeline: str | None = None  # "diffusers:Class" of the pipeline (None: not a diffusers pipeline)
    pipeline_names: tuple[str, ...] = ()  # model_index.json _class_name values of this family
    options: tuple[FamilyOption, ...] = ()  # model.<key>s only this family takes
    marker: str | None = None  # a file that identifies a folder of this family (instead of model_index.json)
    path_optional: bool = False  # model.path may be null: default_path builds (or finds) the model
    default_path: str | None = None  # "module:function" (log=...) -> the folder used when model.path is null
    world_rewards: tuple[str, ...] = ()  # rewards that take the model folder as their `world` option
    guidance_note: str = ""  # what guidance_scale means for this family
    prompt_check: str | None = None  # "module:function"(prompt) raising ValueError for a prompt the family cannot use
    lora_pipeline: str | None = None  # the pipeline whose save_lora_weights format LoRA adapters use (default:
    # ``pipeline``; the lab world's transformer is a Flux one)
    held_out_eval: str | None = None  # "module:function"(policy, folder, steps=) -> {metric: value}, run by the
    # trainer's CLI on the base and the trained policy
    eval_prompts: str | None = None  # the held-out prompts eval.prompts defaults to (the lab worlds')
    eval_rewards: tuple[str, ...] = ()  # the rewards eval.rewards defaults to (the lab worlds' judges)
    # "module:function"(folder) -> (expert names, route(sigma, integer_timesteps) -> name) or None: a folder holding
    # several experts split by noise level, read from its files before any model loads (Wan 2.2 A14B)
    experts_of_folder: str | None = None
    # "module:function"(cfg, expert names, expert_of_sigma) -> (trained experts, {expert: SDE steps it owns}): which
    # experts a config trains (model.kind's own option); None: the one transformer trains
    plan_experts: str | None = None
    prompt_images: bool = False  # every prompt names a conditioning image (image-to-video): the prompt file is read
    # with g2rpo.prompts.load_prompt_images and given to the policy's set_prompt_images

    @property
    def pipeline_settings(self) -> bool:
        """Whether height, width, guidance, text length apply (a diffusers pipeline family)."""
        return self.defaults.height is not None

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def adapter_class(self) -> type:
        return import_path(self.adapter)

    def pipeline_class(self) -> type | None:
        return None if self.pipeline is None else import_path(self.pipeline)

    def lora_pipeline_class(self) -> type:
        return import_path(self.lora_pipeline or self.pipeline)


FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (
    ModelFamily("lab", "the lab world", "g2rpo.lab.generator:LabPolicy", ("lab_world.json", "transformer/config.json"),
                FamilyDefaults(None, None, steps=16, eval_steps=16, guidance_scale=None, max_sequence_length=0),
                marker="lab_world.json", path_optional=True, default_path="g2rpo.lab.world:build_world",
                world_rewards=("digit_alignment", "digit_realism", "digit_judge"),
                eval_prompts="builtin:lab_test", eval_rewards=("digit_judge", "digit_alignment", "digit_realism"),
                held_out_eval="g2rpo.lab.world:evaluate_lab",
                prompt_check="g2rpo.lab.prompts:prompt_label",
                lora_pipeline="diffusers:FluxPipeline"),
    ModelFamily("lab_scenes", "the scenes lab world", "g2rpo.lab.scenes.world:ScenePolicy",
                ("scene_world.json", "transformer/config.json"),
                FamilyDefaults(None, None, steps=16, eval_steps=16, guidance_scale=None, max_sequence_length=0),
                marker="scene_world.json", path_optional=True, default_path="g2rpo.lab.scenes.world:build_scene_world",
                world_rewards=("scene_clip", "scene_preference", "scene_detector"),
                eval_prompts="builtin:scenes_test",
                eval_rewards=("scene_exact", "scene_detector", "scene_clip", "scene_preference"),
                held_out_eval="g2rpo.lab.scenes.world:evaluate_scenes",
                prompt_check="g2rpo.lab.scenes.world:check_prompt", lora_pipeline="diffusers:FluxPipeline"),
    ModelFamily("flux", "Flux.1", "g2rpo.models.flux:FluxPolicy", _DIFFUSERS + ("text_encoder_2/config.json",),
                FamilyDefaults(1024, 1024, steps=28, eval_steps=50, guidance_scale=3.5, max_sequence_length=512,
                               schedule="pipeline"),
                "diffusers:FluxPipeline", ("FluxPipeline",), guidance_note="the embedded guidance (Flux.1-dev)"),
    ModelFamily("flux2", "FLUX.2", "g2rpo.models.flux2:Flux2Policy", _DIFFUSERS,
                FamilyDefaults(1024, 1024, steps=50, eval_steps=50, guidance_scale=4.0, max_sequence_length=512,
                               schedule="pipeline"),
                "diffusers:Flux2Pipeline", ("Flux2Pipeline",), options=(_TEXT_LAYERS,),
                guidance_note="the embedded guidance (FLUX.2 [dev] is guidance-distilled)"),
    ModelFamily("sd3", "SD3", "g2rpo.models.sd3:SD3Policy",
                _DIFFUSERS + ("text_encoder_2/config.json", "text_encoder_3/config.json"),
                FamilyDefaults(1024, 1024, steps=28, eval_steps=28, guidance_scale=7.0, max_sequence_length=256,
                               schedule="pipeline"),
                "diffusers:StableDiffusion3Pipeline", ("StableDiffusion3Pipeline",),
                guidance_note="classifier-free guidance (Flow-GRPO trains SD3.5 at 4.5)"),
    ModelFamily("qwen_image", "Qwen-Image", "g2rpo.models.qwen_image:QwenImagePolicy", _DIFFUSERS,
                FamilyDefaults(1024, 1024, steps=50, eval_steps=50, guidance_scale=4.0, max_sequence_length=512,
                               schedule="pipeline"),
                "diffusers:QwenImagePipeline", ("QwenImagePipeline",),
                guidance_note="the pipeline's true_cfg_scale"),
    ModelFamily("wan", "Wan text-to-video", "g2rpo.models.wan:WanPolicy", _DIFFUSERS,
                FamilyDefaults(480, 832, steps=50, eval_steps=50, guidance_scale=5.0, max_sequence_length=512,
                               num_frames=81),
                "diffusers:WanPipeline", ("WanPipeline",), options=_WAN_OPTIONS,
                guidance_note="classifier-free guidance", experts_of_folder="g2rpo.models.wan:experts_of_folder",
                plan_experts="g2rpo.models.wan:plan_trained_experts"),
    ModelFamily("wan_i2v", "Wan image-to-video", "g2rpo.models.wan_i2v:WanI2VPolicy", _DIFFUSERS,
                FamilyDefaults(480, 832, steps=50, eval_steps=50, guidance_scale=5.0, max_sequence_length=512,
                               num_frames=81),
                "diffusers:WanImageToVideoPipeline", ("WanImageToVideoPipeline",),
                options=_WAN_OPTIONS,
                guidance_note="classifier-free guidance", prompt_images=True,
                experts_of_folder="g2rpo.models.wan:experts_of_folder",
                plan_experts="g2rpo.models.wan:plan_trained_experts"),
)}
#: The family of the embedded default config (the CPU lab world).
DEFAULT_FAMILY = "lab"


def all_family_options() -> dict[str, FamilyOption]:
    """Every family option by name (one spec per name, shared by the families that take it)."""
    return {o.name: o for f in FAMILIES.values() for o in f.options}


def family(name: str) -> ModelFamily:
    """The family named ``name``; ValueError lists the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown policy kind {name!r} (a model family); known: {', '.join(FAMILIES)}") from None


def family_of_folder(folder: str | Path) -> ModelFamily:
    """The family a local folder holds (its marker file, or ``model_index.json``'s pipeline class)."""
    folder = Path(folder)
    for f in FAMILIES.values():
        if f.marker and (folder / f.marker).is_file():
            return f
    index = folder / "model_index.json"
    if not index.is_file():
        markers = ", ".join(f.marker for f in FAMILIES.values() if f.marker)
        raise FileNotFoundError(f"{folder}: neither a diffusers folder (model_index.json) nor a folder with "
                                f"{markers}")
    cls = json.loads(index.read_text()).get("_class_name", "")
    for f in FAMILIES.values():
        if cls in f.pipeline_names:
            return f
    raise ValueError(f"{folder}: unsupported pipeline {cls!r}; supported: "
                     f"{', '.join(n for f in FAMILIES.values() for n in f.pipeline_names)}")


def family_of_pipeline(pipe: Any) -> ModelFamily:
    """The family of a diffusers pipeline object (by its class, subclasses included)."""
    for f in FAMILIES.values():
        if f.pipeline is not None and isinstance(pipe, f.pipeline_class()):
            return f
    raise TypeError(f"{type(pipe).__name__} is not supported: pass a diffusers "
                    f"{', '.join(n for f in FAMILIES.values() for n in f.pipeline_names)}")


def require_files(root: Path, fam: ModelFamily) -> None:
    """FileNotFoundError naming every file of ``fam`` missing under ``root``."""
    if not root.is_dir():
        raise FileNotFoundError(f"{fam.title}: model folder not found: {root}")
    missing = [str(root / r) for r in fam.files if not (root / r).exists()]
    if missing:
        raise FileNotFoundError(f"{fam.title}: missing files in {root}: {', '.join(missing)}")


def settings(fam: ModelFamily, **given: Any) -> dict[str, Any]:
    """The adapter's settings: those ``given`` (None = unset) over the family's defaults; options of other
    families are dropped."""
    d = fam.defaults
    out: dict[str, Any] = {}
    if fam.pipeline_settings:
        out.update(height=d.height, width=d.width, max_sequence_length=d.max_sequence_length,
                   guidance_scale=d.guidance_scale)
    if d.num_frames is not None:
        out["num_frames"] = d.num_frames
    for key, value in given.items():
        if value is None:
            continue
        if key in ("height", "width", "max_sequence_length", "guidance_scale") and not fam.pipeline_settings:
            continue  # the family sets these itself
        spec = all_family_options().get(key)
        if spec is not None and (key not in fam.option_names or not spec.setting):
            continue
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def import_path(spec: str) -> Any:
    """The object a ``"module:attribute"`` string names."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def load_family(name: str, path: str | Path | None, dtype=None, **given: Any):
    """Load the adapter of family ``name`` from ``path`` with ``given`` settings over the family's defaults."""
    fam = family(name)
    kwargs = settings(fam, **given)
    if dtype is not None:
        kwargs["dtype"] = dtype
    return fam.adapter_class().from_pretrained(path, **kwargs)
