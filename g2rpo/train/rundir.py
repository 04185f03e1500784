"""The run directory: checks before any model loads, the lock, and what ``--resume`` may change.

* :func:`preflight` finds every problem a config can have without loading a model (missing files,
  an output_dir that is a file or not writable, empty / blank / non-UTF-8 prompt files).
* :class:`OutputLock` holds an exclusive ``flock`` on ``output_dir/.lock`` for the run's lifetime, so
  two runs (or orphaned workers and a restarted ``--resume``) never write the same files.
* :func:`resume_changes` compares a config with the one stored in the checkpoint: the keys in
  :data:`RESUMABLE` may change (and are applied), any other difference stops the run with one
  message listing them all.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import read_trainer_state
from ..config import ConfigError, TrainConfig
from ..safeload import UnsafeFileError

__all__ = ["RESUMABLE", "OutputLock", "RunDir", "preflight", "resume_base", "resume_changes", "stored_config",
           "stored_config_of"]

#: Keys that may differ on ``--resume`` (applied from the resumed iteration on); all others are refused.
RESUMABLE = (
    "optim.lr", "optim.schedule", "optim.warmup_iterations", "iterations", "max_cost", "checkpoint_every", "image_every",
    "export_final", "tensorboard", "wandb", "wandb_project", "progress", "resume", "overwrite", "output_dir",
    "reward_batch", "train_batch", "ops_backend", "dist_timeout_s", "sampler.max_batch", "sampler.cuda_graphs",
    "sampler.compile", "model.attention_backend", "model.gradient_checkpointing",
)
#: Sections whose every key may differ on ``--resume`` (validation: nothing it does changes the training run).
RESUMABLE_SECTIONS = ("eval.",)


def preflight(cfg: TrainConfig) -> tuple[list[str], dict | None]:
    """Every check that needs no model: files the config names, the output folder, the prompts. Returns the prompts
    and, for an image-to-video family, their checked images (``{prompt: ImagePrompt}``; else None)."""
    from ..models.loading import check_paths
    from ..rewards.configured import check_world_rewards
    from ..prompts import load_prompts

    from .validation import eval_prompt_source, eval_specs

    evaluating = cfg.eval.every > 0
    check_world_rewards(cfg.model, cfg.rewards)
    if evaluating:  # eval_specs adds only the family's own judges or the training rewards, checked just above
        check_world_rewards(cfg.model, cfg.eval.rewards, "eval.rewards")
        names = [s.metric_name for s in eval_specs(cfg)]
        best = cfg.eval.keep_best
        if best is not None and best != "eval/diversity" and not any(best == f"eval/{n}" or best.startswith(
                f"eval/{n}/") for n in names):
            raise ConfigError(f"eval.keep_best: {best} is not an evaluation metric; the eval rewards log "
                              f"{', '.join(f'eval/{n}' for n in names)} (and eval/diversity)")
    check_paths(cfg.model, cfg.rewards, files={"data.prompts": cfg.data.prompts,
                                               "eval.prompts": eval_prompt_source(cfg) if evaluating else None},
                eval_rewards=cfg.eval.rewards if evaluating else [])
    import importlib.util

    for key, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if getattr(cfg, key) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key}=true but {module} is not installed: pip install {module}, or set {key}=false")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file, not a folder")
    for sub in ("checkpoints", "final"):
        if (out / sub).exists() and not (out / sub).is_dir():
            raise ConfigError(f"{out / sub} is a file: the run writes a folder there; move the file away")
    check_served_rewards(cfg.rewards + (cfg.eval.rewards if evaluating else []))  # each server checked once
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        try:
            with metrics.open("a"):
                pass
        except OSError as err:
            raise ConfigError(f"{metrics} is not writable: {err.strerror or err}") from None
    if cfg.resume:
        stored_config_of(out)  # nothing to resume stops here, before any model loads
    try:  # a real write: permission bits say little to root, read-only mounts, full disks
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir {out} is not writable: {err.strerror or err}") from None
    try:
        prompts = load_prompts(cfg.data.prompts)
    except UnicodeDecodeError as err:
        raise ConfigError(f"data.prompts {cfg.data.prompts}: not UTF-8 text (byte {err.start}: "
                          f"{err.object[err.start:err.start + 1]!r})") from None
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data.prompts: {err}") from None
    from ..models.registry import family, import_path

    fam = family(cfg.model.kind)
    if fam.experts_of_folder is not None and cfg.model.path and Path(cfg.model.path).is_dir():
        split = import_path(fam.experts_of_folder)(cfg.model.path)  # several experts: which ones train, from files
        if split is not None:
            names, route = split
            try:
                import_path(fam.plan_experts)(cfg, names, lambda sigma: route(sigma, cfg.sampler.quantize_timesteps))
            except ValueError as err:
                raise ConfigError(str(err)) from None
    images = None
    if fam.prompt_images:  # image-to-video: every image exists and opens, before any model loads
        from ..prompts import load_prompt_images

        try:
            images = load_prompt_images(cfg.data.prompts)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"data.prompts: {err}") from None
    checked = [("data.prompts", cfg.data.prompts, prompts)]
    if evaluating:
        source = eval_prompt_source(cfg)
        try:
            checked.append(("eval.prompts", source, load_prompts(source)))
            if fam.prompt_images:  # image-to-video: every held-out image exists and opens too
                from ..prompts import load_prompt_images

                load_prompt_images(source)
        except (ValueError, FileNotFoundError, UnicodeDecodeError) as err:
            raise ConfigError(f"eval.prompts: {err}") from None
    check = fam.prompt_check
    for key, source, texts in checked if check is not None else ():  # the family reads every prompt (the digit)
        reader, bad = import_path(check), []
        for p in dict.fromkeys(texts):
            try:
                reader(p)
            except ValueError as err:
                bad.append(str(err))
        if bad:
            raise ConfigError(f"{key} {source}: {len(bad)} prompts the model family cannot read, e.g. {bad[0]}")
    return prompts, images


def check_served_rewards(rewards) -> None:
    """Before any model loads: every served reward's server answers its health check and serves that reward."""
    from ..rewards.remote import RemoteRewardError, check_health

    for i, spec in enumerate(rewards):
        o = spec.options
        try:
            if spec.name == "remote":
                url = str(o.get("url", "")).rstrip("/")
                health = check_health(f"{url}/health", float(o.get("timeout_s", 10.0)), o.get("token"))
                if o.get("reward") not in health.get("rewards", []):
                    raise ConfigError(f"rewards[{i}] (remote): {url} serves {health.get('rewards')}, not "
                                      f"{o.get('reward')!r}")
            elif spec.name == "vlm_judge":
                url = str(o.get("base_url", "")).rstrip("/")
                served = [m.get("id") for m in check_health(f"{url}/models", float(o.get("timeout_s", 10.0)),
                                                             o.get("api_key")).get("data", [])]
                if o.get("model") not in served:
                    raise ConfigError(f"rewards[{i}] (vlm_judge): {url} serves models {served}, not {o.get('model')!r}")
        except RemoteRewardError as err:
            raise ConfigError(f"rewards[{i}] ({spec.name}): the server does not answer: {err}") from None


class OutputLock:
    """Exclusive lock on ``output_dir/.lock`` (holder's pid inside); released by :meth:`release` or at exit."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / ".lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            raise ConfigError(f"output_dir {self.path.parent} is in use by another run (pid {holder}, lock "
                              f"{self.path}): wait for it, stop it, or pick another output_dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()

    def holds(self) -> bool:
        """Whether the lock file on disk is still the one this run locked (not deleted or replaced)."""
        if self._fd is None:
            return True
        try:
            return os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except OSError:
            return False


class RunDir:
    """A run's output folder on every rank: rank 0 locks it (every rank learns whether it could), its identity is
    kept so that a folder deleted or replaced mid-run stops the run, and an earlier run's checkpoints are refused
    without ``--resume`` or ``overwrite`` (which clears them). ``candidates``: the complete checkpoints to resume
    from, newest first."""

    def __init__(self, cfg: TrainConfig, ctx, log=print) -> None:
        from ..checkpoint import complete_checkpoints

        self.out, self.ctx = Path(cfg.output_dir), ctx
        lock, err = None, None
        if ctx.is_main:
            try:
                lock = OutputLock(self.out)
            except ConfigError as e:
                err = e
        if float(ctx.all_reduce_sum(torch.tensor([float(err is not None)]))[0]):
            raise err or ConfigError(f"output_dir {self.out} is in use by another run (rank 0 could not lock it)")
        self.lock = lock
        if ctx.is_main:  # the lock is ours: a temporary left here is a dead run's (a node killed mid-checkpoint)
            self.remove_stale_temporaries(log)
        ctx.barrier()
        self._identity = self._stat()
        self.candidates = complete_checkpoints(self.out)
        if not cfg.resume and self.candidates:
            if not cfg.overwrite:
                raise ConfigError(f"output_dir {self.out} holds checkpoints of an earlier run: continue it with "
                                  "--resume, start over with overwrite=true, or pick another output_dir")
            if ctx.is_main:
                import shutil

                shutil.rmtree(self.out / "checkpoints")
            ctx.barrier()
            self.candidates = []

    def remove_stale_temporaries(self, log=print) -> list[Path]:
        """Remove the half-written ``checkpoints/iter_N.tmp`` folders of a run that died while saving (gigabytes of
        partial shards on a real model), naming each; called with the folder's lock held, so no live run is
        writing them."""
        import shutil

        stale = sorted((self.out / "checkpoints").glob("iter_*.tmp")) if (self.out / "checkpoints").is_dir() else []
        for tmp in stale:
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"removed {tmp}: a checkpoint a stopped run left half-written")
        return stale

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.out)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def intact(self) -> bool:
        """On every rank alike: the folder and its lock are still the ones the run started with."""
        gone = 0.0
        if self.ctx.is_main:
            gone = float(self._stat() != self._identity or (self.lock is not None and not self.lock.holds()))
        return not float(self.ctx.all_reduce_sum(torch.tensor([gone]))[0])

    def check_intact(self, iteration: int) -> None:
        """Stop (every rank, TrainingError) when the folder was deleted or replaced while the run writes into it:
        metrics and checkpoints would go to deleted files, and the lock would no longer hold."""
        from .update import TrainingError

        if not self.intact():
            raise TrainingError(f"iteration {iteration}: output_dir {self.out} was deleted or replaced while the run "
                                "was writing to it; stopping (its metrics and checkpoints are gone; start a new run "
                                "or restore the folder and --resume)")

    def resume_changes(self, cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
        """The differences from the newest readable checkpoint's config (checked before any model loads: refused
        ones stop the run, allowed ones are listed)."""
        import warnings

        from ..config import config_to_dict

        for ckpt in self.candidates:
            try:
                stored = stored_config(ckpt)
            except Exception as err:  # noqa: BLE001  (a damaged trainer state: the fallback below)
                warnings.warn(f"{ckpt}: unreadable trainer state ({type(err).__name__}: {err})", stacklevel=2)
                continue
            return resume_changes(stored, config_to_dict(cfg))
        return []

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "options":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_changes(stored: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(key, old, new)]`` of the allowed changes; a ConfigError lists every refused one."""
    a, b = _flatten(stored), _flatten(new)
    diffs = [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
             if a.get(k, "<absent>") != b.get(k, "<absent>")]
    refused = [d for d in diffs if d[0] not in RESUMABLE and not d[0].startswith(RESUMABLE_SECTIONS)]
    if refused:
        lines = "\n  ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in refused)
        raise ConfigError("--resume: the config differs from the checkpoint's in keys that cannot change "
                          f"mid-run:\n  {lines}\nresume with the checkpoint's values (output_dir/config.json), "
                          f"or start a new run; keys that may change: {', '.join(RESUMABLE)}, "
                          f"and every {', '.join(k + '*' for k in RESUMABLE_SECTIONS)} key")
    return [d for d in diffs if d[0] not in ("resume", "overwrite")]


def resume_base(paths, overrides: list[str]) -> dict[str, Any]:
    """For ``--resume``: the config stored in the newest readable checkpoint of the output_dir that the
    command line names (or, failing that, its ``--config`` files or the embedded default name). The
    command line is then applied on top of it (and may only change :data:`RESUMABLE` keys)."""
    from ..config import default_config_path, merge_dicts, parse_overrides, read_config_file

    data: dict[str, Any] = {}
    for p in ([Path(p) for p in paths] if paths else [default_config_path()]):
        data = merge_dicts(data, read_config_file(p))
    data = merge_dicts(data, parse_overrides(overrides))
    out = Path(str(data.get("output_dir", TrainConfig().output_dir)))
    return stored_config_of(out)


def stored_config_of(out: Path) -> dict[str, Any]:
    """The config of the newest complete checkpoint under ``out`` whose trainer state reads; a
    ConfigError says why there is none (nothing to resume is never a fresh start)."""
    from ..checkpoint import complete_checkpoints

    ckpts = out / "checkpoints"
    if not out.exists():
        raise ConfigError(f"--resume: output_dir {out} does not exist (a typo? start a run without --resume)")
    if ckpts.exists() and not ckpts.is_dir():
        raise ConfigError(f"--resume: {ckpts} is a file, not the checkpoints folder")
    candidates = complete_checkpoints(out)
    if not candidates:
        raise ConfigError(f"--resume: no complete checkpoint under {ckpts} (nothing to resume; start a run "
                          "without --resume)")
    for ckpt in candidates:
        try:
            return stored_config(ckpt)
        except UnsafeFileError as err:  # crafted: refused, never skipped for an older one
            raise ConfigError(f"--resume: {err}") from None
        except Exception:  # noqa: BLE001  (a damaged trainer state: try the previous checkpoint)
            continue
    raise ConfigError(f"--resume: no checkpoint under {ckpts} has a readable trainer state")


def stored_config(folder: Path) -> dict[str, Any]:
    """The config saved in a checkpoint's trainer state (raises on a damaged file)."""
    return read_trainer_state(folder)["config"]
