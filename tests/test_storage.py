"""alignlab.storage against the local filesystem and a real SeaweedFS S3 server (tests/s3_server.py)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

import alignlab.storage as storage
from alignlab.storage.base import MiB, RetryPolicy, call_with_retries
from alignlab.storage.local import write_atomically
from s3_server import s3_env, s3_server  # noqa: F401  (pytest fixtures)


class FailingStream(io.RawIOBase):
    """Yields `fail_after` bytes of a repeating pattern, then raises as a dying writer would."""

    def __init__(self, fail_after: int):
        self.fail_after, self.sent = fail_after, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.sent >= self.fail_after:
            raise RuntimeError("source disk vanished")
        n = min(len(buffer), self.fail_after - self.sent)
        buffer[:n] = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
        self.sent += n
        return n


@pytest.fixture
def bucket(s3_env):
    return s3_env.make_bucket(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A store root on each backend; the S3 fixtures are only started for the s3 case."""
    if request.param == "local":
        return str(tmp_path / "root")
    return f"s3://{request.getfixturevalue('bucket')}/root"


def test_round_trip_bytes_files_listing_exists(root, tmp_path):
    store = storage.open_store(root)
    store.write_bytes("a/one.bin", b"first")
    storage.write_bytes(f"{root}/a/two.txt", b"second")
    store.write_bytes("b/c/three.json", b"{}")
    assert store.read_bytes("a/one.bin") == b"first"
    assert storage.read_bytes(f"{root}/a/two.txt") == b"second"
    assert storage.exists(f"{root}/a/one.bin") and not storage.exists(f"{root}/a/missing.bin")
    assert store.list() == ["a/one.bin", "a/two.txt", "b/c/three.json"]
    assert storage.list_prefix(f"{root}/a") == [f"{root}/a/one.bin", f"{root}/a/two.txt"]

    store.write_bytes("a/one.bin", b"overwritten")
    assert store.read_bytes("a/one.bin") == b"overwritten"

    payload = os.urandom(300_000)
    (tmp_path / "up.bin").write_bytes(payload)
    storage.upload_file(tmp_path / "up.bin", f"{root}/files/up.bin")
    storage.download_file(f"{root}/files/up.bin", tmp_path / "down" / "copy.bin")
    assert (tmp_path / "down" / "copy.bin").read_bytes() == payload
    with storage.open_read(f"{root}/files/up.bin") as stream:
        assert stream.read(10) == payload[:10] and stream.read() == payload[10:]

    store.delete("b/c/three.json")
    store.delete("b/c/three.json")  # idempotent on both backends
    assert not store.exists("b/c/three.json")
    assert "b/c/three.json" not in store.list()


def test_bad_keys_and_schemes_are_rejected(tmp_path):
    store = storage.open_store(tmp_path)
    for key in ["../escape", "/abs", "a//b", "", "a/./b"]:
        with pytest.raises(ValueError, match="invalid storage key"):
            store.write_bytes(key, b"x")
    with pytest.raises(ValueError, match="unsupported storage URI 'gs://b/k'"):
        storage.read_bytes("gs://b/k")
    with pytest.raises(ValueError, match="names a bucket, not an object"):
        storage.read_bytes("s3://bucket")
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        storage.list_prefix(tmp_path / "no-such-folder")


def test_local_write_failing_midway_leaves_old_file_and_no_partial(tmp_path):
    target = tmp_path / "ckpt" / "model.bin"
    storage.write_bytes(target, b"old complete checkpoint")
    store = storage.open_store(tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="source disk vanished"):
        store.write_stream("model.bin", FailingStream(3 * MiB))
    with pytest.raises(RuntimeError, match="source disk vanished"):
        store.write_stream("new.bin", FailingStream(MiB))
    assert target.read_bytes() == b"old complete checkpoint"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.bin"]

    def chunks():
        yield b"half of it"
        raise KeyboardInterrupt  # even a BaseException must not leave the temporary file behind
    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, chunks())
    assert target.read_bytes() == b"old complete checkpoint"
    assert os.listdir(target.parent) == ["model.bin"]


def test_local_listing_skips_leftovers_of_killed_writers(tmp_path):
    (tmp_path / ".shard.tar.partial-0123abcd").write_bytes(b"half")
    (tmp_path / "shard.tar").write_bytes(b"full")
    assert storage.open_store(tmp_path).list() == ["shard.tar"]


def test_s3_multipart_upload_failing_midway_leaves_key_untouched(s3_env, bucket):
    store = storage.open_store(f"s3://{bucket}", part_size=5 * MiB)
    store.write_bytes("shard.tar", b"previous complete shard")
    stream = FailingStream(12 * MiB)
    with pytest.raises(RuntimeError, match="source disk vanished"):
        store.write_stream("shard.tar", stream)
    with pytest.raises(RuntimeError, match="source disk vanished"):
        store.write_stream("fresh.tar", FailingStream(12 * MiB))
    assert stream.sent == 12 * MiB  # two 5 MiB parts went out before the failure: it was a multipart upload
    assert store.read_bytes("shard.tar") == b"previous complete shard"
    assert not store.exists("fresh.tar")
    assert store.list() == ["shard.tar"]
    # And the same stream, when it does not fail, becomes one complete object.
    store.write_stream("whole.bin", io.BytesIO(bytes(range(256)) * (11 * MiB // 256)))
    assert hashlib.sha256(store.read_bytes("whole.bin")).digest() == hashlib.sha256(
        bytes(range(256)) * (11 * MiB // 256)).digest()


_STALLING_WRITER = """
import sys, time, io
from alignlab.storage import open_store
class Stalling(io.RawIOBase):
    sent = 0
    def readable(self): return True
    def readinto(self, buffer):
        if self.sent >= 12 * 2**20:
            print("STALLED", flush=True); time.sleep(120)
        n = min(len(buffer), 12 * 2**20 - self.sent); buffer[:n] = b"z" * n; self.sent += n; return n
open_store(sys.argv[1], part_size=5 * 2**20).write_stream("killed.bin", Stalling())
"""


def test_s3_upload_killed_midway_leaves_no_object(s3_env, bucket):
    """SIGKILL gives minio no chance to abort: the parts stay on the server, yet the key does not exist."""
    child = subprocess.Popen([sys.executable, "-c", _STALLING_WRITER, f"s3://{bucket}"], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"STALLED\n"
        client = s3_env.client()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            uploads = [u for u in client._list_multipart_uploads(bucket).uploads if u.object_name == "killed.bin"]
            if uploads and len(client._list_parts(bucket, "killed.bin", uploads[0].upload_id).parts) >= 2:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the child never had two parts uploaded")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    store = storage.open_store(f"s3://{bucket}")
    assert not store.exists("killed.bin")
    assert store.list() == []
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/killed.bin does not exist"):
        store.read_bytes("killed.bin")


def _s3_error(status: int, code: str):
    from minio.error import S3Error
    from urllib3 import HTTPResponse

    return S3Error(HTTPResponse(status=status), code, "msg", "/b/k", "req", "host", "b", "k")


def _minio_error(name: str, *args):
    import minio.error

    return getattr(minio.error, name)(*args)


@pytest.mark.parametrize("make_error, transient", [
    (lambda: ConnectionResetError("reset by peer"), True),
    (lambda: TimeoutError("read timed out"), True),
    (lambda: _s3_error(503, "SlowDown"), True),
    (lambda: _s3_error(500, "InternalError"), True),
    (lambda: _s3_error(429, "TooManyRequests"), True),
    (lambda: _s3_error(404, "NoSuchKey"), False),
    (lambda: _s3_error(403, "AccessDenied"), False),
    (lambda: _s3_error(400, "InvalidArgument"), False),
    (lambda: ValueError("bad argument"), False),
    (lambda: _minio_error("ServerError", "server failed", 502), True),
    (lambda: _minio_error("InvalidResponseError", 503, "text/html", "<html>busy</html>"), True),
    (lambda: _minio_error("InvalidResponseError", 400, "text/html", "<html>bad</html>"), False),
])
def test_retry_loop_retries_only_transient_errors(make_error, transient):
    pytest.importorskip("minio")
    from alignlab.storage.s3 import is_transient

    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise make_error()
        return "done"

    policy = RetryPolicy(attempts=5, base_delay=0.5, max_delay=1.5)
    upper = lambda low, high: high  # noqa: E731  (the jitter draw at its maximum)
    if transient:
        assert call_with_retries(flaky, "op", is_transient, policy, sleeps.append, upper) == "done"
        assert len(calls) == 3 and sleeps == [0.5, 1.0]
    else:
        with pytest.raises(type(make_error())):
            call_with_retries(flaky, "op", is_transient, policy, sleeps.append, upper)
        assert len(calls) == 1 and sleeps == []


def test_retry_gives_up_after_configured_attempts_with_capped_jittered_delays():
    sleeps, calls = [], []

    def always_down():
        calls.append(1)
        raise ConnectionRefusedError("down")

    policy = RetryPolicy(attempts=6, base_delay=0.1, max_delay=0.5)
    draws = iter([0.3, 0.9, 0.0, 0.5, 1.0])
    jitter = lambda low, high: low + next(draws) * (high - low)  # noqa: E731
    with pytest.raises(ConnectionRefusedError):
        call_with_retries(always_down, "op", lambda exc: True, policy, sleeps.append, jitter)
    caps = [0.1, 0.2, 0.4, 0.5, 0.5]  # min(max_delay, base * 2**(n-1))
    assert len(calls) == 6
    assert sleeps == pytest.approx([d * c for d, c in zip([0.3, 0.9, 0.0, 0.5, 1.0], caps)])
    with pytest.raises(ValueError, match=r"attempts\n  Input should be greater than or equal to 1"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="base_delay <= max_delay"):
        RetryPolicy(base_delay=2.0, max_delay=1.0)


def test_unreachable_endpoint_is_retried_then_named(monkeypatch, caplog):
    pytest.importorskip("minio")
    from alignlab.storage.s3 import S3Store, settings_from_env

    import socket
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKIDLEAKCHECK",
           "AWS_SECRET_ACCESS_KEY": "very-secret-value"}
    store = S3Store(settings_from_env(env), "data", retry=RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(OSError, match=r"read s3://data/x.bin failed after 3 attempt\(s\)"):
        store.read_bytes("x.bin")
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and all("s3://data/x.bin" in r.getMessage() for r in retries)
    assert "very-secret-value" not in caplog.text and "AKIDLEAKCHECK" not in caplog.text


def test_manifest_detects_a_corrupted_object(root):
    store = storage.open_store(root)
    contents = {"train/shard-000000.tar": os.urandom(5000), "train/shard-000001.tar": b"b" * 100,
                "meta.json": b'{"n": 2}'}
    for key, data in contents.items():
        store.write_bytes(key, data)
    recorded = storage.write_manifest(root, contents)
    assert recorded == {key: hashlib.sha256(data).hexdigest() for key, data in contents.items()}
    assert storage.verify_manifest(root) == recorded
    assert storage.load_manifest(root) == recorded

    store.write_bytes("train/shard-000001.tar", b"b" * 99 + b"X")  # one flipped byte
    with pytest.raises(storage.ChecksumMismatchError) as caught:
        storage.verify_manifest(root)
    bad_uri = store.uri("train/shard-000001.tar")
    assert list(caught.value.mismatches) == [bad_uri]
    assert bad_uri in str(caught.value) and recorded["train/shard-000001.tar"] in str(caught.value)
    with pytest.raises(storage.ChecksumMismatchError, match=bad_uri):
        storage.read_bytes(bad_uri, expected_sha256=recorded["train/shard-000001.tar"])
    assert storage.read_bytes(store.uri("meta.json"), expected_sha256=recorded["meta.json"]) == b'{"n": 2}'

    store.delete("meta.json")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        storage.verify_manifest(root)
    store.write_bytes("broken.json", b'{"files": ["not", "a", "mapping"]}')
    with pytest.raises(ValueError, match="is not a checksum manifest"):
        storage.load_manifest(root, name="broken.json")


def test_credentials_only_from_env_and_never_leaked(s3_env, bucket, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    secrets = [s3_env.access_key, s3_env.secret_key]
    store = storage.open_store(f"s3://{bucket}/run")
    store.write_bytes("a.txt", b"a")
    with pytest.raises(FileNotFoundError) as missing:
        store.read_bytes("nope.txt")
    shown = [repr(store), str(store), repr(store.settings), str(missing.value), storage.url_for_webdataset(
        f"s3://{bucket}/run/a.txt")]
    assert "S3Store(root='s3://" in repr(store) and s3_env.endpoint in repr(store)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_env.secret_key)
    with pytest.raises(PermissionError, match=f"s3://{bucket}/run/a.txt") as denied:
        storage.read_bytes(f"s3://{bucket}/run/a.txt")
    assert "AWS_SECRET_ACCESS_KEY" in str(denied.value)
    shown.append(str(denied.value))
    for secret in secrets:
        assert secret not in caplog.text
        assert all(secret not in text for text in shown)

    # MINIO_* names work as well, S3_ENDPOINT_URL too.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("MINIO_ACCESS_KEY", s3_env.access_key)
    monkeypatch.setenv("MINIO_SECRET_KEY", s3_env.secret_key)
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_env.endpoint)
    assert storage.read_bytes(f"s3://{bucket}/run/a.txt") == b"a"


def test_missing_credentials_and_bad_endpoint_are_clear(monkeypatch):
    pytest.importorskip("minio")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError) as caught:
        storage.open_store("s3://bucket/x")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"):
        assert name in str(caught.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    with pytest.raises(ValueError, match="secret key missing"):
        storage.open_store("s3://bucket/x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:8333")
    with pytest.raises(ValueError, match="must look like http://host:port"):
        storage.open_store("s3://bucket/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    with pytest.raises(ValueError, match="invalid bucket name 'B_x'"):
        storage.open_store("s3://B_x/y")


def test_missing_bucket_or_key_names_the_uri(s3_env, bucket, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/no/such.key does not exist"):
        storage.read_bytes(f"s3://{bucket}/no/such.key")
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/no/such.key does not exist"):
        storage.download_file(f"s3://{bucket}/no/such.key", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/no/such.key does not exist"):
        storage.open_read(f"s3://{bucket}/no/such.key")
    for call in (lambda: storage.read_bytes("s3://no-such-bucket-x/k"),
                 lambda: storage.exists("s3://no-such-bucket-x/k"),
                 lambda: storage.list_prefix("s3://no-such-bucket-x/p"),
                 lambda: storage.write_bytes("s3://no-such-bucket-x/k", b"x")):
        with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket-x' does not exist"):
            call()
    with pytest.raises(FileNotFoundError, match="cannot upload"):
        storage.upload_file(tmp_path / "absent.bin", f"s3://{bucket}/k")


def _write_shard(path: Path, start: int, count: int) -> dict[str, bytes]:
    import webdataset as wds

    samples = {f"{i:06d}": f"caption number {i}".encode() for i in range(start, start + count)}
    with wds.TarWriter(str(path)) as sink:
        for key, caption in samples.items():
            sink.write({"__key__": key, "txt": caption, "cls": str(int(key) % 3).encode()})
    return samples


def test_webdataset_streams_shards_from_s3(s3_env, bucket, tmp_path, capfd):
    import webdataset as wds

    expected = {}
    for shard in range(2):
        local = tmp_path / f"shard-{shard:06d}.tar"
        expected |= _write_shard(local, shard * 5, 5)
        storage.upload_file(local, f"s3://{bucket}/train/{local.name}")

    url = storage.url_for_webdataset(f"s3://{bucket}/train/shard-{{000000..000001}}.tar")
    assert url.startswith("pipe:") and storage.url_for_webdataset(tmp_path / "a.tar") == str(tmp_path / "a.tar")
    dataset = wds.WebDataset(url, shardshuffle=False, empty_check=False).to_tuple("__key__", "txt", "cls")
    seen = {key: (caption, cls) for key, caption, cls in dataset}
    assert {k: v[0] for k, v in seen.items()} == expected
    assert all(cls == str(int(k) % 3).encode() for k, (_, cls) in seen.items())

    with storage.open_read(f"s3://{bucket}/train/shard-000001.tar") as stream:
        names = [member.name for member in tarfile.open(fileobj=stream, mode="r|")]
    assert names[:2] == ["000005.txt", "000005.cls"] or names[:2] == ["000005.cls", "000005.txt"]

    missing = wds.WebDataset(storage.url_for_webdataset(f"s3://{bucket}/train/shard-000009.tar"),
                             shardshuffle=False, empty_check=False)
    # Depending on whether the child has exited when the stream ends, webdataset reports its exit status
    # or an empty tar; either way the child's stderr says why, naming the object.
    with pytest.raises((OSError, tarfile.ReadError), match="exit 1|empty file"):
        list(missing)
    assert f"s3://{bucket}/train/shard-000009.tar does not exist" in capfd.readouterr().err
