"""Local-directory object store: the embedded default (``jetcut dev``) and the test double.

Layout under the root::

    <root>/<key>                      object bytes, at the path the key names
    <root>/.jetcut/meta/<key>.json    etag + content type, tied to the data file's identity
    <root>/.jetcut/tmp/               writes in progress (renamed into place when complete)

Objects sit at plain paths so a developer can look at what a job produced. Writes go to a
temp file that is fsynced and then ``os.replace``-d over the target, so a reader (another
process included) sees the old object or the new one, never half of one. The temp dir lives
under the root, hence on the same filesystem, where a rename is atomic; keeping temp files
out of the object tree also means a listing never shows a write in progress and a crash's
leftovers are in one place. The first key segment ``.jetcut`` is therefore reserved here.

Unlike S3, a directory cannot hold both an object ``a`` and objects under ``a/``; such a
write raises :class:`~shared.errors.InvalidKey`. Keys built from minted ids never collide so.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from typing import BinaryIO, ParamSpec, TypeVar

import msgspec

from shared.errors import InvalidKey, ObjectNotFound, StoreUnavailable
from shared.store.base import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CONTENT_TYPE,
    ObjectInfo,
    ObjectStore,
    validate_key,
    validate_prefix,
    write_atomically,
)

RESERVED_DIR = ".jetcut"
COPY_CHUNK = 1 << 20
_REPLACE_ATTEMPTS = 5
"""A concurrent delete may prune the directory we just created; recreate and retry."""

P = ParamSpec("P")
T = TypeVar("T")


class _Meta(msgspec.Struct, frozen=True):
    """Sidecar facts S3 keeps with an object. ``ino``/``size``/``mtime_ns`` identify the
    data file it describes, so a sidecar left from an earlier version is never trusted."""

    etag: str
    content_type: str
    ino: int
    size: int
    mtime_ns: int


_meta_encoder = msgspec.json.Encoder()
_meta_decoder = msgspec.json.Decoder(_Meta)


class LocalStore(ObjectStore):
    """Objects as files under a root directory.

    Args:
        root: the store's directory; created by :meth:`ensure_ready` (or the first write).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = os.path.abspath(os.fspath(root))
        self._real_root = os.path.realpath(self._root)

    @property
    def root(self) -> str:
        return self._root

    def __repr__(self) -> str:
        return f"LocalStore({self._root!r})"

    # --- paths ------------------------------------------------------------------------

    @property
    def _meta_root(self) -> str:
        return os.path.join(self._root, RESERVED_DIR, "meta")

    @property
    def _tmp_dir(self) -> str:
        return os.path.join(self._root, RESERVED_DIR, "tmp")

    def _path(self, key: str) -> str:
        """The file for ``key``, from the key alone (no I/O, so it runs on the event loop).

        Key validation rules out '..' and absolute keys, so the path is lexically under the
        root; :meth:`_confine` then checks where it really leads.
        """
        validate_key(key)
        if key.split("/", 1)[0] == RESERVED_DIR:
            raise InvalidKey(key, f"the first segment {RESERVED_DIR!r} is reserved")
        return os.path.join(self._root, *key.split("/"))

    def _confine(self, key: str, path: str) -> str:
        """Refuse a path that resolves outside the root (a symlink inside the root that
        points elsewhere). Blocking: resolving touches the filesystem."""
        if not _inside(os.path.realpath(path), self._real_root):
            raise InvalidKey(key, "resolves outside the store root")
        return path

    def _open(self, key: str, path: str) -> BinaryIO:
        return _open_object(key, self._confine(key, path))

    def _meta_path(self, key: str) -> str:
        return os.path.join(self._meta_root, *key.split("/")) + ".json"

    # --- interface --------------------------------------------------------------------

    async def ensure_ready(self) -> None:
        def run() -> None:
            os.makedirs(self._tmp_dir, exist_ok=True)
            os.makedirs(self._meta_root, exist_ok=True)
            self._real_root = os.path.realpath(self._root)

        await _io(run)

    async def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> ObjectInfo:
        path = self._path(key)
        return await _io(self._write, key, path, [data], content_type)

    async def put_file(
        self, key: str, path: str | os.PathLike[str], content_type: str | None = None
    ) -> ObjectInfo:
        dest = self._path(key)

        def run() -> ObjectInfo:
            try:
                src = open(path, "rb")
            except OSError as exc:
                raise _CallerIOError(exc) from exc
            with src:
                return self._write(key, dest, _caller_chunks(src, COPY_CHUNK), content_type)

        return await _io(run)

    async def get_bytes(self, key: str) -> bytes:
        path = self._path(key)

        def run() -> bytes:
            with self._open(key, path) as f:
                return f.read()

        return await _io(run)

    async def get_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        src_path = self._path(key)

        def run() -> ObjectInfo:
            with self._open(key, src_path) as src:
                info = self._info(key, src)
                try:
                    write_atomically(path, _store_chunks(src, COPY_CHUNK))
                except OSError as exc:
                    raise _CallerIOError(exc) from exc
            return info

        return await _io(run)

    def iter_chunks(
        self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> AsyncGenerator[bytes, None]:
        path = self._path(key)
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        return self._iter_chunks(key, path, chunk_size)

    async def _iter_chunks(
        self, key: str, path: str, chunk_size: int
    ) -> AsyncGenerator[bytes, None]:
        f = await _io(self._open, key, path)
        try:
            while chunk := await _io(f.read, chunk_size):
                yield chunk
        finally:
            f.close()

    async def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)

        def run() -> ObjectInfo:
            with self._open(key, path) as f:
                return self._info(key, f)

        return await _io(run)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        validate_prefix(prefix)
        return await _io(self._list, prefix)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await _io(self._delete, key, path)

    async def delete_prefix(self, prefix: str) -> int:
        validate_prefix(prefix)

        def run() -> int:
            return sum(self._delete(info.key, self._path(info.key)) for info in self._list(prefix))

        return await _io(run)

    async def check(self) -> None:
        def run() -> None:
            if not os.path.isdir(self._root):
                raise StoreUnavailable(f"store root {self._root!r} is not a directory")
            if not os.access(self._root, os.W_OK | os.X_OK):
                raise StoreUnavailable(f"store root {self._root!r} is not writable")

        await _io(run)

    async def close(self) -> None:
        return None

    # --- blocking helpers (run in a worker thread) ------------------------------------

    def _write(
        self, key: str, dest: str, chunks: Iterable[bytes], content_type: str | None
    ) -> ObjectInfo:
        self._confine(key, dest)
        content_type = content_type or DEFAULT_CONTENT_TYPE
        os.makedirs(self._tmp_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._tmp_dir, prefix="put-")
        try:
            digest = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                # The object is a checkpoint other steps build on: it must survive a crash
                # once put() has returned.
                os.fsync(out.fileno())
                st = os.fstat(out.fileno())
            meta = _Meta(
                etag=digest.hexdigest(),
                content_type=content_type,
                ino=st.st_ino,
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
            )
            # Sidecar first: if we crash between the two renames the old data file no longer
            # matches the new sidecar, which is then ignored rather than believed.
            self._write_meta(key, meta)
            _replace_into(tmp, dest, key)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(os.path.dirname(dest))
        return ObjectInfo(
            key=key,
            size=meta.size,
            etag=meta.etag,
            last_modified=st.st_mtime,
            content_type=content_type,
        )

    def _write_meta(self, key: str, meta: _Meta) -> None:
        # Not fsynced: the sidecar is verified against the data file and recomputable.
        fd, tmp = tempfile.mkstemp(dir=self._tmp_dir, prefix="meta-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(_meta_encoder.encode(meta))
            _replace_into(tmp, self._meta_path(key), key)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _info(self, key: str, f: BinaryIO) -> ObjectInfo:
        """Describe the open data file ``f``; trusts the sidecar only if it names this file."""
        st = os.fstat(f.fileno())
        meta: _Meta | None = None
        try:
            with open(self._meta_path(key), "rb") as mf:
                meta = _meta_decoder.decode(mf.read())
        except (OSError, msgspec.DecodeError):
            meta = None
        if meta is not None and (meta.ino, meta.size, meta.mtime_ns) == (
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
        ):
            etag, content_type = meta.etag, meta.content_type
        else:
            # A file that did not come through put() (or a sidecar from a crashed write):
            # hash it so the etag still means "md5 of the content".
            pos = f.tell()
            f.seek(0)
            digest = hashlib.md5(usedforsecurity=False)
            for chunk in _chunks(f, COPY_CHUNK):
                digest.update(chunk)
            f.seek(pos)
            etag, content_type = digest.hexdigest(), DEFAULT_CONTENT_TYPE
        return ObjectInfo(
            key=key,
            size=st.st_size,
            etag=etag,
            last_modified=st.st_mtime,
            content_type=content_type,
        )

    def _list(self, prefix: str) -> builtins.list[ObjectInfo]:
        # S3 semantics: a plain string prefix. Walk only the deepest directory the prefix
        # names fully, and prune subdirectories that cannot match.
        base = prefix.rpartition("/")[0]
        start = os.path.join(self._root, *base.split("/")) if base else self._root
        if not _inside(os.path.realpath(start), self._real_root):
            raise InvalidKey(prefix, "resolves outside the store root")
        found: builtins.list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):
            rel = os.path.relpath(dirpath, self._root)
            rel_key = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            dirnames[:] = [
                d
                for d in dirnames
                if not (rel_key == "" and d == RESERVED_DIR)
                and ((rel_key + d + "/").startswith(prefix) or prefix.startswith(rel_key + d + "/"))
            ]
            for name in filenames:
                key = rel_key + name
                if not key.startswith(prefix):
                    continue
                try:
                    with self._open(key, self._path(key)) as f:
                        found.append(self._info(key, f))
                except (InvalidKey, ObjectNotFound):
                    # Not a valid key (a stray file), a symlink out of the root, or deleted
                    # while we walked: none of them is an object of this store.
                    continue
        found.sort(key=lambda info: info.key)
        return found

    def _delete(self, key: str, path: str) -> bool:
        self._confine(key, path)
        removed = False
        try:
            os.unlink(path)
            removed = True
        except (FileNotFoundError, NotADirectoryError):
            pass
        except IsADirectoryError:
            return False  # a prefix of other objects, not an object
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(self._meta_path(key))
        # Drop directories the delete emptied, as S3 has no empty "directories" either;
        # otherwise a later put of key "a" would fail on a leftover empty dir "a/".
        _prune(os.path.dirname(path), self._root)
        _prune(os.path.dirname(self._meta_path(key)), self._meta_root)
        return removed


# --- module helpers -----------------------------------------------------------------------


class _CallerIOError(Exception):
    """Carries an OSError on the caller's own file (put_file's source, get_file's target)
    out of the worker thread, so it is re-raised as is instead of blamed on the store."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


async def _io(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run blocking file work in a thread.

    OS failures on the store's own files (disk full, permissions, I/O errors) become
    :class:`StoreUnavailable`, transient, like an unreachable S3; failures on the caller's
    files propagate as the original ``OSError``.
    """
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except _CallerIOError as exc:
        raise exc.error from None
    except OSError as exc:
        raise StoreUnavailable(f"local store I/O failed: {exc}") from exc


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _open_object(key: str, path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        # A directory is a prefix of other objects, not an object (as in S3).
        raise ObjectNotFound(key) from None


def _chunks(f: BinaryIO, size: int) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk


def _store_chunks(f: BinaryIO, size: int) -> Iterator[bytes]:
    try:
        yield from _chunks(f, size)
    except OSError as exc:
        raise StoreUnavailable(f"local store I/O failed: {exc}") from exc


def _caller_chunks(f: BinaryIO, size: int) -> Iterator[bytes]:
    try:
        yield from _chunks(f, size)
    except OSError as exc:
        raise _CallerIOError(exc) from exc


def _replace_into(tmp: str, dest: str, key: str) -> None:
    for _ in range(_REPLACE_ATTEMPTS):
        try:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(tmp, dest)
            return
        except FileNotFoundError:
            continue  # a concurrent delete pruned the parent between makedirs and replace
        except (FileExistsError, NotADirectoryError) as exc:
            raise InvalidKey(key, "a parent segment is an existing object") from exc
        except IsADirectoryError as exc:
            raise InvalidKey(key, "is a prefix of existing objects") from exc
        except OSError as exc:
            if os.path.isdir(dest):  # EISDIR is reported as other errnos on some systems
                raise InvalidKey(key, "is a prefix of existing objects") from exc
            raise
    raise StoreUnavailable(f"could not create the directory for {key!r}")


def _fsync_dir(path: str) -> None:
    """Make a rename durable: the directory entry must reach the disk too."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(directory: str, stop: str) -> None:
    """Remove ``directory`` and its parents while they are empty, never ``stop`` itself."""
    stop = os.path.abspath(stop)
    directory = os.path.abspath(directory)
    while directory != stop and _inside(directory, stop):
        try:
            os.rmdir(directory)
        except OSError:
            return  # not empty (or already gone / in use): stop climbing
        directory = os.path.dirname(directory)
