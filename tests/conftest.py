"""Test-session setup. TRITON_INTERPRET must be set before anything imports triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def lab_world(tmp_path_factory):
    """The default lab world, built once per test session in a temporary folder."""
    from g2rpo.lab import build_world

    return build_world(tmp_path_factory.mktemp("lab") / "base", log=None)
