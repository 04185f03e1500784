"""Hugging Face Hub ids as model and reward paths, resolved through ``huggingface_hub``.

A path that exists locally is used as it is. Otherwise a Hub id is resolved: ``org/name`` (a whole
repository, e.g. ``model.path: black-forest-labs/FLUX.1-dev``) or ``org/name/file`` (one file of a
repository, e.g. ``xswu/HPSv2/HPS_v2.1_compressed.pt``). With ``HF_HUB_OFFLINE=1`` only the local
Hugging Face cache is read; online, missing files are downloaded into it (``HF_HUB_CACHE`` /
``HF_HOME`` place it). A diffusers repository is fetched without its root-level single-file
checkpoints (``model_index.json`` and the component folders only).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

__all__ = ["PATH_OPTIONS", "HubError", "dtype_kwarg", "USUAL_REWARD_REPOS", "hub_reachable", "is_hub_id", "offline",
           "resolve_path", "reward_options", "with_usual_repos"]

_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?$")
#: Where the paper's reward checkpoints usually live, used when a reward's option is not given.
USUAL_REWARD_REPOS: dict[str, dict[str, str]] = {
    "hps": {"checkpoint": "xswu/HPSv2/HPS_v2.1_compressed.pt"},
    "clip": {"model_dir": "apple/DFN5B-CLIP-ViT-H-14-378"},
    "first_frame": {"model_dir": "apple/DFN5B-CLIP-ViT-H-14-378"},
    "pickscore": {"model_dir": "yuvalkirstain/PickScore_v1", "processor_dir": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"},
    "imagereward": {"model_dir": "THUDM/ImageReward", "vocab": "google-bert/bert-base-uncased/vocab.txt"},
    "unified_reward": {"model_dir": "CodeGoat24/UnifiedReward-qwen-7b"},
}


class HubError(FileNotFoundError):
    """A path that is neither local nor resolvable on the Hub (or in its cache when offline)."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "ON", "YES", "TRUE"}


@functools.lru_cache(maxsize=4)
def hub_reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    """One quick probe of the Hub's endpoint per process (a HEAD request): with no network, huggingface_hub would
    retry every file several times before failing (77 s for one preset's models); an unreachable Hub is then
    treated as offline, reading the local cache only."""
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
    except Exception as err:  # noqa: BLE001  (refused, DNS, timeout, TLS: the Hub is not reachable)
        code = getattr(err, "code", None)
        return code is not None  # an HTTP error status still means the Hub answered
    return True


def is_hub_id(path: str) -> bool:
    """``org/name`` or ``org/name/file``, not an existing local path, not absolute or relative-dotted."""
    return bool(_ID.match(path)) and not path.startswith((".", "/", "~")) and not Path(path).exists()


def resolve_path(path: str | Path, what: str, diffusers: bool = False) -> Path:
    """The local path of ``path``: itself when it exists or is not a Hub id, else the cached / downloaded
    snapshot (a repository) or file (``org/name/file``). ``diffusers``: fetch only ``model_index.json``
    and the component folders of a repository."""
    text = str(path)
    if not is_hub_id(text):
        return Path(path)
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    org, name, *rest = text.split("/")
    repo, cache = f"{org}/{name}", os.environ.get("HF_HUB_CACHE") or None
    from huggingface_hub import constants

    unreachable = not offline() and not hub_reachable(constants.ENDPOINT)
    local_only = offline() or unreachable
    try:
        if rest:
            return Path(hf_hub_download(repo, "/".join(rest), cache_dir=cache, local_files_only=local_only))
        patterns = ["model_index.json", "*/*"] if diffusers else None
        return Path(snapshot_download(repo, cache_dir=cache, local_files_only=local_only, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        where = ("the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline() else
                 f"the local Hugging Face cache, and the Hub ({constants.ENDPOINT}) could not be reached (one probe)"
                 if unreachable else "the Hub or its cache")
        raise HubError(f"{what}: {text!r} is not a local path and was not found in {where}"
                       f"; download it first (hf download {repo}) or give "
                       "a local path") from None
    except (HFValidationError, OSError) as err:
        raise HubError(f"{what}: {text!r} is not a local path, and resolving it as a Hugging Face id failed: "
                       f"{type(err).__name__}: {err}") from None


#: Reward options that name files or folders (resolved as local paths or Hub ids).
PATH_OPTIONS = ("checkpoint", "model_dir", "processor_dir", "med_config", "vocab", "path")


def with_usual_repos(name: str, options: dict) -> dict:
    """``options`` of a built-in reward with its usual repositories (:data:`USUAL_REWARD_REPOS`) filled in when
    no path option is given (ImageReward's BERT vocabulary too, when its folder lacks ``vocab.txt``)."""
    out = dict(options)
    usual = USUAL_REWARD_REPOS.get(name, {})
    if not any(k in out for k in PATH_OPTIONS):
        out.update(usual)
    elif name == "imagereward" and "model_dir" in out and "vocab" not in out and is_hub_id(str(out["model_dir"])):
        out["vocab"] = usual["vocab"]
    return out


def reward_options(name: str, options: dict, what: str) -> dict:
    """:func:`with_usual_repos`, then every path option resolved to a local path (HubError names a miss)."""
    out = with_usual_repos(name, options)
    for key in PATH_OPTIONS:
        if isinstance(out.get(key), str):
            out[key] = str(resolve_path(out[key], f"{what}.options.{key}"))
    return out


def dtype_kwarg(dtype) -> dict:
    """The keyword diffusers' ``from_pretrained`` takes a dtype by: ``dtype`` where it has it (``torch_dtype``
    is deprecated there, a FutureWarning), ``torch_dtype`` in the older releases pyproject still allows."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}
