"""Secret files reloaded under a running server (loopback, port 0): broken, missing, blocking (FIFO) or
symlinked TLS and tokens files keep what was loaded; rotations reach new connections and never open streams;
tokens removed or rewritten in place are refused; thousands of rewrites under load fail no call; the file
watcher lives and dies with its server."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from replica_helpers import accepted, health

from cellserve.client import TLS, ChannelConfig, Client, UnavailableError
from cellserve.server.security import AcceptedTokens
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc


def test_broken_or_missing_tls_files_keep_the_old_pair_and_open_streams_go_on(running_server, pki, tmp_path, caplog):
    f = pki.write(tmp_path)
    settings = {"tls_cert_file": f["server_cert"], "tls_key_file": f["server_key"], "tls_client_ca_file": f["ca"]}
    good = TLS(pki.ca.pem, pki.client.cert, pki.client.key)  # bytes: the CA file is broken below
    with running_server(**settings) as srv, Client(f"localhost:{srv.server.port}", ChannelConfig(tls=good)) as client:
        target = f"localhost:{srv.server.port}"
        tokens = np.arange(20, dtype=np.int64) * 7 % 256
        ys = []
        with client.session("tiny") as s:
            ys.append(s.step(tokens[:2]))
            breakages = [
                lambda: f["server_cert"].unlink(),
                lambda: f["server_cert"].write_bytes(b"garbage"),
                lambda: f["server_cert"].write_bytes(b""),
                lambda: (f["server_cert"].write_bytes(pki.server.cert), f["ca"].write_bytes(b"")),
                lambda: f["ca"].write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
                lambda: f["ca"].unlink(),
                lambda: (f["ca"].write_bytes(pki.ca.pem), f["server_key"].unlink(), f["server_key"].mkdir()),
            ]
            for i, breakage in enumerate(breakages):
                caplog.clear()
                breakage()
                srv.server.tls.poll()  # the watcher thread's check, without waiting for it
                assert health(target, good) == "SERVING"  # new connections: the old pair still
                assert "keeping the previous ones" in caplog.text
                ys.append(s.step(tokens[2 + 2 * i : 4 + 2 * i]))  # the open stream goes on
            assert srv.server.tls.reloads == 0
            f["server_key"].rmdir()
            f["server_key"].write_bytes(pki.server.key)  # a good file later is picked up
            srv.server.tls.poll()
            assert health(target, good) == "SERVING"
            assert srv.server.tls.reloads == 1
            ys.append(s.step(tokens[16:]))
        np.testing.assert_array_equal(np.concatenate(ys).shape, (20, 256))


def test_rotating_to_another_ca_moves_new_connections_and_keeps_open_streams(
    running_server, pki, tmp_path, tiny_oracle
):
    f = pki.write(tmp_path)
    settings = {"tls_cert_file": f["server_cert"], "tls_key_file": f["server_key"], "tls_client_ca_file": f["ca"]}
    old = TLS(f["ca"], pki.client.cert, pki.client.key)
    tokens = np.arange(12, dtype=np.int64)
    with running_server(**settings) as srv, Client(f"localhost:{srv.server.port}", ChannelConfig(tls=old)) as client:
        target = f"localhost:{srv.server.port}"
        with client.session("tiny") as s:
            ys = [s.step(tokens[:6])]
            server = pki.other_ca.issue("localhost")
            f["server_key"].write_bytes(server.key)
            f["server_cert"].write_bytes(server.cert)
            f["ca"].write_bytes(pki.other_ca.pem)
            srv.server.tls.poll()
            new = TLS(pki.other_ca.pem, pki.other_client.cert, pki.other_client.key)
            assert health(target, new) == "SERVING"
            with pytest.raises(UnavailableError):
                health(target, old)
            ys.append(s.step(tokens[6:]))  # the stream opened under the old pair is untouched
        np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens), atol=1e-5, rtol=0)


def test_tls_rotated_50_times_while_sessions_open_and_close(running_server, pki, tmp_path) -> None:
    f = pki.write(tmp_path)
    with running_server(tls_cert_file=f["server_cert"], tls_key_file=f["server_key"]) as srv:
        config = ChannelConfig(tls=TLS(pki.ca.pem))
        stop, errors, done = threading.Event(), [], [0]

        def sessions() -> None:
            while not stop.is_set():
                try:
                    with Client(f"localhost:{srv.server.port}", config, timeout_s=10) as c, c.session("tiny") as s:
                        assert s.step([1, 2]).shape == (2, 256)
                        done[0] += 1
                except Exception as e:  # reported by the assertion below
                    errors.append(repr(e))

        threads = [threading.Thread(target=sessions) for _ in range(3)]
        for t in threads:
            t.start()
        for _ in range(50):
            leaf = pki.ca.issue("localhost")
            f["server_cert"].write_bytes(leaf.cert)
            f["server_key"].write_bytes(leaf.key)
            srv.server.tls.poll()
        stop.set()
        for t in threads:
            t.join(30)
        assert not errors and done[0] > 0
        assert srv.server.tls.reloads == 50


def test_tokens_removed_from_the_file_are_refused_by_a_running_server(wait_until, running_server, tmp_path: Path):
    path = tmp_path / "tokens"
    path.write_text("leaked-token\n")
    with (
        running_server(auth_tokens="ops-secret", auth_tokens_file=path) as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        stub = pb_grpc.CellServeStub(ch)
        assert accepted(stub, "leaked-token")
        path.write_text("")
        wait_until(lambda: not accepted(stub, "leaked-token"))  # the watcher re-reads the file within a second
        assert accepted(stub, "ops-secret")


def test_a_token_rewritten_in_place_to_one_of_the_same_size_is_revoked(tmp_path):
    """ctime changes with any write, even when the mtime is put back (cp --preserve)."""
    path = tmp_path / "tokens"
    path.write_text("tok-aaaa\n")
    tokens = AcceptedTokens(None, path)
    before = os.stat(path)
    path.write_text("tok-bbbb\n")  # same size, same inode
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    tokens.poll()
    assert not tokens.accepts(b"tok-aaaa"), "a revoked token is still accepted after the watcher's poll"
    assert tokens.accepts(b"tok-bbbb")


def test_a_tokens_file_replaced_by_a_symlink_to_a_directory_keeps_its_tokens(running_server, tmp_path: Path):
    path, elsewhere = tmp_path / "tokens", tmp_path / "a-directory"
    elsewhere.mkdir()
    path.write_text("file-token\n")
    with (
        running_server(auth_tokens="ops", auth_tokens_file=path) as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        stub = pb_grpc.CellServeStub(ch)
        path.unlink()
        path.symlink_to(elsewhere, target_is_directory=True)
        srv.server.auth_tokens.poll()  # the watcher's check, without waiting for it
        assert accepted(stub, "file-token") and accepted(stub, "ops")
        path.unlink()
        path.write_text("next-token\n")
        srv.server.auth_tokens.poll()
        assert accepted(stub, "next-token") and not accepted(stub, "file-token")


def test_thousands_of_tokens_file_rewrites_under_8_clients_never_fail_a_call(running_server, tmp_path: Path):
    path = tmp_path / "tokens"
    path.write_text("tok-0\n")
    with running_server(auth_tokens="ops", auth_tokens_file=path) as srv:
        stop, errors = threading.Event(), []
        calls = [0] * 8

        def call(k: int) -> None:
            with grpc.insecure_channel(srv.address) as ch:
                stub = pb_grpc.CellServeStub(ch)
                while not stop.is_set():
                    try:
                        stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", "Bearer ops"),), timeout=10)
                        calls[k] += 1
                    except grpc.RpcError as e:
                        errors.append(e.code())

        threads = [threading.Thread(target=call, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for i in range(1, 1501):
            if i % 2:  # in place
                path.write_text(f"tok-{i}\n")
            else:  # atomic replace
                tmp = tmp_path / "tokens.tmp"
                tmp.write_text(f"tok-{i}\n")
                tmp.replace(path)
            if i % 100 == 0:
                srv.server.auth_tokens.poll()  # the watcher runs too: both read concurrently
        stop.set()
        for t in threads:
            t.join(30)
        srv.server.auth_tokens.poll()
        assert not errors and all(calls)
        assert srv.server.auth_tokens.accepts(b"tok-1500") and not srv.server.auth_tokens.accepts(b"tok-1499")


def test_secret_files_that_would_block_are_never_read(running_server, pki, tmp_path):
    """A FIFO (like a hung secrets mount) in place of the key or tokens file: the check skips it, serving goes on."""
    f = pki.write(tmp_path)
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("tok\n")
    settings = {"tls_cert_file": f["server_cert"], "tls_key_file": f["server_key"], "auth_tokens_file": tokens_file}
    with running_server(**settings) as srv:
        for path in (f["server_key"], tokens_file):
            path.unlink()
            os.mkfifo(path)
        srv.server.tls.poll()
        srv.server.auth_tokens.poll()
        config = ChannelConfig(tls=TLS(pki.ca.pem), bearer_token="tok")
        with Client(f"localhost:{srv.server.port}", config, timeout_s=10) as client:
            assert [m.name for m in client.list_models()] == ["tiny"]


def test_the_file_watcher_stops_with_its_server_and_a_new_server_in_the_same_process_watches(
    wait_until, running_server, tmp_path: Path
) -> None:
    def watchers() -> int:
        return sum(t.name == "cellserve-secret-files" and t.is_alive() for t in threading.enumerate())

    path = tmp_path / "tokens"
    path.write_text("first\n")
    before = watchers()
    with running_server(auth_tokens_file=path):
        assert watchers() == before + 1
    assert watchers() == before
    path.write_text("second\n")
    with running_server(auth_tokens_file=path) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.CellServeStub(ch)
        assert accepted(stub, "second") and not accepted(stub, "first")
        path.write_text("third\n")
        wait_until(lambda: not accepted(stub, "second"))  # this server's own watcher saw the change
        assert accepted(stub, "third")

