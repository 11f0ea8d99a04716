"""Test helpers importable from any test module (`from helpers import require_fixture`).

Kept free of `transformers_deepseek` imports so they work even when the package is broken, and so that
`has_native_deepseek_v4()` answers about transformers itself, not about whatever our package registered.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SRC_DIR = REPO_ROOT / "src"
PACKAGE_DIR = SRC_DIR / "transformers_deepseek"
SHARED_DIR = REPO_ROOT.parent / "shared"


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def fixtures_dir() -> Path:
    """Golden fixtures root: `$TDSEEK_FIXTURES`, else `../shared/fixtures` next to the repo."""
    env = os.environ.get("TDSEEK_FIXTURES")
    return Path(env).expanduser() if env else SHARED_DIR / "fixtures"


def encoding_dir() -> Path:
    """Chat-encoding cases root: `$TDSEEK_ENCODING`, else `../shared/encoding` next to the repo."""
    env = os.environ.get("TDSEEK_ENCODING")
    return Path(env).expanduser() if env else SHARED_DIR / "encoding"


def _require(root: Path, name: str, env_var: str) -> Path:
    path = root / name if name else root
    if not path.exists():
        msg = f"missing test data {path} (set ${env_var} or provide {root})"
        # In CI missing data is a broken setup, not a reason to pass quietly.
        if in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return path


def require_fixture(name: str = "") -> Path:
    """`<fixtures>/<name>`; fails under CI=true, skips otherwise, when it does not exist."""
    return _require(fixtures_dir(), name, "TDSEEK_FIXTURES")


def require_encoding(name: str = "") -> Path:
    """`<encoding>/<name>`; fails under CI=true, skips otherwise, when it does not exist."""
    return _require(encoding_dir(), name, "TDSEEK_ENCODING")


@functools.cache
def has_native_deepseek_v4() -> bool:
    """Whether the installed transformers ships `transformers.models.deepseek_v4` (>= 5.8).

    Looks at the installed files rather than `sys.modules` or the Auto mappings, which our package may
    have populated by the time this is called.
    """
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(
        (Path(loc) / "models" / "deepseek_v4" / "modeling_deepseek_v4.py").is_file()
        for loc in spec.submodule_search_locations
    )


def transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "not installed"
