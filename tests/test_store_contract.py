"""One contract for every object store backend: local directory, moto S3, MinIO (Docker).

Each test gets a fresh store (its own temp dir or bucket), so tests never see each other's
objects. A behaviour only one backend has (the local store's root confinement, a dead S3
endpoint) is tested on that backend alone, at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import pytest
import urllib3

from shared.errors import InvalidKey, ObjectNotFound, StoreUnavailable
from shared.settings import Settings
from shared.store import LocalStore, ObjectStore, S3Store, open_store
from shared.store.base import MAX_KEY_BYTES, validate_key, validate_prefix
from tests.support.s3 import S3Endpoint, S3StoreFactory

MiB = 1 << 20
LARGE_SIZE = 64 * MiB
MEMORY_BUDGET = 16 * MiB

BACKENDS = [
    "local",
    "s3-moto",
    pytest.param("s3-minio", marks=pytest.mark.docker),
]

INVALID_KEYS = [
    "",
    "../x",
    "a/../b",
    "/abs",
    "a//b",
    "a/./b",
    "./a",
    "a/",
    "a\\b",
    "nul\x00byte",
    "tab\tkey",
    "del\x7fkey",
    "x" * (MAX_KEY_BYTES + 1),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> tuple[str, S3Endpoint | None]:
    """Which backend, and its S3 endpoint; resolved lazily so a local-only run starts no
    server and only the MinIO cases skip without Docker."""
    name: str = request.param
    if name == "s3-moto":
        return name, request.getfixturevalue("s3_server")
    if name == "s3-minio":
        return name, request.getfixturevalue("minio_container")
    return name, None


@pytest.fixture
async def store(
    backend: tuple[str, S3Endpoint | None],
    tmp_path: Path,
    s3_store_factory: S3StoreFactory,
) -> AsyncIterator[ObjectStore]:
    _, endpoint = backend
    if endpoint is not None:
        yield await s3_store_factory(endpoint)
        return
    local = LocalStore(tmp_path / "store")
    await local.ensure_ready()
    yield local
    await local.close()


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def write_large_file(path: Path, size: int) -> str:
    """Write ``size`` bytes a MiB at a time (never holding the file in memory); sha256 hex."""
    digest = hashlib.sha256()
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            chunk = i.to_bytes(8, "big") + block[8:]  # distinct blocks, so order is checked
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


# --- contract ------------------------------------------------------------------------


async def test_put_get_bytes_roundtrip(store: ObjectStore) -> None:
    data = b'{"ok": true}'
    info = await store.put_bytes("jobs/j1/probe/manifest.json", data, "application/json")

    assert info.key == "jobs/j1/probe/manifest.json"
    assert info.size == len(data)
    assert info.etag == md5_hex(data)
    assert info.content_type == "application/json"
    assert await store.get_bytes("jobs/j1/probe/manifest.json") == data
    stat = await store.stat("jobs/j1/probe/manifest.json")
    assert (stat.size, stat.etag, stat.content_type) == (len(data), info.etag, "application/json")


async def test_default_content_type_is_octet_stream(store: ObjectStore) -> None:
    info = await store.put_bytes("blob", b"\x00\x01")
    assert info.content_type == "application/octet-stream"
    assert (await store.stat("blob")).content_type == "application/octet-stream"


async def test_empty_object(store: ObjectStore) -> None:
    info = await store.put_bytes("empty", b"")
    assert info.size == 0
    assert await store.get_bytes("empty") == b""
    async with aclosing(store.iter_chunks("empty")) as chunks:
        assert [c async for c in chunks] == []


async def test_put_file_get_file_roundtrip(store: ObjectStore, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = tmp_path / "in.mp4"
    src.write_bytes(data)

    put = await store.put_file("uploads/t/u1/in.mp4", src, "video/mp4")
    assert (put.size, put.etag, put.content_type) == (len(data), md5_hex(data), "video/mp4")

    # Parents are created; an existing target is replaced; no temp file is left behind.
    dest = tmp_path / "work" / "deep" / "copy.mp4"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"stale")
    got = await store.get_file("uploads/t/u1/in.mp4", dest)

    assert dest.read_bytes() == data
    assert os.listdir(dest.parent) == ["copy.mp4"]
    assert (got.size, got.etag, got.content_type) == (len(data), put.etag, "video/mp4")
    fresh = tmp_path / "fresh" / "dir" / "x.mp4"
    await store.get_file("uploads/t/u1/in.mp4", str(fresh))
    assert fresh.read_bytes() == data


async def test_put_file_missing_source_is_the_callers_error(
    store: ObjectStore, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError):
        await store.put_file("k", tmp_path / "does-not-exist")
    assert not await store.exists("k")


async def test_large_object_streams_in_bounded_memory(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "large.bin"
    expected = await asyncio.to_thread(write_large_file, src, LARGE_SIZE)

    tracemalloc.start()
    try:
        put = await store.put_file("jobs/big/transcode/out.bin", src)
        _, put_peak = tracemalloc.get_traced_memory()

        tracemalloc.reset_peak()
        got = hashlib.sha256()
        size = 0
        async with aclosing(store.iter_chunks("jobs/big/transcode/out.bin")) as chunks:
            async for chunk in chunks:
                assert 0 < len(chunk) <= MiB
                got.update(chunk)
                size += len(chunk)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert put.size == LARGE_SIZE
    assert size == LARGE_SIZE
    assert got.hexdigest() == expected
    assert put_peak < MEMORY_BUDGET, f"put_file peaked at {put_peak / MiB:.1f} MiB"
    assert read_peak < MEMORY_BUDGET, f"iter_chunks peaked at {read_peak / MiB:.1f} MiB"
    assert (await store.stat("jobs/big/transcode/out.bin")).size == LARGE_SIZE
    await store.delete("jobs/big/transcode/out.bin")


async def test_readers_never_see_a_partial_write(store: ObjectStore) -> None:
    versions = [b"a" * 256_000, b"b" * 512_000]
    await store.put_bytes("hot", versions[0])
    seen: set[bytes] = set()

    async def writer() -> None:
        for i in range(20):
            await store.put_bytes("hot", versions[i % 2])

    async def reader() -> None:
        for _ in range(40):
            data = await store.get_bytes("hot")
            assert data in versions, f"read {len(data)} bytes: a torn object"
            seen.add(data[:1])

    await asyncio.gather(writer(), reader(), reader())
    assert seen


async def test_iter_chunks_chunk_size_and_early_exit(store: ObjectStore) -> None:
    data = os.urandom(10_000)
    await store.put_bytes("k", data)

    async with aclosing(store.iter_chunks("k", chunk_size=1000)) as chunks:
        parts = [c async for c in chunks]
    assert b"".join(parts) == data
    assert all(len(p) <= 1000 for p in parts)

    # Stopping early releases the file/connection: the store keeps working afterwards.
    for _ in range(3):
        async with aclosing(store.iter_chunks("k", chunk_size=1000)) as chunks:
            async for first in chunks:
                assert first == data[: len(first)]
                break
    assert await store.get_bytes("k") == data


async def test_list_prefix_sorted_recursive(store: ObjectStore) -> None:
    keys = [
        "jobs/1/b.ts",
        "jobs/1/a/y.ts",
        "jobs/1/a/x.ts",
        "jobs/10/z.ts",
        "jobs/2/q.ts",
        "uploads/t/u/f.mp4",
    ]
    for key in keys:
        await store.put_bytes(key, key.encode())

    listed = await store.list("jobs/1/")
    assert [i.key for i in listed] == ["jobs/1/a/x.ts", "jobs/1/a/y.ts", "jobs/1/b.ts"]
    assert all(i.size == len(i.key) and i.etag == md5_hex(i.key.encode()) for i in listed)
    # A prefix is a plain string prefix, as in S3: "jobs/1" also selects "jobs/10/...".
    assert [i.key for i in await store.list("jobs/1")] == [
        "jobs/1/a/x.ts",
        "jobs/1/a/y.ts",
        "jobs/1/b.ts",
        "jobs/10/z.ts",
    ]
    assert [i.key for i in await store.list("jobs/1/a/x")] == ["jobs/1/a/x.ts"]
    assert await store.list("nothing/") == []
    assert len(await store.list("jobs/")) == 5


async def test_list_says_when_each_object_was_written(store: ObjectStore) -> None:
    # The janitor ages uploads by what a listing says, without a stat per object.
    before = time.time()
    await store.put_bytes("uploads/t/u1/a.mp4", b"a")
    after = time.time()
    (listed,) = await store.list("uploads/t/")
    # S3 keeps whole seconds; allow for that and a little clock skew.
    assert before - 5 <= listed.last_modified <= after + 5
    assert abs(listed.last_modified - (await store.stat(listed.key)).last_modified) <= 1


async def test_exists(store: ObjectStore) -> None:
    assert not await store.exists("jobs/j/step/manifest.json")
    await store.put_bytes("jobs/j/step/manifest.json", b"{}")
    assert await store.exists("jobs/j/step/manifest.json")
    # A "directory" is a prefix of other objects, not an object.
    assert not await store.exists("jobs/j/step")


async def test_delete_is_idempotent(store: ObjectStore) -> None:
    await store.put_bytes("d/e/f", b"x")
    await store.delete("d/e/f")
    assert not await store.exists("d/e/f")
    await store.delete("d/e/f")
    await store.delete("never/written")
    # Deleting the last object under a prefix leaves no trace of the prefix.
    await store.put_bytes("d/e", b"now an object")
    assert await store.get_bytes("d/e") == b"now an object"
    assert [i.key for i in await store.list("d/")] == ["d/e"]


async def test_delete_prefix_counts(store: ObjectStore) -> None:
    for key in ["p/1", "p/2/a", "p/2/b", "q/1", "pq"]:
        await store.put_bytes(key, b"x")

    assert await store.delete_prefix("p/") == 3
    assert await store.list("p/") == []
    assert [i.key for i in await store.list("q/")] == ["q/1"]
    assert await store.exists("pq")
    assert await store.delete_prefix("p/") == 0


async def test_stat_fields(store: ObjectStore) -> None:
    before = time.time()
    put = await store.put_bytes("s/obj.txt", b"hello", "text/plain")
    after = time.time()

    stat = await store.stat("s/obj.txt")
    assert stat.key == "s/obj.txt"
    assert stat.size == 5
    assert stat.etag == put.etag == md5_hex(b"hello")
    assert stat.content_type == "text/plain"
    # S3 keeps whole seconds; allow for that and a little clock skew.
    assert before - 5 <= stat.last_modified <= after + 5
    assert abs(stat.last_modified - put.last_modified) <= 5


async def test_overwrite_replaces_content(store: ObjectStore) -> None:
    await store.put_bytes("o", b"first version", "text/plain")
    second = await store.put_bytes("o", b"v2", "application/json")

    assert await store.get_bytes("o") == b"v2"
    stat = await store.stat("o")
    assert (stat.size, stat.etag, stat.content_type) == (2, second.etag, "application/json")
    assert [i.key for i in await store.list("o")] == ["o"]


async def test_missing_key_raises_object_not_found(store: ObjectStore, tmp_path: Path) -> None:
    await store.put_bytes("dir/child", b"x")
    for key in ["missing", "dir/missing", "dir"]:
        with pytest.raises(ObjectNotFound) as err:
            await store.get_bytes(key)
        assert err.value.key == key
        with pytest.raises(ObjectNotFound):
            await store.stat(key)
        with pytest.raises(ObjectNotFound):
            await store.get_file(key, tmp_path / "out" / "f")
        assert not (tmp_path / "out" / "f").exists()
        with pytest.raises(ObjectNotFound):
            async with aclosing(store.iter_chunks(key)) as chunks:
                async for _ in chunks:
                    pass


async def test_invalid_keys_are_refused(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x")
    for key in INVALID_KEYS:
        with pytest.raises(InvalidKey):
            await store.put_bytes(key, b"x")
        with pytest.raises(InvalidKey):
            await store.put_file(key, src)
        with pytest.raises(InvalidKey):
            await store.get_bytes(key)
        with pytest.raises(InvalidKey):
            await store.stat(key)
        with pytest.raises(InvalidKey):
            await store.exists(key)
        with pytest.raises(InvalidKey):
            await store.delete(key)
        with pytest.raises(InvalidKey):
            store.iter_chunks(key)  # refused on the call, before any I/O
    for prefix in ["", "/p", "a//", "../", "a/./", "a\\"]:
        with pytest.raises(InvalidKey):
            await store.list(prefix)
        with pytest.raises(InvalidKey):
            await store.delete_prefix(prefix)


async def test_check_and_ensure_ready_idempotent(store: ObjectStore) -> None:
    await store.ensure_ready()
    await store.ensure_ready()
    await store.check()


# --- key rules (no I/O) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "jobs/0193-abc/transcode/manifest.json",
        "uploads/tenant/u1/My Clip (final).mp4",
        "ünï/cødé/файл.mp4",
        ".hidden/..dots/...",
        "x" * MAX_KEY_BYTES,
    ],
)
def test_valid_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize("key", [*INVALID_KEYS, "é" * (MAX_KEY_BYTES // 2 + 1), "\ud800"])
def test_invalid_keys(key: str) -> None:
    with pytest.raises(InvalidKey) as err:
        validate_key(key)
    assert err.value.non_retryable


def test_prefix_rules() -> None:
    assert validate_prefix("jobs/") == "jobs/"
    assert validate_prefix("jobs/1") == "jobs/1"
    for prefix in ["", "/", "jobs//", "a/../"]:
        with pytest.raises(InvalidKey):
            validate_prefix(prefix)


# --- one backend only ------------------------------------------------------------------


async def test_local_store_cannot_escape_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    store = LocalStore(tmp_path / "root")
    await store.ensure_ready()
    (tmp_path / "root" / "link").symlink_to(outside, target_is_directory=True)

    with pytest.raises(InvalidKey):
        await store.put_bytes("link/x", b"x")
    with pytest.raises(InvalidKey):
        await store.get_bytes("link/secret")
    with pytest.raises(InvalidKey):
        await store.put_bytes(".jetcut/meta/x", b"x")  # the store's own bookkeeping
    assert not (outside / "x").exists()
    # Listing skips what it may not serve.
    await store.put_bytes("inside", b"ok")
    assert [i.key for i in await store.list("l")] == []
    assert [i.key for i in await store.list("i")] == ["inside"]


async def test_local_store_refuses_object_and_prefix_of_same_name(tmp_path: Path) -> None:
    # S3 can hold both "a" and "a/b"; a directory cannot. Minted keys never collide so,
    # and the local store says so plainly instead of failing with an OS error.
    store = LocalStore(tmp_path / "root")
    await store.ensure_ready()
    await store.put_bytes("a", b"object")
    with pytest.raises(InvalidKey):
        await store.put_bytes("a/b", b"x")
    await store.put_bytes("c/d", b"x")
    with pytest.raises(InvalidKey):
        await store.put_bytes("c", b"x")
    assert [i.key for i in await store.list("a")] == ["a"]
    assert [i.key for i in await store.list("c")] == ["c/d"]
    assert os.listdir(tmp_path / "root" / ".jetcut" / "tmp") == []  # failed writes cleaned up


async def test_local_store_check_fails_without_root(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        await LocalStore(tmp_path / "never-created").check()


async def test_s3_missing_bucket_is_unavailable(s3_server: S3Endpoint) -> None:
    store = s3_server.store("jetcut-test-no-such-bucket")
    try:
        with pytest.raises(StoreUnavailable):
            await store.check()
        with pytest.raises(StoreUnavailable):
            await store.put_bytes("k", b"x")
    finally:
        await store.close()


async def test_s3_dead_endpoint_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port now: every request is refused.
    store = S3Store(
        f"127.0.0.1:{port}", "k", "s", "bucket", region="us-east-1", connect_timeout=2, retries=2
    )
    start = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable):
            await store.check()
        with pytest.raises(StoreUnavailable):
            await store.ensure_ready()
        with pytest.raises(StoreUnavailable):
            await store.put_bytes("k", b"x")
        with pytest.raises(StoreUnavailable):
            await store.get_bytes("k")
        with pytest.raises(StoreUnavailable):
            await store.list("p/")
        with pytest.raises(StoreUnavailable):
            async with aclosing(store.iter_chunks("k")) as chunks:
                async for _ in chunks:
                    pass
    finally:
        await store.close()
    assert time.monotonic() - start < 15


def checked_out(http: urllib3.PoolManager) -> int:
    """Connections taken from ``http``'s pools and not given back."""
    pools = [http.pools[k] for k in http.pools.keys()]
    return sum(p.pool.maxsize - p.pool.qsize() for p in pools if p.pool is not None)


async def test_s3_streams_give_connections_back(
    s3_server: S3Endpoint, s3_store_factory: S3StoreFactory, tmp_path: Path
) -> None:
    http = urllib3.PoolManager(maxsize=4)
    try:
        store = await s3_store_factory(s3_server, http_client=http)
        await store.put_bytes("k", os.urandom(3 * MiB))
        for _ in range(3):
            async with aclosing(store.iter_chunks("k", chunk_size=MiB // 4)) as chunks:
                async for _chunk in chunks:
                    break
        async with aclosing(store.iter_chunks("k")) as chunks:
            assert sum([len(c) async for c in chunks]) == 3 * MiB
        with pytest.raises(ObjectNotFound):
            async with aclosing(store.iter_chunks("missing")) as chunks:
                async for _chunk in chunks:
                    pass
        assert len(await store.get_bytes("k")) == 3 * MiB
        await store.get_file("k", tmp_path / "x")
        assert checked_out(http) == 0
    finally:
        http.clear()


async def test_open_store_picks_backend(tmp_path: Path, s3_server: S3Endpoint) -> None:
    local = open_store(Settings(store="local", store_dir=str(tmp_path / "s")))
    assert isinstance(local, LocalStore)
    assert local.root == str(tmp_path / "s")
    await local.close()

    s3 = open_store(s3_server.settings(bucket="jetcut-test-open-store"))
    assert isinstance(s3, S3Store)
    try:
        await s3.ensure_ready()
        await s3.put_bytes("k", b"v")
        assert await s3.get_bytes("k") == b"v"
    finally:
        await s3.close()
