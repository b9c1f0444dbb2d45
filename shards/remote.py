"""Shard roots anywhere: a local folder, a URL (http(s)://, s3://, gs://, any fsspec protocol
whose package is installed) or a `pipe:COMMAND` whose `{}` stands for the path of a file in it.

`location(text)` turns what the user gave as `--shards` into a local `Path` (unchanged behaviour)
or a `Remote`, which joins with `/` like a path. Shards are streamed (`open_shard`): a dropped
connection is retried with backoff and resumes at the byte it reached (HTTP Range, a seek in an
fsspec file, or a rerun command that skips what was read); a file that stays unreadable is one
`UserError` naming its URL. With a cache folder, a shard is kept as `<sha256>.tar` once its bytes
hash to the manifest's sha256, and later reads (the next epoch) open that file instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from html.parser import HTMLParser
from pathlib import Path

from cfrobust.errors import UserError

# Retries of one read position: waits RETRY_WAIT, 2x, 4x, ... seconds between tries.
RETRIES = 5
RETRY_WAIT = 0.5
TIMEOUT = 60.0  # seconds a connection may stay silent
BUFFER = 1 << 20
SKIP_BY_READING = 1 << 20  # forward seeks up to this far read through; farther ones reopen at the byte
COMMON_SPLITS = ("train", "val", "test")  # probed where a store cannot list its folders
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_RETRYABLE = (OSError, http.client.HTTPException, TimeoutError)


class MissingFile(UserError):
    """The store answered that the file does not exist (HTTP 404, FileNotFoundError)."""


class _CommandFailed(ConnectionError):
    """A `pipe:` command exited with an error status (retried like a dropped connection)."""


def is_url(value) -> bool:
    """A remote location: a Remote, or text that is a URL or a `pipe:` command."""
    if isinstance(value, Remote):
        return True
    return isinstance(value, str) and (bool(_URL.match(value)) or value.startswith("pipe:"))


def location(value, cache_dir=None):
    """`value` as a shard location: a Remote for a URL (carrying `cache_dir` when given), else a Path."""
    if isinstance(value, Remote):
        return value if not cache_dir else replace(value, cache_dir=str(cache_dir))
    if is_url(value):
        if value.startswith("pipe:") and "{}" not in value:
            raise UserError(f"{value}: a pipe: shard root needs {{}} where the path of a file goes, "
                            f"e.g. 'pipe:aws s3 cp s3://bucket/shards/{{}} -'")
        return Remote(value, cache_dir=str(cache_dir) if cache_dir else None)
    return Path(value)


@dataclass(frozen=True)
class Remote:
    """A file or folder under a remote root; `root / "train" / "_info.json"` as with paths."""

    root: str
    parts: tuple[str, ...] = ()
    cache_dir: str | None = None
    sha256: str | None = None  # the content the manifest promises (for the cache)

    def __truediv__(self, name) -> "Remote":
        return replace(self, parts=self.parts + tuple(p for p in str(name).split("/") if p), sha256=None)

    @property
    def name(self) -> str:
        return self.parts[-1] if self.parts else self.root.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Remote":
        if self.parts:
            return replace(self, parts=self.parts[:-1], sha256=None)
        return replace(self, root=self.root.rstrip("/").rsplit("/", 1)[0], sha256=None)

    @property
    def url(self) -> str:
        relative = "/".join(self.parts)
        if self.root.startswith("pipe:"):
            return self.root.replace("{}", relative)
        return self.root.rstrip("/") + ("/" + relative if relative else "")

    def __str__(self) -> str:
        return self.url

    def with_sha256(self, sha256: str | None) -> "Remote":
        return replace(self, sha256=sha256)

    def is_file(self) -> bool:
        return _backend(self).exists()

    def exists(self) -> bool:
        return self.is_file()

    def is_dir(self) -> bool:
        return True  # a prefix in an object store exists as soon as something is under it

    def read_bytes(self) -> bytes:
        with open_shard(self) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()


def with_sha256(path, sha256: str | None):
    """A shard's location marked with the sha256 its manifest gives (used by the cache)."""
    return path.with_sha256(sha256) if isinstance(path, Remote) else path


# ---------------------------------------------------------------- reading


def open_shard(path):
    """A buffered binary stream of a file: the local file as before, the cached copy of a remote
    shard, or the remote file itself, read with retries (see module doc)."""
    if not isinstance(path, Remote):
        return open(path, "rb", buffering=BUFFER)
    cached = _cache_path(path)
    if cached is not None and cached.is_file():
        return open(cached, "rb", buffering=BUFFER)
    return ShardStream(RemoteReader(path, cache_to=cached))


class ShardStream(io.BufferedReader):
    """A buffered remote file; leaving its `with` block normally (or abandoning it, as a reader
    that has its batches does) completes the cached copy, if one is being made."""

    def __exit__(self, kind, value, traceback):
        if kind is None or kind is GeneratorExit:
            self.raw.finish_cache()
        return super().__exit__(kind, value, traceback)


class RemoteReader(io.RawIOBase):
    """Bytes of a remote file with retry and resume-at-byte; optionally copied into the cache."""

    def __init__(self, remote: Remote, cache_to: Path | None = None):
        self.remote, self.url = remote, remote.url
        self.backend = _backend(remote)
        self.offset = 0
        self.size: int | None = None
        self._stream = None
        self._tee = self._digest = None
        self._connect(0)  # a missing file fails here, before any byte is used
        if cache_to is not None:
            cache_to.parent.mkdir(parents=True, exist_ok=True)
            self._tee_path = cache_to.with_name(f"{cache_to.name}.tmp-{os.getpid()}")
            self._cache_to = cache_to
            self._tee = open(self._tee_path, "wb")
            self._digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.offset

    def readinto(self, buffer) -> int:
        failures = 0
        while True:
            if self.size is not None and self.offset >= self.size:
                return 0
            error = None
            try:
                if self._stream is None:
                    self._stream = self._open_at(self.offset)
                count = self._stream.readinto(buffer)
                if not count and self.size is None:
                    self.backend.check_finished(self._stream)  # a command's exit status
            except UserError:  # a missing file, or a command that keeps failing: no retry helps
                raise
            except _RETRYABLE + (ValueError,) as exc:
                count, error = 0, exc
            if count:
                self.offset += count
                if self._tee is not None:
                    view = memoryview(buffer)[:count]
                    self._tee.write(view)
                    self._digest.update(view)
                return count
            if self.size is None and error is None:
                return 0  # the end of a stream of unknown length
            # The connection dropped before the end: reconnect and continue at this byte.
            self._drop()
            failures += 1
            if failures > RETRIES:
                raise UserError(f"{self.url}: could not be read past byte {self.offset} after {RETRIES + 1} tries "
                                f"({_reason(error) if error else 'the connection keeps closing early'})")
            time.sleep(RETRY_WAIT * 2 ** (failures - 1))

    def seek(self, position: int, whence: int = 0) -> int:
        target = {0: position, 1: self.offset + position, 2: (self.size or 0) + position}[whence]
        if target == self.offset:
            return self.offset
        if self._tee is not None or (target > self.offset and target - self.offset <= SKIP_BY_READING) \
                or not self.backend.seekable:
            if target < self.offset:
                raise io.UnsupportedOperation(f"{self.url}: cannot seek backwards in this stream")
            scratch = bytearray(min(BUFFER, target - self.offset))
            while self.offset < target:
                view = memoryview(scratch)[: target - self.offset]
                if not self.readinto(view):
                    break
            return self.offset
        self._drop()
        self.offset = target  # the next read reconnects there
        return self.offset

    def finish_cache(self) -> None:
        """Read what is left (the tar's padding, or the samples a reader did not need) into
        the cached copy, and keep it when it hashes to the manifest's sha256."""
        if self._tee is None:
            return
        try:
            scratch = bytearray(BUFFER)
            while self.readinto(scratch):
                pass
            self._tee.close()
            if self._digest.hexdigest() == self.remote.sha256:
                os.replace(self._tee_path, self._cache_to)
        except (UserError, OSError):
            pass  # the cache is an optimisation; the next read streams the shard again
        finally:
            self._drop_tee()

    def close(self) -> None:
        self._drop()
        self._drop_tee()
        super().close()

    def _drop_tee(self) -> None:
        if self._tee is not None:
            self._tee.close()
            Path(self._tee_path).unlink(missing_ok=True)
            self._tee = None

    def _connect(self, offset: int) -> None:
        self._stream = self._open_at(offset)

    def _open_at(self, offset: int):
        stream, size = _retrying(self.url, lambda: self.backend.open(offset))
        if size is not None:
            self.size = size
        return stream

    def _drop(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.close()
            self._stream = None


def _retrying(url: str, action):
    """action() with RETRIES retries of transient errors; the last error ends as one line."""
    for attempt in range(RETRIES + 1):
        try:
            return action()
        except UserError:
            raise
        except _RETRYABLE + (ValueError,) as exc:
            if attempt == RETRIES:
                raise UserError(f"{url}: could not be read after {RETRIES + 1} tries ({_reason(exc)})") from None
            time.sleep(RETRY_WAIT * 2 ** attempt)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
        if not isinstance(exc, BaseException):
            return str(exc)
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0] if text.splitlines() else type(exc).__name__


def _cache_path(remote: Remote) -> Path | None:
    if not remote.cache_dir or not remote.sha256:
        return None
    return Path(remote.cache_dir) / f"{remote.sha256}.tar"


# ---------------------------------------------------------------- listing and writing


def list_remote_splits(root: Remote, info_name: str) -> list[str]:
    """Split folders under a remote root that hold a manifest: listed where the store can list
    (object stores, an HTTP server's folder index), else the common names probed."""
    names = _backend(root).list_folders()
    if names is None:
        names = list(COMMON_SPLITS)
    return [name for name in names if (root / name / info_name).is_file()]


def upload(local: Path, remote: Remote) -> None:
    """Copy a finished local file to the remote store (whole, as one object)."""
    _retrying(remote.url, lambda: _backend(remote).put(Path(local)))


def download(remote: Remote, local: Path) -> bool:
    """Copy a remote file to `local`; False when it does not exist."""
    try:
        data = remote.read_bytes()
    except MissingFile:
        return False
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    Path(local).write_bytes(data)
    return True


def delete(remote: Remote) -> None:
    _retrying(remote.url, lambda: _backend(remote).delete())


def _backend(remote: Remote):
    if remote.root.startswith("pipe:"):
        return _Pipe(remote.url)
    if remote.root.split("://", 1)[0].lower() in ("http", "https"):
        return _Http(remote.url)
    return _Fsspec(remote.url)


class _Http:
    """http(s) with urllib: Range requests, no extra package."""

    seekable = True

    def __init__(self, url: str):
        self.url = url

    def open(self, offset: int):
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            response = urllib.request.urlopen(request, timeout=TIMEOUT)
        except urllib.error.HTTPError as exc:
            self._refuse(exc)
            if exc.code == 416:  # nothing left past `offset`
                return io.BytesIO(b""), offset
            raise
        if response.status == 206:
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            return response, int(total) if total.isdigit() else None
        length = response.headers.get("Content-Length")
        if offset:  # the server ignored the Range header: skip to the byte by reading
            remaining = offset
            while remaining:
                chunk = response.read(min(remaining, BUFFER))
                if not chunk:
                    raise ConnectionError("the connection closed before the resume point")
                remaining -= len(chunk)
        return response, int(length) if length and length.isdigit() else None

    def _refuse(self, exc: urllib.error.HTTPError) -> None:
        """Answers that no retry changes: the file is not there, or not for us."""
        if exc.code in (404, 410):
            raise MissingFile(f"{self.url}: not found (HTTP {exc.code})") from None
        if exc.code in (401, 403):
            raise UserError(f"{self.url}: access denied (HTTP {exc.code})") from None

    def exists(self) -> bool:
        def head():
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, method="HEAD"), timeout=TIMEOUT):
                    return True
            except urllib.error.HTTPError as exc:
                if exc.code in (404, 410):
                    return False
                self._refuse(exc)
                raise
        return _retrying(self.url, head)

    def check_finished(self, stream) -> None:
        pass

    def list_folders(self) -> list[str] | None:
        """The sub-folders an HTTP folder index (python -m http.server, nginx autoindex) links to."""
        def index_page() -> str | None:
            try:
                with urllib.request.urlopen(self.url.rstrip("/") + "/", timeout=TIMEOUT) as response:
                    if "html" not in response.headers.get("Content-Type", ""):
                        return None
                    return response.read(1 << 22).decode("utf-8", "replace")
            except urllib.error.HTTPError:
                return None  # no index here: the common split names are probed instead

        page = _retrying(self.url, index_page)
        if page is None:
            return None
        links = _Links()
        links.feed(page)
        found = [urllib.parse.unquote(h[:-1]) for h in links.hrefs
                 if h.endswith("/") and "/" not in h[:-1] and not h.startswith((".", "?", "#"))]
        return sorted(dict.fromkeys(found)) or None

    def put(self, local: Path) -> None:
        raise UserError(f"{self.url}: http(s) roots are read-only here; write to s3://, gs:// or another fsspec store")

    delete = put


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [value for key, value in attrs if key == "href" and value]


class _Fsspec:
    """Any fsspec protocol (memory://, s3://, gs://, ...): seekable files, listing, writing."""

    seekable = True

    def __init__(self, url: str):
        self.url = url
        try:
            import fsspec

            self.fs, self.path = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            extra = {"s3": " (pip install 'cfrobust[s3]')", "gs": " (pip install 'cfrobust[gcs]')",
                     "gcs": " (pip install 'cfrobust[gcs]')"}.get(url.split("://", 1)[0].lower(), "")
            raise UserError(f"{url}: cannot open this protocol: {_reason(exc)}{extra}") from None

    def open(self, offset: int):
        try:
            stream = self.fs.open(self.path, "rb")
        except FileNotFoundError:
            raise MissingFile(f"{self.url}: not found") from None
        except PermissionError:
            raise UserError(f"{self.url}: access denied") from None
        size = getattr(stream, "size", None)
        if size is None:
            size = self.fs.size(self.path)
        if offset:
            stream.seek(offset)
        return stream, size

    def exists(self) -> bool:
        return _retrying(self.url, lambda: self.fs.isfile(self.path))

    def check_finished(self, stream) -> None:
        pass

    def list_folders(self) -> list[str] | None:
        try:
            entries = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    def put(self, local: Path) -> None:
        parent = self.path.rsplit("/", 1)[0]
        with contextlib.suppress(Exception):  # object stores have no folders to make
            self.fs.makedirs(parent, exist_ok=True)
        self.fs.put_file(str(local), self.path)

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)


class _Pipe:
    """WebDataset's `pipe:COMMAND`: the file is what the command writes to its standard output."""

    seekable = False

    def __init__(self, url: str):
        self.url, self.command = url, url[len("pipe:"):]

    def open(self, offset: int):
        process = subprocess.Popen(self.command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stream = _ProcessOutput(process)
        remaining = offset
        while remaining:
            chunk = stream.read(min(remaining, BUFFER))
            if not chunk:
                self.check_finished(stream)
                raise ConnectionError("the command's output ended before the resume point")
            remaining -= len(chunk)
        return stream, None

    def check_finished(self, stream) -> None:
        code = stream.process.wait()
        if code:
            error = stream.process.stderr.read().decode("utf-8", "replace").strip().splitlines()
            raise _CommandFailed(f"exit status {code}" + (f": {error[-1]}" if error else ""))

    def exists(self) -> bool:
        try:
            stream, _ = self.open(0)
            while stream.read(BUFFER):
                pass
            self.check_finished(stream)
            return True
        except _CommandFailed:
            return False

    def list_folders(self) -> None:
        return None

    def put(self, local: Path) -> None:
        raise UserError(f"{self.url}: pipe: roots are read-only")

    delete = put


class _ProcessOutput:
    def __init__(self, process: subprocess.Popen):
        self.process = process

    def read(self, size: int) -> bytes:
        return self.process.stdout.read(size)

    def readinto(self, buffer) -> int:
        return self.process.stdout.readinto(buffer)

    def close(self) -> None:
        self.process.stdout.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stderr.close()



# ---------------------------------------------------------------- writing a shard root remotely


class RemoteOutput:
    """Output to a URL, built in a local staging folder and uploaded file by file once each is
    complete. `preprocess --out URL` uploads a shard, then the resume journal that lists it, the
    manifest last, so the remote root never names a file that is not all there; --resume starts
    from the remote journal and trusts the shards it lists (they were uploaded before it was).
    `cagan train --out URL` uploads its weights, training state and sample grids likewise.
    Files are named by their path relative to the root ("train/_info.json")."""

    def __init__(self, root: Remote, staging: Path | None = None):
        self.root = root
        self.staging = Path(staging) if staging else Path(tempfile.mkdtemp(prefix="cfrobust-upload-"))

    def local(self, relative: str) -> Path:
        return self.staging / relative

    def publish(self, path: Path, keep_local: bool = True) -> None:
        """Upload a finished file of the staging folder to the same place under the root."""
        relative = Path(path).relative_to(self.staging)
        upload(Path(path), self.root / relative.as_posix())
        if not keep_local:
            Path(path).unlink()

    def pull(self, relative: str) -> bool:
        """Copy a small remote file (journal, manifest, state) into the staging folder; False if absent."""
        return download(self.root / relative, self.local(relative))

    def has(self, relative: str) -> bool:
        return (self.root / relative).is_file()

    def remove(self, relative: str) -> None:
        delete(self.root / relative)

    def close(self) -> None:
        """Remove the staging folder (what it holds is uploaded, or redone on --resume)."""
        shutil.rmtree(self.staging, ignore_errors=True)
