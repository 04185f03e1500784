"""The scenes lab world: its grammar, renders, exact judge, learned rewards and second judge, and that everything
(training, evaluation, the comparison) runs on it."""

import json
import random

import numpy as np
import pytest
import torch

from g2rpo.lab.scenes.grammar import (ATTRIBUTE_ERRORS, CATEGORIES, HELD_OUT_PAIRS, TEST_TEMPLATES, TRAIN_TEMPLATES,
                                      allowed_pairs, caption, parse_prompt, prompt_sets, sample_meaning, wrong_meaning)
from g2rpo.lab.scenes.judge import SceneExact
from g2rpo.lab.scenes.render import IMAGE_DEGRADATIONS, degrade, render_batch, render_labelled

EVERY_PAIR = allowed_pairs(True)


def _meanings(n_per_category: int, seed: int):
    rng = random.Random(seed)
    return [sample_meaning(rng, c, EVERY_PAIR) for c in CATEGORIES for _ in range(n_per_category)]


def test_every_template_round_trips_through_the_parser():
    rng = random.Random(0)
    for m in _meanings(40, 1):
        for t in TRAIN_TEMPLATES[m.category] + TEST_TEMPLATES[m.category]:
            assert parse_prompt(caption(m, t)) == m, caption(m, t)
    for bad, why in (("a happy dog", "names no shape"), ("three circles and a square", "one plural shape"),
                     ("a red circle to the left of", "needs two objects"), ("a red circle and a square", "or neither"),
                     ("a circle and a circle", "is a count")):
        with pytest.raises(ValueError, match=why):
            parse_prompt(bad)
    del rng


def test_exact_judge_accepts_clean_renders_and_refuses_each_one_attribute_error():
    """>= 0.98 on clean renders of the prompts; <= 0.05 on renders with exactly one attribute wrong (each kind)."""
    rng = random.Random(2)
    meanings = _meanings(60, 3)
    prompts = [caption(m, rng.choice(TRAIN_TEMPLATES[m.category] + TEST_TEMPLATES[m.category])) for m in meanings]
    judge = SceneExact()
    ev = judge.evaluate(render_batch(meanings, rng, pairs=EVERY_PAIR), prompts)
    assert ev["scene_exact"] >= 0.98 and all(ev[f"scene_exact/{c}"] >= 0.95 for c in CATEGORIES), ev
    for kind in {k for ks in ATTRIBUTE_ERRORS.values() for k in ks}:
        idx = [i for i, m in enumerate(meanings) if kind in ATTRIBUTE_ERRORS[m.category]]
        wrong = [wrong_meaning(meanings[i], kind, rng) for i in idx]
        ok = judge.correct(render_batch(wrong, rng, pairs=EVERY_PAIR), [prompts[i] for i in idx])
        assert ok.mean() <= 0.05, (kind, ok.mean())


def test_renders_are_deterministic_and_keep_held_out_pairs_out_of_training_scenes():
    a = render_batch(_meanings(10, 4), random.Random(5))
    assert torch.equal(a, render_batch(_meanings(10, 4), random.Random(5)))
    assert not torch.equal(a, render_batch(_meanings(10, 4), random.Random(6)))
    rng = random.Random(7)
    from g2rpo.lab.scenes.grammar import COLORS, SHAPES

    seen = set()
    for _ in range(600):  # captions that name no colour never get a held-out pair drawn
        m = sample_meaning(rng, rng.choice(("single_object", "two_object")))
        _, labels = render_labelled(m, rng)
        seen |= {(COLORS[(v - 1) % len(COLORS)], SHAPES[(v - 1) // len(COLORS)]) for v in np.unique(labels) if v}
    assert seen and not seen & HELD_OUT_PAIRS


def test_the_slot_latent_decodes_to_the_render_bit_for_bit_and_orders_copies_left_to_right():
    from g2rpo.lab.scenes.latent import CENTER, PRESENCE, SlotDecoder, encode_scenes
    from g2rpo.lab.scenes.render import layout, paint

    rng = random.Random(12)
    scenes = [layout(m, rng, pairs=EVERY_PAIR) for m in _meanings(40, 13)]
    z = encode_scenes(scenes, 4, 16)
    decoder = SlotDecoder(16)
    assert torch.equal(decoder(z), torch.from_numpy(np.stack([paint(s)[0] for s in scenes])))
    assert torch.equal((z[..., PRESENCE] > 0).sum(1), torch.tensor([len(s) for s in scenes]))
    counts = [i for i, s in enumerate(scenes) if len(s) >= 3 and len({(p.shape, p.color) for p in s}) == 1]
    assert counts and all((z[i, 1:len(scenes[i]), CENTER][:, 1] >= z[i, :len(scenes[i]) - 1, CENTER][:, 1]).all()
                          for i in counts)
    # what a generator can get wrong shows in the image: an empty slot draws nothing, an object pushed out of
    # the image is clamped inside it whole, an off-palette colour stays off the palette
    wrong = z[:1].clone()
    wrong[0, :, PRESENCE] = -1
    assert torch.equal(decoder(wrong), torch.zeros(1, 3, 16, 16))
    far = z[:1].clone()
    far[0, 1:, PRESENCE] = -1
    far[0, 0, CENTER] = 5.0
    ys, xs = decoder(far)[0].abs().sum(0).nonzero(as_tuple=True)
    assert ys.max() == 15 and xs.max() == 15 and len(ys) == scenes[0][0].mask.sum()  # whole, in the corner
    with pytest.raises(ValueError, match="does not fit 2 slots"):
        encode_scenes([scenes[counts[0]]], 2, 16)


def test_word_dropout_hides_filler_words_only_and_keeps_the_meaning():
    from g2rpo.lab.scenes.grammar import content_words, drop_filler_words

    rng = random.Random(3)
    prompts = [caption(m, t) for m in _meanings(5, 14) for t in TRAIN_TEMPLATES[m.category]]
    dropped = [drop_filler_words(p, rng, 0.5) for p in prompts]
    assert sum(d != p for d, p in zip(dropped, prompts)) > len(prompts) // 4
    for d, p in zip(dropped, prompts):
        assert parse_prompt(d) == parse_prompt(p)
        assert [w for w in d.split() if w in content_words()] == [w for w in p.split() if w in content_words()]
    assert [drop_filler_words(p, rng, 0.0) for p in prompts] == prompts


def test_a_world_of_an_older_build_is_refused_with_the_rebuild_command(scenes_world, tmp_path):
    import shutil

    from g2rpo.lab.scenes.world import load_scene_policy

    old = tmp_path / "old"
    shutil.copytree(scenes_world, old)
    cfg = json.loads((old / "scene_world.json").read_text())
    cfg.pop("slots")
    (old / "scene_world.json").write_text(json.dumps(cfg | {"build_version": 4, "space_to_depth": 2}))
    with pytest.raises(ValueError, match="another build.*--world scenes --force"):
        load_scene_policy(old)


def test_builtin_prompt_files_are_the_grammars_sets_and_held_out_prompts_stay_held_out():
    from g2rpo.prompts import builtin_prompt_path

    sets = prompt_sets()
    train = builtin_prompt_path("scenes").read_text().splitlines()
    test = builtin_prompt_path("scenes_test").read_text().splitlines()
    assert train == sets["train"] and test == sets["test_paraphrase"] + sets["test_heldout"]
    assert not set(train) & set(test)
    assert not any(parse_prompt(p).pairs() & HELD_OUT_PAIRS for p in train)
    assert all(parse_prompt(p).pairs() & HELD_OUT_PAIRS for p in sets["test_heldout"])
    train_words = {w for p in train for w in p.split()}
    assert all(set(p.split()) - train_words for p in sets["test_paraphrase"])  # unseen template words
    assert {parse_prompt(p).category for p in train} == set(CATEGORIES)


def test_augmentation_recolours_and_mirrors_captions_with_the_images():
    from g2rpo.lab.scenes.grammar import COLORS, RELATIONS, SHAPES, Meaning, Obj
    from g2rpo.lab.scenes.learned import augment, caption_slots, make_pairs

    d = make_pairs(120, 5)
    slots = caption_slots(d.prompts)
    judge, g = SceneExact(), torch.Generator().manual_seed(0)

    def text(row):
        a = Obj(SHAPES[row[1]], None if row[2] == 0 else COLORS[row[2] - 1])
        b = None if row[3] == 0 else Obj(SHAPES[row[3] - 1], None if row[4] == 0 else COLORS[row[4] - 1])
        m = Meaning(CATEGORIES[row[0]], a, b, int(row[5]), None if row[6] == 0 else list(RELATIONS)[row[6] - 1])
        return caption(m, TRAIN_TEMPLATES[m.category][0])

    clean = [i for i, p in enumerate(d.prompts) if judge.correct(d.images[i:i + 1], [p])[0] == 1]
    for _ in range(6):
        (x,), (s,) = augment([d.images[clean]], [slots[clean]], g)
        assert judge.correct(x, [text(r.tolist()) for r in s]).mean() == 1.0


@pytest.mark.parametrize("kind", IMAGE_DEGRADATIONS)
def test_each_degradation_changes_an_image_and_stays_in_range(kind):
    x = render_batch(_meanings(2, 8), random.Random(9))
    y = degrade(x, kind, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.equal(x, y) and y.min() >= 0 and y.max() <= 1


@pytest.mark.slow
def test_learned_rewards_rank_a_correct_render_above_each_kind_of_degradation():
    """The default config's rewards (trained here as the build trains them) on 3,000 held-out pairs, each kind of
    negative >= 0.95 (the issue's sanity bound). Measured with 2 threads (as the build runs here) / 1 thread (a
    test worker): scene_clip's weakest kinds blur 0.968 / 0.984 and position 0.985 / 0.985; scene_preference's
    blur 0.968 / 0.984, position 0.985 / 0.990 (docs/lab-results.md). Without scene_clip's pair term its position
    was 0.78-0.83."""
    from g2rpo.lab.scenes.learned import make_pairs
    from g2rpo.lab.scenes.world import SceneWorldConfig, train_scene_rewards

    clip, pref = train_scene_rewards(SceneWorldConfig())
    test = make_pairs(3000, 99)
    for model in (clip, pref):
        win = (model.score(test.images, test.prompts) > model.score(test.neg_images, test.prompts)).float()
        by_kind = {k: float(win[[i for i, x in enumerate(test.neg_kinds) if x == k]].mean())
                   for k in set(test.neg_kinds)}
        assert set(by_kind) == set(IMAGE_DEGRADATIONS) | {k for e in ATTRIBUTE_ERRORS.values() for k in e}, by_kind
        assert all(v >= 0.95 for v in by_kind.values()), (model.kind, by_kind)


@pytest.mark.slow
def test_the_second_judge_reads_clean_renders_and_refuses_wrong_ones():
    from g2rpo.lab.scenes.learned import make_segmentation_data, train_detector

    images, labels = make_segmentation_data(3000, 10 ** 6)
    det = train_detector(images, labels, 16, 700, 1)
    rng = random.Random(12)
    meanings = _meanings(50, 13)
    prompts = [caption(m, rng.choice(TRAIN_TEMPLATES[m.category])) for m in meanings]
    # 700 steps: measured 0.940 with 1 thread and 0.943 with 2 (at 500 steps 0.84 / 0.86: too near a bound for
    # the thread count, which orders the training's sums, not to decide it)
    assert det.score(render_batch(meanings, rng, pairs=EVERY_PAIR), prompts).mean() >= 0.9
    wrong = [wrong_meaning(m, rng.choice(ATTRIBUTE_ERRORS[m.category]), rng) for m in meanings]
    assert det.score(render_batch(wrong, rng, pairs=EVERY_PAIR), prompts).mean() <= 0.1


@pytest.mark.slow
def test_the_world_build_is_deterministic(tmp_path, scenes_world):
    from g2rpo.lab.scenes.world import SceneWorldConfig, build_scene_world
    from conftest import TINY_SCENES

    again = build_scene_world(tmp_path / "again", SceneWorldConfig(**TINY_SCENES), log=None)
    files = sorted(p.relative_to(scenes_world) for p in scenes_world.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (scenes_world / f).read_bytes() == (again / f).read_bytes(), f


def test_rewards_and_judges_load_by_name_and_refuse_wrong_images(scenes_world):
    from g2rpo.rewards import make_reward

    rng = random.Random(1)
    meanings = _meanings(2, 11)
    images = render_batch(meanings, rng)
    prompts = [caption(m, TRAIN_TEMPLATES[m.category][0]) for m in meanings]
    for name in ("scene_clip", "scene_preference", "scene_detector"):
        s = make_reward(name, world=str(scenes_world)).score(images, prompts)
        assert s.shape == (len(prompts),) and torch.isfinite(s).all()
    assert make_reward("scene_exact").score(images, prompts).tolist() == [1.0] * len(prompts)
    with pytest.raises(ValueError, match="RGB images"):
        make_reward("scene_clip", world=str(scenes_world)).score(images[:, :1], prompts)
    with pytest.raises(FileNotFoundError, match="not a scenes world"):
        make_reward("scene_clip", world=str(scenes_world / "transformer"))


@pytest.mark.slow
def test_g2rpo_trains_and_evaluates_on_the_scenes_world(scenes_world, tmp_path, capsys):
    from g2rpo.train.cli import main

    assert main(["--config", "configs/lab_scenes.yaml", f"model.path={scenes_world}", "iterations=2",
                 "sampler.group_size=4", "data.prompts_per_iteration=2", "checkpoint_every=0", "progress=false",
                 "tensorboard=false", f"output_dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    assert "scene_exact/counting" in out and "scene_detector" in out
    ev = json.loads((tmp_path / "run" / "lab_eval.json").read_text())
    assert {"scene_exact", "scene_exact/heldout_pairs", "scene_exact/paraphrase", "scene_clip"} <= set(ev["trained"])
    from g2rpo.eval import main as eval_main

    assert eval_main(["--model", str(scenes_world), "--checkpoint", str(tmp_path / "run"), "--prompts",
                      "builtin:scenes_test", "--rewards",
                      "scene_clip,scene_preference,scene_exact,scene_detector", "--samples", "1", "--steps", "8",
                      "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert set(summary["mean"]) >= {"scene_exact", "scene_detector", "scene_exact/counting", "scene_exact/position",
                                    "scene_detector/color_attr"}
    assert set(summary["by_policy"]) == {"base", str(tmp_path / "run")}
    assert "scene_exact/two_object" in (tmp_path / "ev" / "summary.md").read_text()


def test_a_prompt_the_scenes_world_cannot_read_is_refused_before_training(scenes_world, tmp_path, capsys):
    from g2rpo.train.cli import main

    bad = tmp_path / "p.txt"
    bad.write_text("a red circle\na handwritten digit seven\n")
    assert main(["--config", "configs/lab_scenes.yaml", f"model.path={scenes_world}", f"data.prompts={bad}",
                 "iterations=1", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "handwritten digit seven" in capsys.readouterr().err


@pytest.mark.slow
def test_every_method_runs_two_iterations_on_the_scenes_world(scenes_world, tmp_path):
    """The CI smoke of the scenes comparison: every method of both preset families, 2 iterations."""
    from g2rpo.experiments.compare import CompareSettings, compare

    s = CompareSettings(seeds=1, iterations=2, lr_grid=(1e-4,), extend_lr=0, eval_every=2, per_sde_step_variant=False,
                        overrides={"sampler": {"group_size": 4, "sde_indices": [0, 1], "num_steps": 8},
                                   "data": {"prompts_per_iteration": 2}},
                        eval_per_class=1, curve_per_class=1, world="scenes", eval_steps=(16,))  # Table 4: digits test
    res = compare(tmp_path, s, world=scenes_world, log=lambda *a: None)
    assert res["judge_key"] == "scene_exact" and set(res["grid"]) == {"paper", "official"}
    for family in res["grid"].values():
        assert set(family) == {"dance_grpo", "flow_grpo", "mix_grpo", "g2rpo_no_mgai", "g2rpo"}
        assert all(r["iterations_run"] == 2 for per_lr in family.values() for r in per_lr["0.0001"])
    text = (tmp_path / "tables.md").read_text()
    assert "World `scenes`" in text and "scene_exact" in text and (tmp_path / "grids" / "paper.png").is_file()


@pytest.mark.parametrize("kind", ["lab_scenes", "flux"])
def test_another_worlds_rewards_are_refused_before_any_model_loads(tmp_path, capsys, kind):
    """The digits' rewards cannot score RGB scenes or Flux images: one config error naming what to set instead,
    exit 2, nothing built or loaded (the model path does not even exist)."""
    from g2rpo.train.cli import main

    assert main([f"model.kind={kind}", f"model.path={tmp_path / 'nowhere'}", "iterations=1",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "digit_alignment scores the lab world's images" in err and f"model.kind={kind}" in err
    assert ("scene_clip" in err) == (kind == "lab_scenes") and not (tmp_path / "run").exists()
