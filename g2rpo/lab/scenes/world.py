"""The scenes world on disk: built once (the base generator, the learned rewards and the second judge), loaded
many times. Layout, beside the digits world's::

    DIR/scene_world.json                                  (SceneWorldConfig; the family's marker)
    DIR/transformer/, DIR/text_encoder/                   (the generator: a tiny FluxTransformer2DModel over
                                                           object-slot tokens, decoded by latent.SlotDecoder)
    DIR/rewards/{scene_clip,scene_preference,scene_detector}/{config.json, model.safetensors}
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxTransformer2DModel

from ...hub import dtype_kwarg
from ...rewards.diversity import diversity
from ..generator import LabPolicy, pretrain_flow
from ..prompts import LabTextEncoder
from ..world import default_cache_dir, publish
from .grammar import (CATEGORIES, TRAIN_TEMPLATES, caption, drop_filler_words, parse_prompt, prompt_sets,
                      sample_meaning, vocabulary)
from .judge import SceneExact
from .learned import SceneCLIP, ScenePreference, load_model, make_pairs, make_segmentation_data, save_model, \
    train_clip, train_detector, train_preference
from .latent import SLOT_CHANNELS, SlotDecoder, encode_scenes
from .render import Placed, layout

__all__ = ["SceneWorldConfig", "ScenePolicy", "build_scene_world", "train_scene_rewards", "load_scene_policy",
           "scene_rewards", "build_scene_clip", "build_scene_preference", "build_scene_detector", "evaluate_scenes",
           "sample_scenes", "scene_prompts", "LEARNED_FILES", "reward_judge_agreement"]

MARKER = "scene_world.json"
LEARNED_FILES = ("scene_clip", "scene_preference", "scene_detector")


@dataclass(frozen=True)
class SceneWorldConfig:
    """Everything that determines the world (a different config is a different world)."""

    build_version: int = 6  # raised whenever the build itself changes, so a cached world is rebuilt
    seed: int = 0
    image_size: int = 16
    slots: int = 4  # the latent: one token of SLOT_CHANNELS per object slot (latent.py)
    pretrain_steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    cosine: bool = True  # the learning rate decays along a cosine
    ema: float | None = 0.99  # the generator is the moving average of its weights
    train_shift: float = 3.0
    num_layers: int = 2
    num_single_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    text_dim: int = 64
    max_length: int = 16
    word_dropout: float = 0.2  # pretraining: each filler word of a caption is read as unknown with this chance
    reward_pairs: int = 16000  # scenes the rewards learn from
    clip_steps: int = 2000
    # scene_clip's InfoNCE plus this weight of a Bradley-Terry term on each caption's own hard-negative render: without
    # it the contrastive model ranks a position-swapped render below the correct one in only 0.78-0.83 of pairs
    clip_pair_weight: float = 1.0
    preference_steps: int = 600
    detector_scenes: int = 6000  # the second judge's own split (another seed)
    detector_steps: int = 1000

    def transformer_kwargs(self) -> dict:
        third = (self.attention_head_dim * 3 // 8) // 2 * 2  # RoPE axes (even): 16 -> (4, 6, 6), 24 -> (8, 8, 8)
        rope = (self.attention_head_dim - 2 * third, third, third)
        return dict(patch_size=1, in_channels=SLOT_CHANNELS, num_layers=self.num_layers,
                    num_single_layers=self.num_single_layers, attention_head_dim=self.attention_head_dim,
                    num_attention_heads=self.num_attention_heads, joint_attention_dim=self.text_dim,
                    pooled_projection_dim=self.text_dim, guidance_embeds=False, axes_dims_rope=rope)


class ScenePolicy(LabPolicy):
    """The scenes generator: latents ``[n, slots, SLOT_CHANNELS]`` (one token per object slot, ``latent.py``),
    decoded by the fixed :class:`~.latent.SlotDecoder` to RGB images ``[n, 3, S, S]`` in [0, 1]."""

    marker = MARKER

    def __init__(self, transformer: FluxTransformer2DModel, text_encoder: LabTextEncoder,
                 config: SceneWorldConfig) -> None:
        if transformer.config.in_channels != SLOT_CHANNELS:
            raise ValueError(f"a scenes transformer takes {SLOT_CHANNELS} channels per slot token, this one "
                             f"{transformer.config.in_channels}: a world of an older build? rebuild it with "
                             "`python -m g2rpo.lab build --world scenes --force`")
        super().__init__(transformer, text_encoder, config)
        self.decoder = SlotDecoder(config.image_size)

    def _token_grid(self) -> tuple[int, int]:
        return 2, 2 * self.config.slots  # one row of `slots` tokens: RoPE ids (0, 0, k)

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.config.slots, SLOT_CHANNELS)

    def encode_scenes(self, scenes: list[list[Placed]]) -> torch.Tensor:
        """Clean latents of placed scenes (the pretraining targets)."""
        return encode_scenes(scenes, self.config.slots, self.size)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the scenes latent is made from scenes, not pixels: use encode_scenes")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> ScenePolicy:
        return load_scene_policy(path, dtype)


def _config_of(folder: Path) -> SceneWorldConfig:
    f = Path(folder) / MARKER
    if not f.is_file():
        raise FileNotFoundError(f"{folder} is not a scenes world: missing {MARKER} "
                                "(build one with `python -m g2rpo.lab build --world scenes`)")
    saved = json.loads(f.read_text())
    known = set(SceneWorldConfig.__dataclass_fields__)
    if set(saved) - known or saved.get("build_version") != SceneWorldConfig.build_version:
        raise ValueError(f"{folder} is a scenes world of another build (build_version "
                         f"{saved.get('build_version')}, this code builds {SceneWorldConfig.build_version}): rebuild "
                         "it with `python -m g2rpo.lab build --world scenes --force`")
    return SceneWorldConfig(**saved)


def load_scene_policy(folder: str | Path, dtype: torch.dtype = torch.float32) -> ScenePolicy:
    folder = Path(folder)
    config = _config_of(folder)
    if not (folder / "transformer" / "config.json").is_file():
        raise FileNotFoundError(f"missing {folder / 'transformer' / 'config.json'}")
    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", **dtype_kwarg(dtype))
    return ScenePolicy(transformer, LabTextEncoder.from_pretrained(folder / "text_encoder"), config).eval()


def _is_built(folder: Path, config: SceneWorldConfig) -> bool:
    needed = [folder / MARKER, folder / "transformer" / "diffusion_pytorch_model.safetensors",
              folder / "text_encoder" / "model.safetensors"]
    needed += [folder / "rewards" / n / "model.safetensors" for n in LEARNED_FILES]
    return all(f.is_file() for f in needed) and json.loads((folder / MARKER).read_text()) == asdict(config)


def build_base_scenes(config: SceneWorldConfig, log=None) -> ScenePolicy:
    """The generator pretrained by rectified flow on renders of training captions (training templates, no
    held-out pair, not even for an object whose colour the caption leaves open). Word dropout
    (``config.word_dropout``) teaches it that a word it does not know carries no meaning, as a text encoder
    pretrained on language knows; the held-out paraphrase templates' own words are still never seen."""
    torch.manual_seed(config.seed)
    transformer = FluxTransformer2DModel(**config.transformer_kwargs())
    encoder = LabTextEncoder(vocabulary(test_templates=False), dim=config.text_dim, pooled_dim=config.text_dim,
                             max_length=config.max_length)
    policy = ScenePolicy(transformer, encoder, config)
    rng = random.Random(config.seed)

    def batch(g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        meanings = [sample_meaning(rng, rng.choice(CATEGORIES)) for _ in range(config.batch_size)]
        prompts = [drop_filler_words(caption(m, rng.choice(TRAIN_TEMPLATES[m.category])), rng, config.word_dropout)
                   for m in meanings]
        return policy.encode_scenes([layout(m, rng, config.image_size) for m in meanings]), prompts

    return pretrain_flow(policy, config.pretrain_steps, config.lr, config.train_shift, batch, config.seed, log,
                         cosine=config.cosine, ema=config.ema)


def train_scene_rewards(config: SceneWorldConfig) -> tuple[SceneCLIP, ScenePreference]:
    """The in-domain rewards as the build trains them: ``scene_clip`` (InfoNCE plus the pair term), then
    ``scene_preference`` fine-tuned from it, on the same pairs."""
    pairs = make_pairs(config.reward_pairs, config.seed + 1, config.image_size)
    clip = train_clip(pairs, config.image_size, config.clip_steps, config.seed, lr=4e-3,
                      pair_weight=config.clip_pair_weight)
    return clip, train_preference(pairs, config.image_size, config.preference_steps, config.seed, init=clip)


def build_scene_world(folder: str | Path | None = None, config: SceneWorldConfig = SceneWorldConfig(),
                      force: bool = False, log=print) -> Path:
    """Build (or reuse, when built with the same config) the scenes world in ``folder`` (default
    ``$G2RPO_CACHE/lab/scenes``); deterministic given the config."""
    folder = Path(folder) if folder is not None else default_cache_dir() / "scenes"
    if not force and _is_built(folder, config):
        if log:
            log(f"scenes world already built in {folder}")
        return folder
    t0 = time.perf_counter()
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    policy = build_base_scenes(config, log)
    policy.save_pretrained(tmp)
    if log:
        log(f"generator pretrained ({time.perf_counter() - t0:.0f} s); training the rewards and the judge")
    clip, preference = train_scene_rewards(config)
    save_model(clip, tmp / "rewards" / "scene_clip")
    save_model(preference, tmp / "rewards" / "scene_preference")
    images, labels = make_segmentation_data(config.detector_scenes, config.seed + 10 ** 6, config.image_size)
    save_model(train_detector(images, labels, config.image_size, config.detector_steps, config.seed + 1),
               tmp / "rewards" / "scene_detector")
    publish(tmp, folder)
    if log:
        log(f"scenes world built in {folder} ({time.perf_counter() - t0:.0f} s)")
    return folder


def _learned(world: str | Path, name: str, **options):
    world = Path(world)
    _config_of(world)
    return load_model(world / "rewards" / name, **options)


def build_scene_clip(world: str | Path, scale: float = 1.0):
    """``scene_clip`` of a built world: ``scale * cos(image, caption)``."""
    return _learned(world, "scene_clip", scale=float(scale))


def build_scene_preference(world: str | Path):
    """``scene_preference`` of a built world (the HPS analogue)."""
    return _learned(world, "scene_preference")


def build_scene_detector(world: str | Path):
    """``scene_detector`` of a built world: the second judge (1.0 correct / 0.0 wrong)."""
    return _learned(world, "scene_detector")


def scene_rewards(world: str | Path) -> dict[str, object]:
    """The in-domain rewards of a built world: ``scene_clip``, ``scene_preference``."""
    return {"scene_clip": build_scene_clip(world), "scene_preference": build_scene_preference(world)}


def scene_prompts(which: str = "test") -> list[str]:
    """The built-in prompts: ``train`` (RL), ``test`` (held-out paraphrases then held-out pairs),
    ``test_paraphrase`` or ``test_heldout``."""
    sets = prompt_sets()
    if which == "test":
        return sets["test_paraphrase"] + sets["test_heldout"]
    if which not in sets:
        raise ValueError(f"unknown scenes prompt set {which!r}; known: test, {', '.join(sets)}")
    return sets[which]


@torch.no_grad()
def sample_scenes(policy: LabPolicy, prompts: list[str], steps: int = 16, seed: int = 0, shift: float = 3.0,
                  max_batch: int | None = 256) -> torch.Tensor:
    """ODE samples ``[N, 3, S, S]`` in [0, 1] for the prompts (noise from ``seed``)."""
    from ...rollout.engine import RolloutEngine

    noise = policy.prepare_latents(len(prompts), torch.Generator().manual_seed(seed))
    engine = RolloutEngine(policy, num_steps=steps, shift=shift, max_batch=max_batch)
    return policy.decode(engine.sample_ode(noise, policy.encode_prompts(prompts)))


@torch.no_grad()
def evaluate_scenes(policy: LabPolicy, world: str | Path, steps: int = 16, per_prompt: int = 8, seed: int = 12345,
                    prompts: str = "test", rewards: dict[str, object] | None = None, judges=None
                    ) -> dict[str, float]:
    """ODE samples of a prompt set (default the held-out ones) on fixed noise: the in-domain rewards' means, the
    exact judge overall (``scene_exact``), per category, on the held-out paraphrases and on the held-out pairs,
    the second judge (``scene_detector``) and the within-prompt diversity."""
    rewards = rewards if rewards is not None else scene_rewards(world)
    exact, detector = judges if judges is not None else (SceneExact(), build_scene_detector(world))
    texts = scene_prompts(prompts)
    rows = [p for p in texts for _ in range(per_prompt)]
    images = sample_scenes(policy, rows, steps=steps, seed=seed)
    out = {name: float(r.score(images, rows).mean()) for name, r in rewards.items()}
    ok = exact.correct(images, rows)  # judged once: overall, per category and per held-out set
    out.update(exact.summarize(ok, rows))
    if prompts == "test":
        n_para = len(scene_prompts("test_paraphrase")) * per_prompt
        out["scene_exact/paraphrase"] = float(ok[:n_para].mean())
        out["scene_exact/heldout_pairs"] = float(ok[n_para:].mean())
    out["scene_detector"] = float(detector.score(images, rows).mean())
    out["diversity"] = diversity(images, per_prompt)
    return out


@torch.no_grad()
def reward_judge_agreement(world: str | Path, per_prompt: int = 16, seed: int = 3) -> dict[str, float]:
    """How far the learned rewards and the judges agree on the base generator's own samples (the training
    prompts, ``per_prompt`` each): the exact judge's accuracy, each reward's ROC AUC for telling the samples the
    exact judge accepts from those it refuses (over all samples and within a prompt's samples, where RL compares
    them), and Cohen's kappa between the two judges. An AUC near 0.5 within prompts means RL on that reward cannot
    move the judge."""
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    policy = load_scene_policy(world)
    prompts = scene_prompts("train")
    rows = [p for p in prompts for _ in range(per_prompt)]
    images = sample_scenes(policy, rows, seed=seed)
    ok = SceneExact().correct(images, rows).numpy()
    out = {"scene_exact": float(ok.mean())}
    for name, reward in scene_rewards(world).items():
        s = reward.score(images, rows).numpy()
        within = [roc_auc_score(ok[i:i + per_prompt], s[i:i + per_prompt]) for i in range(0, len(rows), per_prompt)
                  if 0 < ok[i:i + per_prompt].sum() < per_prompt]
        out[f"{name}/auc"] = float(roc_auc_score(ok, s)) if 0 < ok.sum() < len(ok) else float("nan")
        out[f"{name}/auc_within_prompt"] = float(np.mean(within)) if within else float("nan")
    det = build_scene_detector(world).score(images, rows).numpy()
    out["scene_detector"] = float(det.mean())
    out["kappa_exact_detector"] = float(cohen_kappa_score(ok, det))
    return out


def check_prompt(prompt: str) -> None:
    """The registry's prompt check: ValueError for a prompt the scenes world cannot read."""
    parse_prompt(prompt)
