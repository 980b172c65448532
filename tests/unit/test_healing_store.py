"""A block server's part in healing, on its store alone: what it notes for its mirror's
heal, and which copies it refuses."""

from __future__ import annotations

import pytest

from mirrorfuse.wire.auth import new_key
from mirrorfuse.wire.frames import Flag
from mirrorfuse.wire.messages import State, Table
from servers.block.healing import NotHealing
from servers.block.store import Store

KEY = new_key()

A, F = State.ALIVE, State.FAILED


def store_at(tmp_path, states=(A, A, A, A)) -> Store:
    st = Store(tmp_path / "d", 0)
    st.format("v", 4, 4096, KEY)
    st.set_table(Table(gen=5, states=states, idents=("",) * 4, since=(0,) * 4))
    return st


def test_a_change_is_noted_when_the_writer_says_the_mirror_is_out(tmp_path):
    st = store_at(tmp_path)  # its own table still counts the mirror alive
    st.write(1, b"a", 0, Flag(0))
    assert st.dirty is not None and st.dirty.slots == set()
    st.write(2, b"b", 0, Flag.DEGRADED)
    st.trim(3, Flag.DEGRADED)
    assert st.dirty.slots == {2, 3}
    st.close()
    again = Store(tmp_path / "d", 0)  # noted on disk: kept across a restart
    assert again.dirty is not None and again.dirty.slots == {2, 3}
    again.close()


def test_a_change_is_noted_when_its_own_table_says_the_mirror_is_out(tmp_path):
    st = store_at(tmp_path, (A, F, A, A))
    st.write(4, b"a", 0, Flag(0))
    assert st.dirty is not None and st.dirty.slots == {4}
    st.set_table(Table(gen=6, states=(A, A, A, A), idents=("",) * 4, since=(0,) * 4))
    assert st.dirty.slots == set()  # the mirror is whole again
    st.close()


def test_copies_are_refused_unless_a_heal_is_under_way_and_lose_to_newer_writes(tmp_path):
    st = store_at(tmp_path)
    with pytest.raises(NotHealing):  # it restarted since its heal began: it forgot
        st.write(1, b"old", 0, Flag.COPY)
    with pytest.raises(NotHealing):
        st.trim(1, Flag.COPY)
    st.begin_heal("h", 10)
    st.write(1, b"new", 7, Flag(0))
    assert st.write(1, b"old", 9, Flag.COPY) is False  # the user's write stays
    assert st.read(1) == (b"new", 7)
    assert st.write(2, b"copied", 3, Flag.COPY) is True
    st.close()
