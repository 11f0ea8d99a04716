"""Package layout contract (STYLE.md): modeling/ is architecture only and never imports the format or
conversion code; the quantized format reaches the model only through `config.quantization_config`."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import PACKAGE_DIR, SRC_DIR

PACKAGE = "transformers_deepseek"
SUBPACKAGES = ("modeling", "quantization", "conversion", "tokenization")
FORBIDDEN_IN_MODELING = (f"{PACKAGE}.quantization", f"{PACKAGE}.conversion")


def _is_forbidden(module: str, forbidden: tuple[str, ...]) -> bool:
    return any(module == f or module.startswith(f + ".") for f in forbidden)


def _module_name(path: Path, src_root: Path) -> tuple[str, bool]:
    """Dotted module name of a source file, and whether it is a package `__init__`."""
    parts = list(path.relative_to(src_root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _resolve_from(node: ast.ImportFrom, module_name: str, is_package: bool) -> str:
    """Absolute module of `from <node.module> import ...`, resolving relative levels like the importer."""
    if node.level == 0:
        return node.module or ""
    package = module_name.split(".") if is_package else module_name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def find_forbidden_imports(
    path: Path, src_root: Path, forbidden: tuple[str, ...] = FORBIDDEN_IN_MODELING
) -> list[str]:
    """Every import in `path` (module level or nested in functions/classes) that reaches `forbidden`.

    Covers `import a.b`, `from a.b import c`, `from a import b` (b a submodule), relative forms
    (`from ..quantization import x`, `from .. import conversion`) and string imports through
    `importlib.import_module(...)` / `__import__(...)`.
    """
    module_name, is_package = _module_name(path, src_root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    hits = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, module_name, is_package)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    targets = [arg.value]
        for target in targets:
            if _is_forbidden(target, forbidden):
                hits.append(f"{path.relative_to(src_root)}:{node.lineno}: imports {target}")
                break
    return hits


def scan_modeling(package_dir: Path, src_root: Path) -> tuple[list[Path], list[str]]:
    files = sorted((package_dir / "modeling").rglob("*.py"))
    return files, [hit for f in files for hit in find_forbidden_imports(f, src_root)]


# --- the contract on the real package -------------------------------------------------------------


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_subpackage_exists(name: str) -> None:
    init = PACKAGE_DIR / name / "__init__.py"
    assert init.is_file(), f"{PACKAGE}/{name}/ must be a package (missing {init})"


def test_modeling_does_not_import_quantization_or_conversion_statically() -> None:
    files, hits = scan_modeling(PACKAGE_DIR, SRC_DIR)
    assert files, f"no modules found under {PACKAGE_DIR / 'modeling'}"
    assert not hits, "modeling/ must not import quantization/ or conversion/:\n" + "\n".join(hits)


def forbidden_modules_loaded_by_modeling(package_dir: Path) -> list[str]:
    """Import every module under `package_dir/modeling` in a fresh interpreter; report forbidden ones loaded.

    Catches indirect imports (modeling -> some helper -> quantization). The parent package is stubbed so
    that its own `__init__` (which legitimately wires the quantizer into transformers) does not run: this
    measures what modeling/ pulls in, nothing else.
    """
    src_root = package_dir.parent
    modules = sorted(_module_name(f, src_root)[0] for f in (package_dir / "modeling").rglob("*.py"))
    assert modules, f"no modules found under {package_dir / 'modeling'}"
    code = textwrap.dedent(
        f"""
        import importlib, json, sys, types
        stub = types.ModuleType({PACKAGE!r})
        stub.__path__ = [{str(package_dir)!r}]
        sys.modules[{PACKAGE!r}] = stub
        for name in {modules!r}:
            importlib.import_module(name)
        forbidden = {FORBIDDEN_IN_MODELING!r}
        print(json.dumps(sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"importing {PACKAGE}.modeling failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_modeling_does_not_load_quantization_or_conversion_at_runtime() -> None:
    loaded = forbidden_modules_loaded_by_modeling(PACKAGE_DIR)
    assert not loaded, f"importing {PACKAGE}.modeling loaded {loaded}"


# --- the checker itself must be able to fail ------------------------------------------------------


def _fake_package(tmp_path: Path, modeling_files: dict[str, str]) -> Path:
    pkg = tmp_path / "src" / PACKAGE
    for sub in SUBPACKAGES:
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    for rel, source in modeling_files.items():
        (pkg / "modeling" / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / "modeling" / rel).write_text(textwrap.dedent(source))
    return pkg


@pytest.mark.parametrize(
    "source",
    [
        "import transformers_deepseek.quantization\n",
        "import transformers_deepseek.conversion.weights as w\n",
        "from transformers_deepseek.quantization.fp8 import quantize_fp8_blocks\n",
        "from transformers_deepseek import conversion\n",
        "from ..quantization import Fp8Linear\n",
        "from ..conversion.table import WEIGHT_TABLE\n",
        "from .. import quantization\n",
        "def build():\n    from ..quantization import Fp8Linear\n    return Fp8Linear\n",
        "class A:\n    def f(self):\n        import transformers_deepseek.conversion\n",
        "import importlib\nq = importlib.import_module('transformers_deepseek.quantization')\n",
    ],
)
def test_checker_flags_forbidden_import(tmp_path: Path, source: str) -> None:
    pkg = _fake_package(tmp_path, {"modeling_bad.py": source})
    files, hits = scan_modeling(pkg, pkg.parent)
    assert len(files) == 2
    assert len(hits) == 1 and "modeling_bad.py" in hits[0], hits


def test_checker_resolves_relative_imports_from_nested_modules(tmp_path: Path) -> None:
    # modeling/sub/x.py: `...quantization` is transformers_deepseek.quantization, `..quantization` is not.
    pkg = _fake_package(
        tmp_path,
        {
            "sub/__init__.py": "",
            "sub/bad.py": "from ...quantization import x\n",
            "sub/ok.py": "from ..quantization_free import x\nfrom . import quantization\n",
        },
    )
    _, hits = scan_modeling(pkg, pkg.parent)
    assert len(hits) == 1 and "bad.py" in hits[0], hits


def test_checker_accepts_allowed_imports(tmp_path: Path) -> None:
    source = """
        import torch
        from transformers import PreTrainedModel
        from transformers_deepseek.modeling.configuration_deepseek_v4 import DeepseekV4Config
        from .cache_deepseek_v4 import DeepseekV4Cache
        from ..tokenization import parser
        quantization_config = None  # attribute names are fine, imports are not
    """
    pkg = _fake_package(tmp_path, {"modeling_ok.py": source})
    _, hits = scan_modeling(pkg, pkg.parent)
    assert hits == []


def test_runtime_check_catches_indirect_import(tmp_path: Path) -> None:
    # modeling -> utils (allowed) -> quantization (forbidden): invisible to the per-file AST scan.
    pkg = _fake_package(tmp_path, {"modeling_x.py": "from ..utils import helper\n"})
    (pkg / "utils.py").write_text("from .quantization import fp8 as helper\n")
    (pkg / "quantization" / "fp8.py").write_text("")
    assert scan_modeling(pkg, pkg.parent)[1] == []
    loaded = forbidden_modules_loaded_by_modeling(pkg)
    assert loaded == [f"{PACKAGE}.quantization", f"{PACKAGE}.quantization.fp8"]
