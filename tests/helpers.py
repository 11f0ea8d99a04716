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


def stream_digests(streams) -> list[str]:
    """sha256 of each tensor's bytes, as the fixture generator records ``layer_stream_sha256``."""
    import hashlib

    import torch

    return [hashlib.sha256(h.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for h in streams]


def read_tensors(root: Path) -> dict:
    """Every tensor of the ``*.safetensors`` shards in ``root``, by name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(root).glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys()})  # noqa: SIM118
    return out


def same_bytes(a, b) -> bool:
    """Same dtype, shape and bytes."""
    import torch

    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))
    )
