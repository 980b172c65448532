"""The key handshake and datagram seals, without sockets."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirrorfuse.wire import auth
from mirrorfuse.wire.auth import AuthError, ClientHandshake, KeyFileError, ServerHandshake
from servers.files import read_key, write_key

VOLUME = "0b5e9a0e-8a3c-4a55-9a53-2f1b1f4f7d11"


def run(server: ServerHandshake, client: ClientHandshake) -> None:
    reply = server.receive(client.hello())
    proof = client.receive(reply)
    assert server.receive(proof) == b""


def test_both_sides_with_the_key_agree_and_learn_the_volume() -> None:
    key = auth.new_key()
    server = ServerHandshake(key, VOLUME)
    client = ClientHandshake(lambda v: key if v == VOLUME else None)
    run(server, client)
    assert server.done and server.authenticated
    assert client.done and client.keyed and client.volume == VOLUME


def test_a_client_with_another_key_is_refused_by_the_server() -> None:
    server = ServerHandshake(auth.new_key(), VOLUME)
    forger = ClientHandshake(lambda v: auth.new_key())
    reply = server.receive(forger.hello())
    # the forger cannot check the server's proof either: it stops there
    with pytest.raises(AuthError, match="wrong key"):
        forger.receive(reply)
    with pytest.raises(AuthError, match="did not prove"):
        server.receive(os.urandom(auth.PROOF_SIZE))
    assert not server.done


def test_a_server_without_the_key_cannot_pass_for_one() -> None:
    key = auth.new_key()
    impostor = ServerHandshake(auth.new_key(), VOLUME)
    client = ClientHandshake(lambda v: key)
    with pytest.raises(AuthError, match="did not prove the key"):
        client.receive(impostor.receive(client.hello()))


def test_a_proof_is_good_for_one_connection_only() -> None:
    key = auth.new_key()
    first = ServerHandshake(key, VOLUME)
    client = ClientHandshake(lambda v: key)
    reply = first.receive(client.hello())
    proof = client.receive(reply)
    second = ServerHandshake(key, VOLUME)  # a fresh server nonce
    second.receive(client.hello())
    with pytest.raises(AuthError):
        second.receive(proof)


def test_the_binding_is_part_of_both_proofs() -> None:
    key = auth.new_key()
    server = ServerHandshake(key, VOLUME, binding=b"A" * 32)
    client = ClientHandshake(lambda v: key, binding=b"B" * 32)
    with pytest.raises(AuthError):
        client.receive(server.receive(client.hello()))


def test_a_client_without_a_key_for_the_volume_says_so() -> None:
    server = ServerHandshake(auth.new_key(), VOLUME)
    client = ClientHandshake(lambda v: None)
    with pytest.raises(AuthError, match=f"volume {VOLUME}, and there is no key"):
        client.receive(server.receive(client.hello()))


def test_a_keyless_server_is_seen_as_such() -> None:
    server = ServerHandshake(None, None)
    client = ClientHandshake(lambda v: pytest.fail("no key is needed"))
    run(server, client)
    assert server.done and not server.authenticated
    assert not client.keyed and client.volume is None


def test_a_frame_instead_of_a_hello_is_refused() -> None:
    server = ServerHandshake(auth.new_key(), VOLUME)
    with pytest.raises(AuthError, match="no key handshake"):
        server.receive(b"MF\x02" + bytes(auth.HELLO_SIZE))


def test_bytes_arriving_one_at_a_time() -> None:
    key = auth.new_key()
    server = ServerHandshake(key, VOLUME)
    client = ClientHandshake(lambda v: key)
    reply = b""
    hello = client.hello()
    for i in range(len(hello)):
        assert server.wanted == len(hello) - i
        reply += server.receive(hello[i : i + 1])
    proof = b""
    for i in range(len(reply)):
        proof += client.receive(reply[i : i + 1])
    for i in range(len(proof)):
        server.receive(proof[i : i + 1])
    assert server.done and server.wanted == 0


@given(st.binary(max_size=200))
def test_garbage_never_authenticates(data: bytes) -> None:
    server = ServerHandshake(auth.new_key(), VOLUME)
    try:
        server.receive(data)
        server.receive(bytes(auth.PROOF_SIZE))
    except AuthError:
        return
    assert not server.done


def test_key_files_round_trip_with_mode_0600(tmp_path) -> None:
    key = auth.new_key()
    path = tmp_path / "keys" / "v.key"
    write_key(path, key)
    assert read_key(path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(path.parent.iterdir()) == [path]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"zz\n", "not a mirrorfs key"), (b"abcd\n", "holds 2 bytes"), (None, "does not exist")],
)
def test_bad_key_files_say_what_is_wrong(tmp_path, content, message) -> None:
    path = tmp_path / "k"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(KeyFileError, match=message):
        read_key(path)


def test_seals() -> None:
    key = auth.new_key()
    sealed = auth.seal(key, b"order 7")
    assert auth.unseal(key, sealed) == b"order 7"
    assert auth.unseal(auth.new_key(), sealed) is None
    assert auth.unseal(key, sealed[:-1] + bytes([sealed[-1] ^ 1])) is None
    assert auth.unseal(key, b"short") is None
