"""Block numbers: lowest free first, only on pairs that take writes, any when none does."""

from __future__ import annotations

import errno

import pytest

from mirrorfuse.fs.base import FsError
from mirrorfuse.fs.cache import Allocator


def test_lowest_free_first_then_new_ones():
    a = Allocator([0, 1, 3, 5], limit=100)
    assert a.alloc(3) == [2, 4, 6]
    a.release([1])
    assert a.alloc(2) == [1, 7]


def test_blocks_of_a_pair_out_of_reach_are_skipped_and_kept_free():
    a = Allocator([], limit=100)
    on_pair_1 = lambda b: b % 2 == 1  # noqa: E731 - pair 0 is lost
    assert a.alloc(3, on_pair_1, period=2) == [1, 3, 5]
    assert a.alloc(2) == [0, 2]  # pair 0 back: its blocks were left free


def test_when_no_pair_takes_writes_any_block_will_do():
    a = Allocator([], limit=100)
    assert a.alloc(2, lambda b: False, period=2) == [0, 1]


def test_full_is_enospc():
    a = Allocator(range(4), limit=4)
    with pytest.raises(FsError) as err:
        a.alloc(1)
    assert err.value.errno == errno.ENOSPC
