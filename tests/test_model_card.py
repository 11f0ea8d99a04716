"""The generated model card: parses with huggingface_hub.ModelCard, metadata valid offline and accepted by the
loopback Hub's validate-yaml, and the card's usage snippet runs against a pushed checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import require_fixture
from publishing_helpers import TOKEN, loopback_hub, trained_demo_model  # noqa: F401  (the `hub` fixture)
from transformers_deepseek.publishing import (
    extract_snippet,
    push_checkpoint,
    render_model_card,
    templates_dir,
    validate_checkpoint,
    validate_model_card,
)


@pytest.fixture(scope="module")
def report():
    return validate_checkpoint(require_fixture("tiny-fp8-fp4") / "checkpoint")


def test_templates_are_packaged():
    assert {p.name for p in templates_dir().iterdir()} >= {"deepseek_v4.md.jinja", "snippet.py.jinja"}


def test_card_parses_and_metadata_validates(report):
    from huggingface_hub import ModelCard, ModelCardData

    text = render_model_card(report, "me/tiny-v4", base_model="deepseek-ai/DeepSeek-V4-Flash", tags=["demo"])
    card = validate_model_card(text)
    assert isinstance(card, ModelCard) and isinstance(card.data, ModelCardData)
    data = card.data.to_dict()
    assert data["license"] == "mit" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert data["base_model"] == "deepseek-ai/DeepSeek-V4-Flash" and data["base_model_relation"] == "quantized"
    assert {"deepseek_v4", "fp8", "fp4", "demo"} <= set(data["tags"])
    assert "conversational" not in data["tags"]  # no tokenizer in this checkpoint
    assert ModelCardData(**data).to_dict() == data
    # The body describes this checkpoint (figures from its config and files, not constants).
    assert "| Vocabulary | 1,024 ids |" in card.text and "427 tensors" in card.text
    assert "sliding window, CSA 1/4, HCA 1/128, CSA 1/4" in card.text and "+ 1 MTP block" in card.text
    assert 'from_pretrained("me/tiny-v4")' in extract_snippet(card.text)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("library_name: transformers", "library_name: 7"), "library_name"),
        (lambda t: t.replace("pipeline_tag: text-generation\n", ""), "missing 'pipeline_tag'"),
        (lambda t: t.replace("base_model: deepseek-ai/DeepSeek-V4-Flash\n", ""), "without base_model"),
        (lambda t: t.replace("base_model_relation: quantized", "base_model_relation: copy"), "base_model_relation"),
        (lambda t: t.replace("## Limitations", "## Notes"), "Limitations"),
        (lambda t: t.replace("```python", "```"), "snippet"),
    ],
)
def test_bad_cards_are_refused(report, edit, message):
    text = render_model_card(report, "me/tiny-v4", base_model="deepseek-ai/DeepSeek-V4-Flash")
    with pytest.raises(ValueError, match=message):
        validate_model_card(edit(text))


def test_card_snippet_runs_against_the_pushed_checkpoint(hub, tmp_path):
    """Push the (briefly trained) demo model, then run the card's snippet verbatim in a fresh interpreter pointed at
    the loopback Hub: it downloads through transformers' own hub code, chats through the template, prints."""
    ckpt = trained_demo_model()
    result = push_checkpoint(ckpt, "me/demo-v4", endpoint=hub.url, token=TOKEN, log=lambda m: None)
    card = validate_model_card(result.card)
    assert hub.validated[-1][0]["tags"] == card.data.tags and not hub.validated[-1][1]
    assert "conversational" in card.data.tags
    snippet = extract_snippet(result.card)
    assert "apply_chat_template" in snippet
    env = {
        **os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    }  # fmt: skip
    run = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert hub.requested("GET", r"^/me/demo-v4/resolve/.+/model\.safetensors$") == 1  # downloaded, not local
    # The snippet's output is the model's greedy reply: compare with the same generation done here.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What does the open function do?"}], tokenize=False, add_generation_prompt=True,
        thinking=False,
    )  # fmt: skip
    inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    expected = tok.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert run.stdout.rstrip("\n") == expected
