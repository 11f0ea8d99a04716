"""Publish DeepSeek-V4 checkpoints to the Hugging Face Hub: validate, render the model card, upload.

``transformers-deepseek push DIR REPO_ID`` and :func:`push_checkpoint` refuse a directory that is not a complete
checkpoint in the released layout (:func:`validate_checkpoint`: config, index, every tensor of the weight table with
its dtype and shape) before anything is sent; then create the repo, and upload every file plus a generated
``README.md`` (:func:`render_model_card`) in one commit with ``huggingface_hub`` (files streamed from disk, LFS /
Xet for the shards, progress bars from the client). The endpoint is ``--endpoint`` or ``$HF_ENDPOINT``.

Card templates: ``model_cards/*.jinja`` at the repository root are the source of truth; the package reaches them
through ``transformers_deepseek/model_cards`` (a symlink in the source tree, real files in a built wheel), so an
installed ``transformers-deepseek push`` finds the same templates as a checkout.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

LICENSE_DEFAULT = "mit"
CARD_TEMPLATE = "deepseek_v4.md.jinja"
SNIPPET_TEMPLATE = "snippet.py.jinja"
# Never uploaded: VCS / cache dirs, unfinished conversions, the README (replaced by the generated card).
_SKIP_DIRS = {".git", ".cache", ".huggingface", "__pycache__"}
_SKIP_FILES = {"README.md", ".journal.json", ".DS_Store"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Card metadata keys and the types validate_model_card accepts for them (Hub model card metadata spec).
_METADATA_TYPES: dict[str, type | tuple[type, ...]] = {
    "license": str,
    "library_name": str,
    "pipeline_tag": str,
    "base_model": (str, list),
    "base_model_relation": str,
    "tags": list,
}
_BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class CheckpointReport:
    """What :func:`validate_checkpoint` found in a valid checkpoint directory."""

    root: Path
    config: Any  # DeepseekV4Config
    raw_config: dict[str, Any]
    dense_format: str  # "fp8" / "bf16"
    expert_format: str  # "fp4" / "fp8" / "bf16"
    shards: list[str]
    n_tensors: int
    tensor_bytes: int
    files: list[tuple[str, int]] = field(default_factory=list)  # (path in repo, size), sorted
    manifest: dict[str, Any] | None = None  # conversion/manifest.json of a `convert` output

    @property
    def has_tokenizer(self) -> bool:
        return all((self.root / name).is_file() for name in _TOKENIZER_FILES)


def list_upload_files(root: Path) -> list[tuple[str, int]]:
    """``(path in repo, size)`` of every file a push uploads from ``root``, sorted (README.md excluded: the generated
    card replaces it; VCS / cache directories and unfinished-conversion leftovers skipped)."""
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or ".partial-" in part for part in rel.parts[:-1]):
            continue
        if not path.is_file() or ".partial-" in rel.parts[-1] or (len(rel.parts) == 1 and rel.name in _SKIP_FILES):
            continue
        if rel.name == ".journal.json":
            continue
        out.append((rel.as_posix(), path.stat().st_size))
    return out


def validate_checkpoint(root: str | Path) -> CheckpointReport:
    """Check that ``root`` is a complete checkpoint in the released layout; ``ValueError`` naming the problem if not.

    Checks, all before anything is uploaded: ``config.json`` parses as a :class:`DeepseekV4Config`
    (``model_type: deepseek_v4``); ``model.safetensors.index.json`` (when present) names existing shards, agrees with
    them tensor by tensor, lists every tensor of its shards, its ``total_size`` is the tensors' bytes and no other
    ``*.safetensors`` lies beside it; every shard header is intact and not truncated; the tensors are exactly the
    weight table's plan for this config and storage layout, each with its dtype and shape
    (:func:`transformers_deepseek.conversion.converters.validate`).
    """
    from .conversion.converters import _expected, config_from_raw, layout_of_raw, read_raw_config, validate
    from .conversion.io import MANIFEST, Reader
    from .conversion.table import build_plan

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"checkpoint {root}: not a directory")
    raw = read_raw_config(root)
    if raw.get("model_type") != "deepseek_v4":
        raise ValueError(
            f"checkpoint {root}: config.json model_type is {raw.get('model_type')!r}, expected 'deepseek_v4'"
        )
    try:
        config = config_from_raw(raw)
        layout = layout_of_raw(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {root}: config.json does not parse as DeepseekV4Config: {exc}") from exc
    try:
        reader = Reader(root)
    except ValueError as exc:  # shards missing / truncated, index naming the wrong shard
        raise ValueError(f"checkpoint {root}: {exc}") from exc
    try:
        plan = build_plan(config, layout)
        validate(reader.tensors, _expected(plan), f"checkpoint {root}")
        if reader.index is not None:
            index = json.loads((root / "model.safetensors.index.json").read_text())
            unlisted = sorted(set(reader.tensors) - set(reader.index))
            if unlisted:
                raise ValueError(
                    f"checkpoint {root}: model.safetensors.index.json does not list {len(unlisted)} tensor(s) of its "
                    f"shards: {unlisted[:10]}"
                )
            stray = sorted(p.name for p in root.glob("*.safetensors") if p not in reader.files)
            if stray:
                raise ValueError(f"checkpoint {root}: shard(s) {stray} are not in model.safetensors.index.json")
            total = (index.get("metadata") or {}).get("total_size")
            nbytes = sum(i.nbytes for i in reader.tensors.values())
            if total is not None and int(total) != nbytes:
                raise ValueError(
                    f"checkpoint {root}: model.safetensors.index.json metadata.total_size is {total}, the tensors "
                    f"hold {nbytes} bytes"
                )
        elif len(reader.files) > 1:
            raise ValueError(
                f"checkpoint {root}: {len(reader.files)} shards but no model.safetensors.index.json to say which"
            )
    finally:
        reader.close()
    manifest = None
    if (root / MANIFEST).is_file():
        manifest = json.loads((root / MANIFEST).read_text())
    return CheckpointReport(
        root=root,
        config=config,
        raw_config=raw,
        dense_format=layout.dense,
        expert_format=layout.experts,
        shards=[p.name for p in reader.files],
        n_tensors=len(reader.tensors),
        tensor_bytes=sum(i.nbytes for i in reader.tensors.values()),
        files=list_upload_files(root),
        manifest=manifest,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------------
def templates_dir() -> Path:
    """The card templates shipped with the package (``model_cards/`` of the source tree)."""
    return Path(str(resources.files("transformers_deepseek") / "model_cards"))


def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown, not HTML
    )


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _param_count(config) -> int:
    from .conversion.table import Layout, build_plan

    return sum(math.prod(e.shape) for e in build_plan(config, Layout("bf16", "bf16")).entries)


def _weight_format(dense: str, experts: str) -> str:
    if dense == "bf16":
        return "bf16 (dequantized)"
    experts_text = {"fp4": "FP4 e2m1 routed experts (1x32 ue8m0 scales)", "fp8": "FP8 routed experts"}[experts]
    return f"FP8 e4m3 (128x128 ue8m0 block scales) + {experts_text}, as released"


def card_metadata(
    report: CheckpointReport,
    base_model: str | None = None,
    base_model_relation: str | None = None,
    license: str = LICENSE_DEFAULT,
    tags: Sequence[str] = (),
) -> dict[str, Any]:
    """The card's YAML front matter (Hub model card metadata)."""
    all_tags = ["deepseek_v4", "transformers-deepseek", "mixture-of-experts", "text-generation-inference"]
    if report.has_tokenizer:
        all_tags.append("conversational")
    if report.dense_format == "fp8":
        all_tags += ["fp8"] + (["fp4"] if report.expert_format == "fp4" else [])
    all_tags += [t for t in tags if t not in all_tags]
    meta: dict[str, Any] = {"license": license, "library_name": "transformers", "pipeline_tag": "text-generation"}
    if base_model:
        meta["base_model"] = base_model
        if base_model_relation:
            meta["base_model_relation"] = base_model_relation
    meta["tags"] = all_tags
    return meta


def _provenance(report: CheckpointReport) -> list[tuple[str, str]]:
    m = report.manifest
    if not m:
        return []
    rows = [("Conversion", f"`transformers-deepseek convert {m.get('command')}`"), ("Job id", f"`{m.get('job_id')}`")]
    summary = m.get("summary") or {}
    for key in ("layout_in", "layout_out"):
        if isinstance(summary.get(key), dict):
            rows.append((key.replace("_", " "), ", ".join(f"{k} {v}" for k, v in summary[key].items())))
    options = (m.get("identity") or {}).get("options") or {}
    if options:
        rows.append(("Options", ", ".join(f"{k}={v}" for k, v in options.items())))
    return rows


def render_snippet(repo_id: str, has_tokenizer: bool, revision: str | None = None) -> str:
    """The card's usage snippet (Python), for ``repo_id`` (and a non-default ``revision``)."""
    revision_arg = f', revision="{revision}"' if revision and revision != "main" else ""
    text = (
        _environment()
        .get_template(SNIPPET_TEMPLATE)
        .render(repo_id=repo_id, revision_arg=revision_arg, has_tokenizer=has_tokenizer)
    )
    return text.strip()


def render_model_card(
    report: CheckpointReport,
    repo_id: str,
    *,
    base_model: str | None = None,
    base_model_relation: str | None = None,
    license: str = LICENSE_DEFAULT,
    tags: Sequence[str] = (),
    revision: str | None = None,
    title: str | None = None,
    description: str | None = None,
    limitations: Sequence[str] = (),
    push_command: str | None = None,
) -> str:
    """README.md for ``report``'s checkpoint published as ``repo_id`` (YAML front matter + sections)."""
    from huggingface_hub import ModelCardData

    from . import __version__

    cfg = report.config
    if base_model_relation is None and base_model:
        base_model_relation = "quantized" if report.dense_format != "bf16" else None
    meta = card_metadata(report, base_model, base_model_relation, license, tags)
    ratios = cfg.compress_ratios[: cfg.num_hidden_layers]
    kinds = ", ".join("sliding window" if r == 0 else ("CSA 1/4" if r == 4 else f"HCA 1/{r}") for r in ratios)
    params = _param_count(cfg)
    name = repo_id.rsplit("/", 1)[-1]
    verb = {"quantized": "quantized from", "finetune": "fine-tuned from", "merge": "merged from"}.get(
        base_model_relation or "", "derived from"
    )
    origin = f" {verb} [{base_model}](https://huggingface.co/{base_model})" if base_model else ""
    push_command = push_command or f"transformers-deepseek push <dir> {repo_id}"
    return (
        _environment()
        .get_template(CARD_TEMPLATE)
        .render(
            metadata_yaml=ModelCardData(**meta).to_yaml(),
            title=title or name,
            description=description
            or f"A DeepSeek-V4 checkpoint{origin}, stored in the released layout and loadable with `transformers` "
            "through `transformers-deepseek` (numerics bit-exact with the official inference code).",
            params=params,
            params_human=f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M",
            num_layers=cfg.num_hidden_layers,
            layer_kinds=kinds,
            mtp_layers=cfg.num_nextn_predict_layers,
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            head_dim=cfg.head_dim,
            n_routed_experts=cfg.n_routed_experts,
            experts_per_tok=cfg.num_experts_per_tok,
            n_shared_experts=cfg.n_shared_experts,
            num_hash_layers=cfg.num_hash_layers,
            vocab_size=cfg.vocab_size,
            has_tokenizer=report.has_tokenizer,
            max_position_embeddings=cfg.max_position_embeddings,
            sliding_window=cfg.sliding_window,
            weight_format=_weight_format(report.dense_format, report.expert_format),
            quantized=report.dense_format == "fp8",
            expert_format=report.expert_format,
            n_shards=len(report.shards),
            n_tensors=report.n_tensors,
            total_human=human_size(report.tensor_bytes),
            snippet=render_snippet(repo_id, report.has_tokenizer, revision),
            provenance=_provenance(report),
            push_command=push_command,
            package_version=__version__,
            limitations=list(limitations),
        )
    )


def validate_model_card(text: str):
    """Parse ``text`` with ``huggingface_hub.ModelCard`` and check its metadata offline; returns the card.

    Checks (``ModelCard.validate`` would send the YAML to the Hub): the front matter parses into ``card.data``
    (a ``ModelCardData``); the required keys are present with the Hub's types (``library_name: transformers``,
    ``pipeline_tag: text-generation``, a ``license`` string, ``tags`` a list of strings, ``base_model_relation``
    one of the Hub's values and only with a ``base_model``); the ``ModelCardData`` round trip (to_dict -> new
    ModelCardData -> YAML -> parse) is lossless; the body has the four sections and a Python snippet.
    """
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard(text, ignore_metadata_errors=False)
    data = card.data.to_dict()
    for key in ("license", "library_name", "pipeline_tag", "tags"):
        if key not in data:
            raise ValueError(f"model card metadata: missing {key!r}")
    for key, typ in _METADATA_TYPES.items():
        if key in data and not isinstance(data[key], typ):
            raise ValueError(f"model card metadata: {key!r} is {type(data[key]).__name__}, expected {typ}")
    if data["library_name"] != "transformers" or data["pipeline_tag"] != "text-generation":
        raise ValueError(
            f"model card metadata: library_name {data['library_name']!r} / pipeline_tag {data['pipeline_tag']!r}, "
            "expected 'transformers' / 'text-generation'"
        )
    if not all(isinstance(t, str) and t for t in data["tags"]):
        raise ValueError(f"model card metadata: tags must be non-empty strings, got {data['tags']!r}")
    if "base_model_relation" in data:
        if "base_model" not in data:
            raise ValueError("model card metadata: base_model_relation without base_model")
        if data["base_model_relation"] not in _BASE_MODEL_RELATIONS:
            raise ValueError(
                f"model card metadata: base_model_relation {data['base_model_relation']!r}, expected one of "
                f"{_BASE_MODEL_RELATIONS}"
            )
    again = ModelCard(f"---\n{ModelCardData(**data).to_yaml()}\n---\n").data.to_dict()
    if again != data:
        raise ValueError(f"model card metadata: ModelCardData round trip changed it: {data} -> {again}")
    for section in ("## Model details", "## How to use", "## Conversion provenance", "## Limitations"):
        if section not in card.text:
            raise ValueError(f"model card: section {section!r} missing")
    if extract_snippet(card.text) is None:
        raise ValueError("model card: no ```python snippet under '## How to use'")
    return card


def extract_snippet(card_text: str) -> str | None:
    """The first ```python block after '## How to use'."""
    _, _, rest = card_text.partition("## How to use")
    _, found, rest = rest.partition("```python\n")
    if not found:
        return None
    return rest.partition("```")[0]


# ---------------------------------------------------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class PushResult:
    repo_id: str
    files: list[tuple[str, int]]  # uploaded (path in repo, size), README.md included
    card: str
    commit_url: str | None = None
    commit_oid: str | None = None
    dry_run: bool = False


def push_checkpoint(
    checkpoint: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    base_model: str | None = None,
    base_model_relation: str | None = None,
    license: str = LICENSE_DEFAULT,
    tags: Sequence[str] = (),
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    card: bool = True,
    dry_run: bool = False,
    push_command: str | None = None,
    log: Callable[[str], None] = print,
) -> PushResult:
    """Validate ``checkpoint`` (:func:`validate_checkpoint`; nothing is uploaded if it fails), render its card, then
    create ``repo_id`` (``exist_ok``) and upload every file + README.md in one commit to ``revision`` (a branch,
    created from the default branch if missing), or to a pull request with ``create_pr``. ``card=False`` uploads
    no README.md (the repo keeps its own). ``endpoint=None`` uses ``$HF_ENDPOINT`` / the Hub."""
    report = validate_checkpoint(checkpoint)
    card_text = render_model_card(
        report, repo_id, base_model=base_model, base_model_relation=base_model_relation, license=license,
        tags=tags, revision=revision, push_command=push_command,
    )  # fmt: skip
    validate_model_card(card_text)
    files = [*report.files, *([("README.md", len(card_text.encode()))] if card else [])]
    files.sort()
    width = max(len(p) for p, _ in files)
    log(
        f"{report.root}: valid DeepSeek-V4 checkpoint ({report.n_tensors} tensors in {len(report.shards)} shard(s), "
        f"{_weight_format(report.dense_format, report.expert_format)})"
    )
    log(f"{'would upload' if dry_run else 'uploading'} {len(files)} files to {repo_id}"
        f"{'@' + revision if revision else ''}:")  # fmt: skip
    for path, size in files:
        note = "  (generated model card)" if path == "README.md" else ""
        log(f"  {path:<{width}}  {size:>14,d} B  {human_size(size):>9}{note}")
    log(f"  total {sum(s for _, s in files):,d} B ({human_size(sum(s for _, s in files))})")
    result = PushResult(repo_id, files, card_text, dry_run=dry_run)
    if dry_run:
        return result

    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint, token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(url, "repo_id", repo_id)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    root = report.root
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(root / p)) for p, _ in report.files]
    if card:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_text.encode()))
    info = api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or "Upload DeepSeek-V4 checkpoint with transformers-deepseek",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )
    result.commit_url, result.commit_oid = info.commit_url, info.oid
    log(f"pushed: {info.commit_url}")
    return result


def push_model(
    model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> PushResult:
    """``model.push_to_hub(repo_id, ...)`` of a DeepSeek-V4 model (installed as its ``push_to_hub`` by
    :func:`register_publishing`; same keyword arguments as transformers').

    ``save_pretrained`` into a temporary directory (the released layout), then :func:`push_checkpoint`: the
    checkpoint is validated before anything is sent, and the repo gets this package's model card unless it already
    has a README.md, which is kept (as transformers keeps an existing card). Endpoint: ``$HF_ENDPOINT`` / the Hub.
    """
    import tempfile

    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    api = HfApi(token=token)
    try:  # False for a repo that does not exist (yet); other errors (network, auth) propagate
        has_card = api.file_exists(repo_id, "README.md", revision=revision)
    except RevisionNotFoundError:  # a branch push_checkpoint creates from the default branch: it gets our card
        has_card = False
    all_tags = [*(getattr(model, "model_tags", None) or []), *(tags or [])]
    with tempfile.TemporaryDirectory(prefix="tdseek-push-") as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        return push_checkpoint(
            tmp, repo_id, private=bool(private), revision=revision, token=token, endpoint=api.endpoint,
            tags=list(dict.fromkeys(all_tags)), commit_message=commit_message or "Upload model",
            commit_description=commit_description, create_pr=create_pr, card=not has_card,
            log=log or (lambda _: None),
        )  # fmt: skip


def register_publishing(config_class=None) -> None:
    """Make ``push_to_hub`` of our models go through :func:`push_model` (called by ``transformers_deepseek``)."""
    from .modeling import DeepseekV4PreTrainedModel

    DeepseekV4PreTrainedModel.hub_publisher = staticmethod(push_model)


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
def add_push_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push",
        help="validate a checkpoint and push it to the Hub with a generated model card",
        description="Validate DIR (a complete DeepSeek-V4 checkpoint in the released layout; nothing is uploaded "
        "otherwise), generate its model card (README.md) and upload everything to REPO_ID in one commit.",
    )
    p.add_argument("checkpoint", type=Path, metavar="DIR")
    p.add_argument("repo_id", metavar="REPO_ID", help="namespace/name on the Hub")
    p.add_argument("--dry-run", action="store_true", help="validate and list the files (with sizes); upload nothing")
    p.add_argument("--private", action="store_true", help="create the repo private (ignored if it exists)")
    p.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN / the saved login)")
    p.add_argument("--endpoint", help="Hub URL (default: $HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--base-model", help="repo id of the model this was converted / fine-tuned from")
    p.add_argument("--base-model-relation", choices=_BASE_MODEL_RELATIONS,
                   help="card metadata (default: 'quantized' for FP8 checkpoints with --base-model)")  # fmt: skip
    p.add_argument("--license", default=LICENSE_DEFAULT, help=f"card license (default: {LICENSE_DEFAULT})")
    p.add_argument("--tag", action="append", default=[], dest="tags", help="extra card tag (repeatable)")
    p.add_argument("--commit-message")
    p.set_defaults(func=run_push)


def run_push(args: argparse.Namespace) -> int:
    command = "transformers-deepseek push " + " ".join(
        shlex.quote(a) for a in [str(args.checkpoint.name), args.repo_id] + (["--private"] if args.private else [])
    )
    try:
        push_checkpoint(
            args.checkpoint, args.repo_id, private=args.private, revision=args.revision, token=args.token,
            endpoint=args.endpoint, base_model=args.base_model, base_model_relation=args.base_model_relation,
            license=args.license, tags=args.tags, commit_message=args.commit_message, dry_run=args.dry_run,
            push_command=command,
        )  # fmt: skip
    except ValueError as exc:
        print(f"error: refusing to push: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "CheckpointReport",
    "PushResult",
    "add_push_parser",
    "extract_snippet",
    "list_upload_files",
    "push_checkpoint",
    "push_model",
    "register_publishing",
    "render_model_card",
    "validate_checkpoint",
    "validate_model_card",
]
