"""A data directory's key: given at format, kept, and never silently replaced."""

from __future__ import annotations

import pytest

from mirrorfuse.wire.auth import KEY_NAME, new_key
from servers.block.store import Store, StoreError
from servers.files import read_key


def test_a_format_gives_a_keyless_server_its_key_and_it_is_kept(tmp_path):
    key = new_key()
    store = Store(tmp_path / "d", 0)
    with pytest.raises(StoreError, match="must give a server without a key"):
        store.format("v", 4, 4096, None)
    store.format("v", 4, 4096, key)
    store.close()
    again = Store(tmp_path / "d", 0)
    assert again.key == key and read_key(tmp_path / "d" / KEY_NAME) == key
    again.close()


def test_a_key_given_with_key_file_is_not_replaced_by_a_format(tmp_path):
    key = new_key()
    store = Store(tmp_path / "d", 0, key=key)
    store.format("v", 4, 4096, key)  # the same key: fine
    with pytest.raises(StoreError, match="started with --key-file"):
        store.format("w", 4, 4096, new_key())
    assert store.key == key
    store.close()
    with pytest.raises(StoreError, match="holds another key"):
        Store(tmp_path / "d", 0, key=new_key())


def test_a_formatted_directory_without_a_key_says_what_to_do(tmp_path):
    store = Store(tmp_path / "d", 0)
    store.format("v", 4, 4096, new_key())
    store.close()
    (tmp_path / "d" / KEY_NAME).unlink()
    with pytest.raises(StoreError, match="copy the volume's key there, or start the server"):
        Store(tmp_path / "d", 0)
    given = new_key()  # an older directory takes the key it is started with
    store = Store(tmp_path / "d", 0, key=given)
    assert read_key(tmp_path / "d" / KEY_NAME) == given
    store.close()
