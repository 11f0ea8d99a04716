"""`transformers-deepseek push` end to end against a loopback Hub (tests/hub_server.py): validation before upload,
dry run, push -> snapshot_download round trip (sha256 of every file, logits of the reloaded model)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import read_tensors, require_fixture, same_bytes
from publishing_helpers import TOKEN, loopback_hub  # noqa: F401  (the `hub` fixture)
from transformers_deepseek.cli import main as cli
from transformers_deepseek.publishing import list_upload_files, validate_checkpoint


@pytest.fixture(scope="module")
def ckpt() -> Path:
    return require_fixture("tiny-fp8-fp4") / "checkpoint"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mirror(src: Path, dst: Path, except_: tuple[str, ...] = ()) -> Path:
    """``dst`` with symlinks to ``src``'s files (the fixture is read in place, never copied), except ``except_``."""
    for rel, _ in list_upload_files(src):
        if rel in except_:
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).symlink_to(src / rel)
    return dst


def test_push_download_round_trip(ckpt, hub, tmp_path, capsys):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError
    from transformers import AutoModelForCausalLM

    rc = cli(["push", str(ckpt), "me/tiny-v4", "--endpoint", hub.url, "--token", TOKEN, "--private",
              "--base-model", "deepseek-ai/DeepSeek-V4-Flash"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "pushed: " in out
    # The real client's LFS path ran: batch, one PUT + verify per shard, one commit; the card was checked first.
    assert hub.requested("PUT", r"^/lfs/") == 3 and hub.requested("POST", r"/verify$") == 3
    assert hub.requested("POST", r"/commit/main$") == 1 and hub.validated and not hub.validated[-1][1]
    assert [f for f, s in hub.files("me/tiny-v4").items() if s.lfs] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]

    with pytest.raises(RepositoryNotFoundError):  # private: invisible without the token
        snapshot_download("me/tiny-v4", endpoint=hub.url, token=False, cache_dir=tmp_path / "anon")
    local = Path(snapshot_download("me/tiny-v4", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "dl"))
    uploaded = {rel for rel, _ in list_upload_files(ckpt)}
    downloaded = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert downloaded == uploaded | {"README.md", ".gitattributes"}
    for rel in sorted(uploaded):
        assert sha256(local / rel) == sha256(ckpt / rel), rel
    print(f"round trip: {len(uploaded)} files sha256-identical")

    ids = torch.randint(0, 1024, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(ckpt).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(local).eval()(ids).logits
    assert torch.equal(a, b)
    print(f"logits equal: torch.equal over {tuple(a.shape)}")


def test_push_to_branch_and_again(ckpt, hub, capsys):
    args = ["push", str(ckpt), "me/branchy", "--endpoint", hub.url, "--token", TOKEN]
    assert cli(args + ["--revision", "dev"]) == 0
    assert set(hub.files("me/branchy", "main")) == {".gitattributes"}  # nothing on main
    assert "README.md" in hub.files("me/branchy", "dev")
    puts = hub.requested("PUT", r"^/lfs/")
    assert cli(args) == 0  # same shards to main: the LFS batch says they are stored, nothing re-sent
    assert hub.requested("PUT", r"^/lfs/") == puts
    main, dev = hub.files("me/branchy"), hub.files("me/branchy", "dev")
    assert set(main) == set(dev)
    assert all(main[p].data == dev[p].data for p in main if p != "README.md")
    assert 'revision="dev"' in dev["README.md"].data.decode() and "revision=" not in main["README.md"].data.decode()
    capsys.readouterr()


def test_dry_run_lists_every_file_with_size(ckpt, hub, capsys):
    assert cli(["push", str(ckpt), "me/tiny-v4", "--dry-run", "--endpoint", hub.url]) == 0
    out = capsys.readouterr().out
    print(out)
    for rel, size in list_upload_files(ckpt):
        line = next((ln for ln in out.splitlines() if ln.split() and ln.split()[0] == rel), None)
        assert line is not None, f"{rel} not listed"
        assert f"{size:,d} B" in line, line
    assert "README.md" in out and "generated model card" in out
    assert hub.requests == []  # a dry run sends nothing


def _shard_of(ckpt: Path, name: str) -> str:
    return json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]


def _missing_tensor(ckpt: Path, dst: Path) -> str:
    name = "layers.2.ffn.experts.3.w2.scale"
    shard = _shard_of(ckpt, name)
    mirror(ckpt, dst, except_=(shard, "model.safetensors.index.json"))
    tensors = load_file(str(ckpt / shard))
    gone = tensors.pop(name)
    save_file(tensors, str(dst / shard), metadata={"format": "pt"})
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    index["metadata"]["total_size"] -= gone.numel() * gone.element_size()
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return f"{name}: missing"


def _truncated_shard(ckpt: Path, dst: Path) -> str:
    shard = "model-00002-of-00003.safetensors"
    mirror(ckpt, dst, except_=(shard,))
    (dst / shard).write_bytes((ckpt / shard).read_bytes()[:-1000])
    return "is truncated"


def _config_mismatch(ckpt: Path, dst: Path) -> str:
    mirror(ckpt, dst, except_=("config.json",))
    raw = json.loads((ckpt / "config.json").read_text())
    raw["moe_intermediate_size"] = 256
    (dst / "config.json").write_text(json.dumps(raw))
    return "layers.0.ffn.experts.0.w1.weight: found I8 [128, 128], expected I8 [256, 128]"


def _index_disagrees(ckpt: Path, dst: Path) -> str:
    mirror(ckpt, dst, except_=("model.safetensors.index.json",))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["embed.weight"] = "model-00003-of-00003.safetensors"
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return "tensor 'embed.weight': the index says model-00003-of-00003.safetensors"


def _not_deepseek(ckpt: Path, dst: Path) -> str:
    mirror(ckpt, dst, except_=("config.json",))
    raw = json.loads((ckpt / "config.json").read_text())
    raw["model_type"] = "llama"
    (dst / "config.json").write_text(json.dumps(raw))
    return "model_type is 'llama', expected 'deepseek_v4'"


@pytest.mark.parametrize(
    "breaker", [_missing_tensor, _truncated_shard, _config_mismatch, _index_disagrees, _not_deepseek]
)
def test_broken_checkpoint_is_refused_before_any_upload(ckpt, hub, tmp_path, capsys, breaker):
    reason = breaker(ckpt, tmp_path / "broken")
    rc = cli(["push", str(tmp_path / "broken"), "me/broken", "--endpoint", hub.url, "--token", TOKEN])
    err = capsys.readouterr().err
    assert rc == 2
    assert "refusing to push" in err and reason in err, err
    assert hub.requests == [] and hub.repos == {}  # not even the repo was created
    with pytest.raises(ValueError, match="checkpoint"):
        validate_checkpoint(tmp_path / "broken")


def test_valid_checkpoint_report(ckpt):
    report = validate_checkpoint(ckpt)
    assert (report.dense_format, report.expert_format) == ("fp8", "fp4")
    assert report.n_tensors == len(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"])
    assert [p for p, _ in report.files] == sorted(
        p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != "README.md"
    )
    assert not os.environ.get("HF_ENDPOINT", "").startswith("http://127.0.0.1")  # the fixture did not leak


def test_model_push_to_hub_uploads_the_released_layout_with_our_card(ckpt, hub, tmp_path, monkeypatch):
    """``model.push_to_hub`` (the transformers API) goes through the package's publisher: the saved checkpoint is
    validated, its tensors are the released ones (same names, dtypes and bytes as the checkpoint it was loaded
    from) and the repo gets the generated card; a card already in the repo is kept on the next push."""
    import huggingface_hub.constants as constants
    from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download
    from transformers import AutoModelForCausalLM

    # The default endpoint, as $HF_ENDPOINT set before the import would make it.
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    result = model.push_to_hub("me/from-model", token=TOKEN, tags=["my-tag"], commit_message="first push")
    assert result.commit_oid and hub.validated
    files = hub.files("me/from-model")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    (tmp_path / "pushed").mkdir()
    (tmp_path / "pushed" / "model.safetensors").write_bytes(files["model.safetensors"].data)
    pushed = read_tensors(tmp_path / "pushed")
    released = read_tensors(ckpt)
    assert sorted(pushed) == sorted(released)
    assert all(same_bytes(pushed[k], released[k]) for k in released)
    card = files["README.md"].data.decode()
    assert card.startswith("---\n") and "my-tag" in card and "me/from-model" in card
    assert "transformers_deepseek" in card  # our usage snippet, not transformers' placeholder card
    assert "has been automatically generated" not in card

    # A card edited on the Hub survives the next push (as with transformers' push_to_hub).
    HfApi(endpoint=hub.url, token=TOKEN).create_commit(
        "me/from-model", [CommitOperationAdd("README.md", b"# my own card\n")], commit_message="edit card"
    )
    model.push_to_hub("me/from-model", token=TOKEN)
    assert hub.files("me/from-model")["README.md"].data == b"# my own card\n"
    local = Path(snapshot_download("me/from-model", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "dl"))
    ids = torch.randint(0, 1024, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(local).eval()(ids).logits
        assert torch.equal(model.eval()(ids).logits, reloaded)
