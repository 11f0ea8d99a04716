"""Auto-class registration on transformers with and without a native deepseek_v4, and the opt-out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import has_native_deepseek_v4, require_fixture

SNIPPET = """
import json, sys
{imports}
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
path = sys.argv[1]
config = AutoConfig.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
base = AutoModel.from_config(config)
print(json.dumps({{
    "config": type(config).__module__ + "." + type(config).__name__,
    "model": type(model).__module__ + "." + type(model).__name__,
    "base": type(base).__module__ + "." + type(base).__name__,
}}))
"""


def _classes(imports: str, env: dict | None = None) -> dict:
    ckpt = require_fixture("tiny-bf16") / "checkpoint"
    run_env = {k: v for k, v in os.environ.items() if k != "TDSEEK_NO_OVERRIDE"}
    run_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", SNIPPET.format(imports=imports), str(ckpt)],
        capture_output=True, text=True, env=run_env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_registers_our_classes():
    found = _classes("import transformers_deepseek")
    assert found == {
        "config": "transformers_deepseek.modeling.configuration_deepseek_v4.DeepseekV4Config",
        "model": "transformers_deepseek.modeling.modeling_deepseek_v4.DeepseekV4ForCausalLM",
        "base": "transformers_deepseek.modeling.modeling_deepseek_v4.DeepseekV4Model",
    }


@pytest.mark.native
def test_native_untouched_without_import():
    found = _classes("")
    assert all(v.startswith("transformers.models.deepseek_v4.") for v in found.values()), found


@pytest.mark.native
def test_opt_out_keeps_native():
    found = _classes("import transformers_deepseek", {"TDSEEK_NO_OVERRIDE": "1"})
    assert all(v.startswith("transformers.models.deepseek_v4.") for v in found.values()), found


def test_without_native_and_without_import_the_model_type_is_unknown():
    if has_native_deepseek_v4():
        pytest.skip("this transformers ships a native deepseek_v4")
    with pytest.raises(AssertionError, match="deepseek_v4"):
        _classes("")
