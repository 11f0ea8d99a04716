"""Session setup shared by all tests. Reusable helpers live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from helpers import (
    encoding_dir,
    fixtures_dir,
    has_native_deepseek_v4,
    in_ci,
    require_encoding,
    require_fixture,
    transformers_version,
)

# No per-example deadline: timings on a loaded 2-core box are noise, not failures. CI is derandomized so a
# red run reproduces; locally examples vary between runs. Override with HYPOTHESIS_PROFILE=<name>.
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if in_ci() else "dev"))

# Match the 2-core CI box unless the caller chose a thread count.
if "OMP_NUM_THREADS" not in os.environ:
    import torch

    torch.set_num_threads(2)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"transformers {transformers_version()} (native deepseek_v4: {has_native_deepseek_v4()}), CI={in_ci()}",
        f"fixtures: {fixtures_dir()}  encoding: {encoding_dir()}",
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `native` tests compare against transformers' own deepseek_v4, which does not exist before 5.8.
    if has_native_deepseek_v4():
        return
    skip = pytest.mark.skip(
        reason=f"needs transformers with a native deepseek_v4 (>= 5.8), found {transformers_version()}"
    )
    for item in items:
        if item.get_closest_marker("native") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", name="fixtures_dir")
def fixtures_dir_fixture() -> Path:
    """The golden fixtures root (fails under CI, skips locally, when absent)."""
    return require_fixture()


@pytest.fixture(scope="session", name="encoding_dir")
def encoding_dir_fixture() -> Path:
    """The chat-encoding cases root (fails under CI, skips locally, when absent)."""
    return require_encoding()
