"""A loopback Hugging Face Hub for tests: the HTTP endpoints that huggingface_hub's real upload and download code
calls, served from memory on 127.0.0.1 (random port) by a thread. No internet involved.

Implemented (model repos): ``POST /api/repos/create``; ``POST /api/validate-yaml`` (the client checks a README's
metadata there before committing: YAML mapping, known license / pipeline_tag, tags, base_model ids);
``POST /api/models/{repo}/branch/{branch}``;
``GET /api/models/{repo}[/revision/{rev}]`` (model / repo info); ``GET /api/models/{repo}/tree/{rev}[/{path}]``
(``?recursive``); ``POST /api/models/{repo}/paths-info/{rev}``; ``POST /api/models/{repo}/preupload/{rev}``
(upload mode: ``lfs`` for ``*.safetensors`` and files >= 10 MB, as the Hub's default ``.gitattributes``);
the git-LFS batch API ``POST /{repo}.git/info/lfs/objects/batch`` with ``basic`` upload / verify actions
(``PUT /lfs/{oid}``, sha256 and size checked); ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: header, file,
lfsFile, deletedFile); ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (``ETag`` = git blob id, or
``X-Linked-Etag`` / ``X-Linked-Size`` = sha256 / size for LFS files, ``X-Repo-Commit``, ``Range``). Errors carry the
``X-Error-Code`` header (``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``) the client maps to its
exceptions. With ``token`` set, writes need ``Authorization: Bearer <token>`` and private repos are invisible without
it (404, as on the Hub). The Xet protocol is not implemented: set ``HF_HUB_DISABLE_XET=1`` (documented
huggingface_hub setting) so the client uses the LFS path.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 10 * 1024 * 1024
LFS_PATTERNS = (".safetensors", ".bin", ".pt", ".gguf")
# A subset of the Hub's license ids and pipeline tags (enough for the cards under test; unknown ones are refused).
HUB_LICENSES = {"apache-2.0", "mit", "openrail", "bsd-3-clause", "cc-by-4.0", "cc-by-nc-4.0", "gpl-3.0", "llama3",
                "gemma", "other", "unknown"}  # fmt: skip
PIPELINE_TAGS = {"text-generation", "text2text-generation", "fill-mask", "feature-extraction", "image-text-to-text"}


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def blob_oid(self) -> str:  # git blob id: of the pointer file for LFS files
        return git_blob_oid(lfs_pointer(self.sha256, len(self.data)) if self.lfs else self.data)


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class LoopbackHub:
    """In-memory Hub state + the HTTP server. Use as a context manager; ``url`` is the endpoint."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content (uploaded, maybe not committed yet)
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.validated: list[tuple[dict, list[str]]] = []  # (card metadata, errors) per validate-yaml call
        self.lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            state = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="loopback-hub", daemon=True)

    def __enter__(self) -> LoopbackHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    # -- helpers for tests ---------------------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, StoredFile]:
        return self.repos[repo_id].resolve(revision).files

    def requested(self, method: str, pattern: str) -> int:
        return sum(1 for m, p in self.requests if m == method and re.search(pattern, p))


class _Handler(BaseHTTPRequestHandler):
    state: LoopbackHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    # -- plumbing ------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            data = b"".join(chunks)
        else:
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            data = gzip.decompress(data)
        return data

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), headers, head)

    def _authorized(self) -> bool:
        token = self.state.token
        return token is None or self.headers.get("Authorization") == f"Bearer {token}"

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        if write and not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        with self.state.lock:
            self.state.requests.append((method, path))
        body = self._body() if method in ("POST", "PUT") else b""
        try:
            for verb, pattern, handler in _ROUTES:
                m = re.fullmatch(pattern, path)
                if m and verb == method or (m and verb == "GET" and method == "HEAD"):
                    groups = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                    with self.state.lock:
                        handler(self, body=body, query=query, head=method == "HEAD", **groups)
                    return
            raise HubError(404, f"no route for {method} {path}")
        except HubError as exc:
            headers = {"X-Error-Code": exc.code} if exc.code else {}
            headers["X-Error-Message"] = exc.message
            self._json(exc.status, {"error": exc.message}, headers, head=method == "HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- endpoints -----------------------------------------------------------------------------------------------
    def create_repo(self, body: bytes, **_) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")
        req = json.loads(body)
        if req.get("type", "model") not in (None, "model"):
            raise HubError(400, f"only model repos are served, got {req.get('type')}")
        repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
        if "/" not in repo_id:
            repo_id = f"user/{repo_id}"
        url = f"{self.state.url}/{repo_id}"
        if repo_id in self.state.repos:
            # create_repo(exist_ok=True) accepts a 409 carrying the repo URL
            self._json(409, {"error": "You already created this model repo", "url": url})
            return
        repo = Repo(repo_id, bool(req.get("private")) or req.get("visibility") == "private")
        # A new Hub repo has one commit with .gitattributes.
        attrs = StoredFile(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", lfs=False)
        root = Commit(hashlib.sha1(f"{repo_id}:init".encode()).hexdigest(), None, "initial commit", {})
        root.files[".gitattributes"] = attrs
        repo.commits[root.oid] = root
        repo.branches["main"] = root.oid
        self.state.repos[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self, body: bytes, **_) -> None:
        """The Hub's metadata check (the client calls it before committing a README.md): front matter YAML, a
        mapping, known license / pipeline_tag, list-of-strings tags, base_model repo ids."""
        import yaml

        content = json.loads(body)["content"]
        errors = []
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        meta = {}
        if m:
            try:
                meta = yaml.safe_load(m[1]) or {}
            except yaml.YAMLError as exc:
                errors.append(f"invalid YAML: {exc}")
            if not isinstance(meta, dict):
                errors.append("metadata must be a mapping")
                meta = {}
        if "license" in meta and meta["license"] not in HUB_LICENSES:
            errors.append(f'"license" must be one of the Hub\'s license ids, got {meta["license"]!r}')
        if "pipeline_tag" in meta and meta["pipeline_tag"] not in PIPELINE_TAGS:
            errors.append(f'"pipeline_tag" must be a known pipeline, got {meta["pipeline_tag"]!r}')
        if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
            errors.append('"tags" must be an array of strings')
        bases = meta.get("base_model", [])
        for b in [bases] if isinstance(bases, str) else bases:
            if not (isinstance(b, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", b)):
                errors.append(f'"base_model" must be repo ids, got {b!r}')
        self.state.validated.append((meta, errors))
        if errors:
            self._json(400, {"errors": [{"message": e} for e in errors]})
        else:
            self._json(200, {"warnings": [] if meta else [{"message": "empty or missing yaml metadata"}]})

    def create_branch(self, repo_id: str, branch: str, body: bytes, **_) -> None:
        repo = self._repo(repo_id, write=True)
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = self._commit(repo, start).oid
        self._json(200, {})

    def repo_info(self, repo_id: str, head: bool, revision: str = "main", **_) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, revision)
        siblings = [{"rfilename": p} for p in sorted(commit.files)]
        self._json(
            200,
            {"id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings,
             "tags": [], "downloads": 0, "likes": 0, "library_name": "transformers"},
            head=head,
        )  # fmt: skip

    @staticmethod
    def _entry(path: str, f: StoredFile) -> dict:
        entry = {"type": "file", "oid": f.blob_oid, "size": len(f.data), "path": path}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": len(lfs_pointer(f.sha256, 1))}
        return entry

    def tree(self, repo_id: str, revision: str, head: bool, query: dict, path: str = "", **_) -> None:
        commit = self._commit(self._repo(repo_id), revision)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        out, dirs = [], set()
        for p in sorted(commit.files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                d = prefix + "/".join(parts[:i])
                if (recursive or i == 1) and d not in dirs:
                    dirs.add(d)
                    out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                                "path": d})  # fmt: skip
            if recursive or len(parts) == 1:
                out.append(self._entry(p, commit.files[p]))
        if prefix and not out:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        self._json(200, out, head=head)

    def paths_info(self, repo_id: str, revision: str, body: bytes, **_) -> None:
        commit = self._commit(self._repo(repo_id), revision)
        ctype = self.headers.get("Content-Type", "")
        req = json.loads(body) if "json" in ctype else {k: v for k, v in parse_qs(body.decode()).items()}
        paths = req.get("paths", [])
        paths = [paths] if isinstance(paths, str) else paths
        self._json(200, [self._entry(p, commit.files[p]) for p in paths if p in commit.files])

    def preupload(self, repo_id: str, revision: str, body: bytes, **_) -> None:
        repo = self._repo(repo_id, write=True)
        commit = repo.resolve(revision)
        out = []
        for f in json.loads(body)["files"]:
            lfs = f["size"] >= LFS_THRESHOLD or f["path"].endswith(LFS_PATTERNS)
            existing = commit.files.get(f["path"]) if commit else None
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": existing.blob_oid if existing else None})  # fmt: skip
        self._json(200, {"files": out, "commitOid": commit.oid if commit else None})

    def lfs_batch(self, repo_id: str, body: bytes, **_) -> None:
        self._repo(repo_id, write=True)
        req = json.loads(body)
        if req.get("operation") != "upload":
            raise HubError(400, "only upload batches are served")
        objects = []
        for obj in req["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs:  # already stored: no actions (the client skips the upload)
                href = f"{self.state.url}/lfs/{obj['oid']}"
                entry["actions"] = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   {"Content-Type": "application/vnd.git-lfs+json"})  # fmt: skip

    def lfs_upload(self, oid: str, body: bytes, **_) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"LFS upload: content does not hash to {oid}")
        self.state.lfs[oid] = body
        self._send(200)

    def lfs_verify(self, oid: str, body: bytes, **_) -> None:
        req = json.loads(body)
        data = self.state.lfs.get(oid)
        if data is None or req.get("oid") != oid or len(data) != req.get("size"):
            raise HubError(404, f"LFS verify: object {oid} of size {req.get('size')} not stored")
        self._send(200)

    def commit(self, repo_id: str, revision: str, body: bytes, query: dict, **_) -> None:
        repo = self._repo(repo_id, write=True)
        if query.get("create_pr"):
            raise HubError(400, "pull requests are not served")
        parent = self._commit(repo, revision)
        if revision not in repo.branches:
            raise HubError(400, f"can only commit to a branch, got {revision}")
        files = dict(parent.files)
        message = ""
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
                want = value.get("parentCommit")
                if want and want != parent.oid:
                    raise HubError(412, f"parent commit {want} is not the head {parent.oid}")
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"file encoding {value.get('encoding')}")
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = self.state.lfs.get(value["oid"])
                if data is None or value.get("algo", "sha256") != "sha256":
                    raise HubError(400, f"lfsFile {value['path']}: object {value['oid']} was never uploaded")
                files[value["path"]] = StoredFile(data, lfs=True)
            elif key in ("deletedFile", "deletedFolder"):
                gone = [p for p in files if p == value["path"] or p.startswith(value["path"].rstrip("/") + "/")]
                for p in gone:
                    del files[p]
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        blob = json.dumps([parent.oid, message, sorted((p, f.blob_oid) for p, f in files.items()), time.time_ns()])
        commit = Commit(hashlib.sha1(blob.encode()).hexdigest(), parent.oid, message, files)
        repo.commits[commit.oid] = commit
        repo.branches[revision] = commit.oid
        url = f"{self.state.url}/{repo_id}/commit/{commit.oid}"
        self._json(200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "commitMessage": message})

    def resolve(self, repo_id: str, revision: str, path: str, head: bool, **_) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, revision)
        f = commit.files.get(path)
        if f is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        data = f.data
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes",
                   "ETag": f'"{f.sha256 if f.lfs else f.blob_oid}"'}  # fmt: skip
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(data))})
        status = 200
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if rng:
            start = int(rng[1])
            end = int(rng[2]) if rng[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        headers["Content-Length"] = str(len(data))
        self._send(status, data, headers, head=head)


_REPO = r"(?P<repo_id>[^/]+/[^/]+?)"
_ROUTES = [
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", _Handler.create_branch),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<revision>[^/]+)", _Handler.repo_info),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", _Handler.tree),
    ("POST", rf"/api/models/{_REPO}/paths-info/(?P<revision>[^/]+)", _Handler.paths_info),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", _Handler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", _Handler.commit),
    ("GET", rf"/api/models/{_REPO}", _Handler.repo_info),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/lfs/(?P<oid>[0-9a-f]{64})", _Handler.lfs_upload),
    ("POST", r"/lfs/(?P<oid>[0-9a-f]{64})/verify", _Handler.lfs_verify),
    ("GET", rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", _Handler.resolve),
]
