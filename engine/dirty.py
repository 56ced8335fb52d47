"""Where the RAM client takes each round's dirty pages from: a dirty source.

::

    DirtySource.take(block)   get-and-clear: the pages written since the last take,
                              their marks cleared (exactly those), sorted page indices;
                              only after it returns does the caller read those pages
    DirtySource.count(block)  a peek: how many are dirty now (nothing cleared, nothing
                              re-armed); auto-converge peeks between collects to
                              measure the guest's dirty rate (engine/converge.py)

    BlockDirtyMaps            the default: each block's own DirtyMap (engine/shm.py),
                              the byte map a synthetic guest marks after each write
    a VMM's own source        e.g. clients/kvm KvmMachine: the hypervisor's dirty
                              log merged with the VMM's own marks

Both keep one order (read the log, clear what was read, then read the
pages), so no write is lost: one that lands after the clear is marked again and
taken next round.  A source is called from the thread that runs the migration,
in the VMM's process (a hypervisor's log is readable only there), one call at a
time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np

from engine.errors import GuestControlError
from engine.shm import RamBlock

__all__ = ["BlockDirtyMaps", "DirtySource", "VmmDirtySource", "drop_marks"]

T = TypeVar("T")


@runtime_checkable
class DirtySource(Protocol):
    """Dirty pages of guest RAM blocks, taken with the get-and-clear rule."""

    def take(self, block: RamBlock) -> np.ndarray:
        """The pages of `block` written since the last take (sorted, unique,
        int64 indices in the block), with exactly their marks cleared."""
        ...

    def count(self, block: RamBlock) -> int:
        """How many pages of `block` are dirty now (a peek: nothing is cleared)."""
        ...


def drop_marks(source: DirtySource, block: RamBlock) -> None:
    """Clear `block`'s marks in `source` when nobody reads the pages (round 1): its
    own ``drop`` where it has one (no page list made), else a take."""
    getattr(source, "drop", source.take)(block)


class BlockDirtyMaps:
    """The default source: each block's own byte map (:class:`engine.shm.DirtyMap`).

    Besides the interface, :meth:`drop`: what a take does, without listing the
    pages (round 1 sends them all anyway).  A source without ``drop`` is taken.
    """

    def take(self, block: RamBlock) -> np.ndarray:
        return block.dirty.take()

    def drop(self, block: RamBlock) -> None:
        """Clear every mark of `block` (a take whose pages nobody reads)."""
        block.dirty.clear_all()

    def count(self, block: RamBlock) -> int:
        return block.dirty.count()


class VmmDirtySource:
    """A VMM's dirty source as the engine calls it: whatever it raises is a
    GuestControlError naming the call (the guest still runs: the operation fails
    before its pause, or resumes it)."""

    def __init__(self, source: DirtySource) -> None:
        self._source = source

    def take(self, block: RamBlock) -> np.ndarray:
        return self._call("take", self._source.take, block)

    def drop(self, block: RamBlock) -> None:
        self._call("drop" if hasattr(self._source, "drop") else "take", drop_marks, self._source, block)

    def count(self, block: RamBlock) -> int:
        return self._call("count", self._source.count, block)

    @staticmethod
    def _call(name: str, call: Callable[..., T], *args: object) -> T:
        try:
            return call(*args)
        except Exception as exc:
            raise GuestControlError(f"dirty_source.{name}() raised {type(exc).__name__}: {exc}") from exc
