"""Streaming checkpoint I/O: safetensors headers (validated, truncation detected), a streaming shard writer, and the
atomic, resumable job runner every converter uses.

A job writes into ``<out>.partial-<job id>/`` next to the output; each finished file's sha256 goes into a journal
(``.journal.json``, replaced atomically). A rerun of the same job (same input files, same options) re-hashes the
journaled files, skips those that match and rewrites the rest; the directory is renamed to ``<out>`` only when
everything is written, so an interrupted run never leaves a directory that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .table import ST_BITS, ST_DTYPES, ST_NAMES

MANIFEST = "conversion/manifest.json"  # marks a completed output of ours
JOURNAL = ".journal.json"
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own header size limit


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]  # as safetensors counts it (F4: values)
    file: Path
    offset: int = 0  # absolute file offset of the data
    nbytes: int = 0


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> info from one shard's header; ValueError naming the shard (and tensor) when the header is
    malformed or the file is shorter than the header promises (a truncated download or an interrupted copy)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"shard {path}: {size} bytes, too short for a safetensors header (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _HEADER_LIMIT):
            raise ValueError(
                f"shard {path}: header length {n} exceeds the file ({size} bytes): truncated or not safetensors"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"shard {path}: unreadable safetensors header ({exc})") from exc
    header.pop("__metadata__", None)
    out: dict[str, TensorInfo] = {}
    data = size - 8 - n
    for name, meta in header.items():
        dtype, shape, (start, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        if dtype not in ST_BITS:
            raise ValueError(f"shard {path}: tensor {name!r} has unsupported dtype {dtype}")
        if end - start != math.prod(shape) * ST_BITS[dtype] // 8:
            raise ValueError(f"shard {path}: tensor {name!r} {dtype} {list(shape)} has {end - start} data bytes")
        if end > data:
            raise ValueError(
                f"shard {path} is truncated: tensor {name!r} ends at data byte {end} but the file holds only {data} "
                "data bytes"
            )
        out[name] = TensorInfo(name, dtype, shape, path, 8 + n + start, end - start)
    return out


class Reader:
    """The tensors of a checkpoint directory (its index's shards, else every top-level ``*.safetensors``)."""

    def __init__(self, root: str | os.PathLike, files: Iterable[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"input {self.root} is not a directory")
        index = self.root / "model.safetensors.index.json"
        self.index: dict[str, str] | None = None
        if files is None:
            if index.is_file():
                self.index = json.loads(index.read_text())["weight_map"]
                files = sorted(set(self.index.values()))
            else:
                files = sorted(p.name for p in self.root.glob("*.safetensors"))
        self.files = [self.root / f for f in files]
        if not self.files:
            raise ValueError(f"input {self.root} holds no *.safetensors shard")
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            if not path.is_file():
                raise ValueError(f"shard {path} listed in the index is missing")
            for name, info in read_header(path).items():
                if name in self.tensors:
                    raise ValueError(f"tensor {name!r} is stored twice: in {self.tensors[name].file} and {path}")
                self.tensors[name] = info
        if self.index is not None:
            for name, file in self.index.items():
                info = self.tensors.get(name)
                if info is None or info.file.name != file:
                    raise ValueError(
                        f"tensor {name!r}: the index says {file}, the shards say {info and info.file.name}"
                    )
        self._handles: dict[Path, Any] = {}

    def _read(self, info: TensorInfo, offset: int, nbytes: int, shape: tuple[int, ...]) -> torch.Tensor:
        # Plain reads into a fresh buffer, not mmap: mapped pages would count in the resident set until unmapped,
        # so memory stays one tensor whatever the checkpoint size.
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if info.file not in self._handles:
            self._handles[info.file] = open(info.file, "rb")  # noqa: SIM115 (closed by close())
        f = self._handles[info.file]
        f.seek(offset)
        if f.readinto(memoryview(buf.numpy())) != nbytes:
            raise ValueError(f"shard {info.file}: tensor {info.name!r} could not be read in full (truncated?)")
        if info.dtype == "F4":
            shape = (*shape[:-1], shape[-1] // 2)  # float4_e2m1fn_x2 holds two values per element
        return buf.view(ST_DTYPES[info.dtype]).view(shape) if shape else buf.view(ST_DTYPES[info.dtype])[0]

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self._read(info, info.offset, info.nbytes, info.shape)

    def get_rows(self, name: str, index: int) -> torch.Tensor:
        """``tensor[index]`` read without loading the rest (a 3-D merged expert tensor)."""
        info = self.tensors[name]
        row = info.nbytes // info.shape[0]
        return self._read(info, info.offset + index * row, row, info.shape[1:])

    def fingerprint(self) -> list[tuple[str, int, int]]:
        out = []
        for p in self.files:
            st = p.stat()
            out.append((p.name, st.st_size, st.st_mtime_ns))
        return out

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------
Spec = tuple[str, str, tuple[int, ...]]  # (name, st_dtype, shape)


class ShardWriter:
    """Writes one safetensors file tensor by tensor: the header is computed from the specs up front, then each
    tensor's bytes are appended as it is produced (memory: one tensor), hashed on the way."""

    def __init__(self, path: Path, specs: list[Spec], metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, dtype, shape in specs:
            n = math.prod(shape) * ST_BITS[dtype] // 8
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
        self.path = path
        self.specs = list(specs)
        self._next = 0
        self._hash = hashlib.sha256()
        self._f = open(path, "wb")  # noqa: SIM115 (closed by close() / abort())
        self._emit(struct.pack("<Q", len(raw)) + raw)

    def _emit(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self._hash.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, dtype, shape = self.specs[self._next]
        if name != exp_name:
            raise AssertionError(f"{self.path.name}: expected tensor {exp_name!r} next, got {name!r}")
        found_dtype = ST_NAMES.get(tensor.dtype)
        found_shape = tuple(tensor.shape) if dtype != "F4" else (*tensor.shape[:-1], tensor.shape[-1] * 2)
        if found_dtype != dtype or found_shape != shape:
            raise ValueError(
                f"tensor {name!r}: produced {found_dtype} {list(found_shape)}, planned {dtype} {list(shape)}"
            )
        data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy()
        self._emit(memoryview(data).cast("B"))
        self._next += 1

    def close(self) -> str:
        if self._next != len(self.specs):
            raise AssertionError(f"{self.path.name}: {len(self.specs) - self._next} tensor(s) not written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._f.close()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Group:
    """Tensors produced together (a linear's weight and scale): their specs and a producer ``() -> {name: tensor}``."""

    specs: list[Spec]
    produce: Callable[[], dict[str, torch.Tensor]]


@dataclass
class OutputFile:
    name: str  # path relative to the output directory
    groups: list[Group]

    @property
    def specs(self) -> list[Spec]:
        return [s for g in self.groups for s in g.specs]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * ST_BITS[dtype] // 8 for _, dtype, shape in self.specs)


@dataclass
class Job:
    """A conversion: output shards, small extra files (configs, index, tokenizer), and what identifies the job."""

    command: str
    input_dir: Path
    output_dir: Path
    identity: dict[str, Any]  # input fingerprint + options: the resume key
    files: list[OutputFile]
    extras: Callable[[Path], None] = lambda d: None
    index: bool = True  # write model.safetensors.index.json over the shards
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def job_id(self) -> str:
        blob = json.dumps({"command": self.command, **self.identity}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _is_ours(path: Path, job_id: str | None = None) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return job_id is None or data.get("job_id") == job_id


def run_job(job: Job, progress: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """Run ``job`` atomically and resumably (see the module docstring); returns the output directory."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = job.output_dir.resolve()
    job_id = job.job_id
    if out.exists():
        if _is_ours(out, job_id):
            log(f"{out}: already converted by this job ({job_id}); nothing to do")
            return out
        raise ValueError(
            f"output directory {out} already exists and is not a completed output of this conversion; "
            "refusing to touch it (choose another path or remove it)"
        )
    if out.resolve() == job.input_dir.resolve() or job.input_dir.resolve() in out.parents:
        raise ValueError(f"output directory {out} must not be the input directory or inside it")
    partial = out.parent / f"{out.name}.partial-{job_id}"
    journal_path = partial / JOURNAL
    done: dict[str, dict[str, Any]] = {}
    if partial.exists():
        if not journal_path.is_file():
            raise ValueError(f"{partial} exists without a conversion journal; refusing to touch it")
        journal = json.loads(journal_path.read_text())
        if journal.get("job_id") != job_id:
            raise ValueError(
                f"{partial} belongs to another conversion ({journal.get('job_id')}); refusing to reuse it"
            )
        done = journal.get("files", {})
        log(f"resuming {job.command} in {partial} ({len(done)} file(s) journaled)")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.mkdir()
    (partial / "conversion").mkdir(exist_ok=True)

    def save_journal() -> None:
        write_json_atomic(journal_path, {"job_id": job_id, "command": job.command, "files": done})

    save_journal()
    total = sum(f.nbytes for f in job.files)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"convert {job.command}", file=sys.stderr)
    skipped = 0
    try:
        for of in job.files:
            target = partial / of.name
            rec = done.get(of.name)
            if (
                rec
                and target.is_file()
                and target.stat().st_size == rec["size"]
                and sha256_file(target) == rec["sha256"]
            ):
                skipped += 1
                if bar is not None:
                    bar.update(of.nbytes)
                continue
            done.pop(of.name, None)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            writer = ShardWriter(tmp, of.specs)
            try:
                for group in of.groups:
                    tensors = group.produce()
                    for name, dtype, shape in group.specs:
                        writer.write(name, tensors[name])
                        if bar is not None:
                            bar.update(math.prod(shape) * ST_BITS[dtype] // 8)
                    del tensors
                digest = writer.close()
            except BaseException:
                writer.abort()
                raise
            os.replace(tmp, target)
            done[of.name] = {"sha256": digest, "size": target.stat().st_size}
            save_journal()
    finally:
        if bar is not None:
            bar.close()
    if job.index:
        weight_map = {name: of.name for of in job.files if "/" not in of.name for name, _, _ in of.specs}
        size = sum(of.nbytes for of in job.files if "/" not in of.name)
        write_json_atomic(
            partial / "model.safetensors.index.json", {"metadata": {"total_size": size}, "weight_map": weight_map}
        )
    job.extras(partial)
    manifest = {
        "job_id": job_id,
        "command": job.command,
        "identity": job.identity,
        "files": done,
        "summary": job.summary,
    }
    write_json_atomic(partial / MANIFEST, json.loads(json.dumps(manifest, default=str)))
    journal_path.unlink()
    os.replace(partial, out)  # atomic on one filesystem; `out` did not exist (checked above)
    if skipped:
        log(f"resumed: {skipped} of {len(job.files)} file(s) verified by sha256 and kept")
    return out


def copy_side_files(src: Path, dst: Path, names: Iterable[str]) -> list[str]:
    """Copy the listed small files (configs, tokenizer, chat template) that exist in ``src``; returns those copied."""
    copied = []
    for name in names:
        p = src / name
        if p.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst / name)
            copied.append(name)
    return copied


def dtype_of(name: str) -> torch.dtype:
    return ST_DTYPES[name]
