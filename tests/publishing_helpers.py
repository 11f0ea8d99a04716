"""Shared by the publishing / model card / demo tests: a loopback Hub per test and a briefly trained demo model
built once per session (a few optimizer steps: the pipeline, not the quality, is under test)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest

from hub_server import LoopbackHub

TOKEN = "hf_loopback_test_token"
# The demo pipeline at test size: 2 optimizer steps of 2 x 32 tokens on ~60k characters of docstrings.
SHORT_TRAINING = {"steps": 2, "chars": 60_000, "vocab": 512, "batch": 2, "seq": 32}


@pytest.fixture(name="hub")
def loopback_hub(monkeypatch, tmp_path):
    """A fresh loopback Hub; the client is told to skip Xet (HF_HUB_DISABLE_XET, read at call time through
    ``huggingface_hub.constants``) so uploads take the LFS path the server implements."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with LoopbackHub(token=TOKEN) as server:
        yield server


@functools.cache
def trained_demo_model() -> Path:
    """The demo model after ``SHORT_TRAINING``, in the released FP8 layout (built once per test session)."""
    from transformers_deepseek.demo import TrainSettings, ensure_demo_model

    root = Path(tempfile.mkdtemp(prefix="tdseek-demo-test-"))
    atexit.register(shutil.rmtree, root, True)
    path, trained = ensure_demo_model(TrainSettings(**SHORT_TRAINING), root=root, log=lambda *a, **k: None)
    assert trained
    return path
