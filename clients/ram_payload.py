"""RAM pages in the channel processes: the *prepare* op and its inverse.

Source (:class:`RamPagesSender`), per slot (one block, runs of pages)::

    runs ── zero-page detection (numpy, per page) ──▶ runs with ZERO flags
         ── codec none: header + one view of guest RAM per non-zero run
         ── codec X   : header + frames of ≤ 1 MiB of non-zero pages, each
                        compressed from a per-channel scratch copy, or RAW
                        (views of guest RAM) when it would not shrink

Destination (:class:`RamPagesReceiver`), given a header the channel's packet
decoder checked: name the non-zero pages' views of guest RAM, which the channel
fills straight from the socket (RAW), or name each frame's header and then its
pages (RAW frame) or a scratch buffer to decompress into them; then make ZERO
runs zero where the page may hold data.  It does no I/O itself.

The destination's dirty map is its "may hold data" map during an incoming
migration: set where a page was written, cleared where it was zeroed.  The
migration initialises it (all clear for RAM known to be zero, all set otherwise),
so a zero page of a fresh destination costs no write at all.

Snapshots (file channels) use the same prepare step with another send:
:class:`RamPagesFileWriter` runs zero-page detection, records in the present
map which pages the file holds, and places each non-zero run at its fixed
offset in the file; :class:`RamPagesFileReader` reads runs back to their pages.
Both cut runs into pieces at every 1 MiB chunk boundary (a piece lies in one
chunk): the writer checksums a piece's pages (into the shared checksum map) right
before the piece's ``pwritev``, and each chunk the slot touched (zero pages
included; at least a quarter of it, else its word becomes 0, "none") from guest
RAM right after its last piece's page checksums (a chunk the slot found all
zero: the constant word of zeros, nothing read); the reader checks a chunk whose
present pages the slot holds all (and that holds at least half its pages, and
has a word) by its one word once its last piece is read, other pages page by
page, each while the bytes are in cache::

    save     piece of guest RAM ── xxh3-64 per page → page_sums[page] ── pwritev ──▶ file
             (its chunk's last piece: then xxh3-64 of the chunk's RAM → chunk_sums[chunk])
    restore  file ── preadv ──▶ piece of guest RAM ┬ (chunk's last piece) xxh3-64 of the
                                                   │  chunk's RAM == chunk_sums[chunk]?
                                                   └ (else) xxh3-64 per page == page_sums[page]?
             no: SnapshotFormatError (block, page, offset: the page words name it)

Why a chunk word recomputed by whichever channel wrote the chunk's pages last
is right in a live save: docs/snapshot-format.md §8.

Tracked verification (migrations with ``verify``, engine/verify.py): the sender
sends a packet in parts of about 1 MiB (_PART_PAGES) cut at piece boundaries and hashes each part's
pieces from guest RAM right before the part goes; the receiver reads the same
parts and hashes each right after it landed and its ZERO runs are placed.  Both
maps (digests per piece, chunk checksums per chunk) are a ``RegionMap``
(engine/pages.py)::

    source       runs ── parts ── XXH3-128 per piece → digest map ── send part ──▶
    destination  ──▶ recv part into guest RAM ── XXH3-128 per piece → digest map
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import groupby

import numpy as np
import xxhash

from engine import codecs
from engine.errors import SnapshotFormatError
from engine.pages import RegionMap, cut_runs, runs_to_pages, split_runs
from engine.payload import ChannelContext, FileIO, Part
from engine.shm import PAGE_SIZE, RamBlock
from engine.slots import Counter, SendSlot
from engine.transport import Buffer
from engine.wire import packet
from engine.wire import snapshot_format as fmt
from engine.wire.frames import FRAME_BYTES, FRAME_HEADER, decode_frame_header, encode_frame_header
from engine.wire.message import RAM_DIGEST_SIZE

_WORDS_PER_PAGE = PAGE_SIZE // 8
_FEW_RUNS = 32  # up to this many runs, check them slice by slice; beyond, gather
_GATHER_PAGES = 256  # ... 1 MiB of scattered pages at a time, into a reused buffer
# A run's rows left open by their ends are gathered and reduced while they are at
# most 1 in this many; more (zero-rich RAM), the whole run is reduced in place: a
# gather writes what it reads (a 16 MiB run, one page in three holding data:
# 1.5 ms gathered, 0.37 ms in place).
_GATHER_SHARE = 8
_FILE_PIECE_PAGES = fmt.CHUNK_PAGES  # file I/O: ≤ 1 MiB a call, one chunk: checksum and copy share the cache
# Tracked verification: a packet is sent (and received) in parts of about this
# many pages, cut at piece boundaries, each part's pieces hashed right before it
# goes (right after it landed): ~1 MiB, so the hash and the copy share the cache.
_PART_PAGES = 256
# Restore: a chunk with at least this many present pages is checked by its chunk
# word (one hash of its 1 MiB), a sparser one page by page (a hash per page read).
CHUNK_CHECK_MIN_PAGES = fmt.CHUNK_PAGES // 2
# Save: a slot that touches at least this many pages of a chunk hashes the chunk
# (1 MiB hashed for at least 256 KiB moved); one that touches fewer clears its
# word to 0, "check my pages by their page words" (a live round's few scattered
# dirty pages would otherwise cost a MiB of hashing each, in the downtime too).
CHUNK_HASH_MIN_PAGES = fmt.CHUNK_PAGES // 4


def _words(block: RamBlock) -> np.ndarray:
    """The block as (pages, 512) 64-bit words: a zero test is one ``any`` per row."""
    return np.frombuffer(block.pages, dtype=np.uint64).reshape(block.n_pages, _WORDS_PER_PAGE)


def _maybe_zero(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Per page, given its first and last 64-bit words: are both zero?  A page where
    either is not holds data, known from one or two cache lines of its 64: only
    the others need reading whole (QEMU's buffer_is_zero looks at a page's ends
    first too).  Dense RAM then costs its zero scan ~6 instead of ~45 ms per GiB."""
    return np.asarray((first | last) == 0)


def _nonzero(rows: np.ndarray) -> np.ndarray:
    """Per row of 64-bit words: does it hold anything?  Rows :func:`_maybe_zero`
    leaves open are OR-reduced whole (the fastest test numpy has, 25-40 GB/s warm;
    guest RAM mostly comes from DRAM at ~8.6)."""
    open_rows = _maybe_zero(rows[:, 0], rows[:, -1])
    n_open = int(np.count_nonzero(open_rows))
    if n_open * _GATHER_SHARE > len(rows):  # zero-rich RAM: reduce in place, no gather
        return np.asarray(np.bitwise_or.reduce(rows, axis=1) != 0)
    nonzero = ~open_rows
    if n_open:
        nonzero[open_rows] = np.bitwise_or.reduce(rows[open_rows], axis=1) != 0
    return nonzero


# A slot's page runs as arrays: first page, page count, and whether the run is zero.
Runs = tuple[np.ndarray, np.ndarray, np.ndarray]


def gather_scratch() -> np.ndarray:
    """The reused buffer of :func:`_split_zero_runs`: 1 MiB, a page per row of words."""
    return np.empty((_GATHER_PAGES, _WORDS_PER_PAGE), dtype=np.uint64)


def zero_runs(words: np.ndarray, items: np.ndarray) -> list[tuple[int, int, bool]]:
    """Split page runs ``items`` (first, count) into runs of zero / non-zero pages."""
    firsts, counts, zero = _split_zero_runs(words, items, gather_scratch())
    return list(zip(firsts.tolist(), counts.tolist(), zero.tolist()))


def _split_zero_runs(words: np.ndarray, items: np.ndarray, scratch: np.ndarray) -> Runs:
    """:func:`zero_runs` as arrays, for callers that work on whole arrays.

    Few runs are tested slice by slice, in place.  Many (scattered pages) are
    tested by their ends first (:func:`_maybe_zero`); those left open are gathered
    1 MiB at a time into ``scratch`` (from :func:`gather_scratch`) and tested
    there: a packet's pages are never all copied at once (up to 16 MiB).
    """
    firsts, counts = items[:, 0].astype(np.int64), items[:, 1].astype(np.int64)
    if len(items) <= _FEW_RUNS:
        pages = np.concatenate([np.arange(f, f + c) for f, c in zip(firsts, counts)])
        nonzero = np.concatenate([_nonzero(words[f:f + c]) for f, c in zip(firsts, counts)])
    else:
        pages = runs_to_pages(firsts, counts)
        # Only the pages whose ends are zero are gathered and read whole.
        nonzero = ~_maybe_zero(words[pages, 0], words[pages, -1])
        open_at = np.flatnonzero(~nonzero)
        ored = np.empty(_GATHER_PAGES, dtype=np.uint64)
        for at in range(0, open_at.size, _GATHER_PAGES):
            where = open_at[at:at + _GATHER_PAGES]
            chunk = pages[where]
            rows, row_or = scratch[:chunk.size], ored[:chunk.size]
            # mode="clip": the pages are the slot's, inside the block; the default
            # ("raise") would buffer `out`, a second copy.
            np.take(words, chunk, axis=0, out=rows, mode="clip")
            np.bitwise_or.reduce(rows, axis=1, out=row_or)
            nonzero[where] = row_or != 0
    # A run ends where pages stop being contiguous or the zero-ness changes.
    firsts, counts, nonzero = split_runs(pages, nonzero)
    return firsts, counts, ~nonzero


def _slot_runs(blocks: Sequence[RamBlock], words: Sequence[np.ndarray] | None,
               slot: SendSlot, scratch: np.ndarray | None) -> tuple[RamBlock, Runs]:
    """The slot's block, and its page runs split by zero-ness (`words`: per block,
    for detection, with `scratch` from gather_scratch(); None: every run counts as non-zero)."""
    block = blocks[slot.a0]
    items = slot.used_items()
    # Map the pieces the slot's pages lie in before the zero scan reads them (a
    # channel's RAM is attached with populate="read"): not the span between them,
    # which for a final round's scattered pages is most of the block.
    block.prepare_pages_of_runs(items[:, 0].astype(np.int64), items[:, 1].astype(np.int64))
    if words is not None:
        assert scratch is not None
        return block, _split_zero_runs(words[block.index], items, scratch)
    counts = items[:, 1].astype(np.int64)
    return block, (items[:, 0].astype(np.int64), counts, np.zeros(counts.size, dtype=bool))


def _data_views(block: RamBlock, runs: Runs) -> tuple[list[memoryview], int]:
    """Views of the non-zero runs' pages (:func:`_segment_views`), and how many pages they hold."""
    firsts, counts, zero = runs
    return _segment_views(block, firsts, counts, zero), int(counts[~zero].sum())


def _count_pages(ctx: ChannelContext, normal: int, total: int, payload_bytes: int) -> None:
    """The channel's counters for one job: pages with data, zero pages, bytes."""
    ctx.count(Counter.NORMAL_PAGES, normal)
    ctx.count(Counter.ZERO_PAGES, total - normal)
    ctx.count(Counter.GUEST_BYTES, total * PAGE_SIZE)
    ctx.count(Counter.PAYLOAD_BYTES, payload_bytes)


class RamPagesSender:
    """Slot → RAM_PAGES header + payload buffers (views of guest RAM, or frames)."""

    holds_slot = False  # the buffers are guest RAM or fresh frames, never the slot

    def __init__(self, ctx: ChannelContext) -> None:
        spec = ctx.spec
        self.ctx = ctx
        self.blocks = ctx.ram.blocks
        self.words = [_words(block) for block in self.blocks] if spec.zero_page_detection else None
        self.gather = gather_scratch() if spec.zero_page_detection else None
        self.codec = codecs.make_codec(spec.codec, spec.codec_level)
        self.compress = self.codec.wire_id != 0
        self._scratch = bytearray(FRAME_BYTES) if self.compress else bytearray()
        self.digests = _digest_map(ctx)

    def prepare(self, slot: SendSlot, sequence: int, epoch: int) -> list[Part]:
        """The packet, in parts, each with what to do right before it is sent:
        tracked verification hashes each piece from guest RAM before its pages go
        (in cache for the copy).  A page the guest writes after that is dirty
        again, sent and hashed again in a later round; the final round's guest is
        paused."""
        block, runs = _slot_runs(self.blocks, self.words, slot, self.gather)
        digests = self.digests
        firsts, counts, zero = runs
        if digests is None or (self.compress and not zero.all()):
            # Compressed frames do not follow the pieces: hash them all first.
            before = partial(_store_runs, digests, block, firsts, counts) if digests is not None else None
            return [(list(self._packet(block, runs, sequence, epoch)), before)]
        parts: list[Part] = [
            (_segment_views(block, *segments), partial(digests.store, block, pieces))
            for segments, pieces in _piece_parts(firsts, counts, zero, digests.region_pages, _PART_PAGES)
        ]
        normal = int(counts[~zero].sum())
        header = self._header(block, runs, sequence, epoch, normal, 0, normal * PAGE_SIZE)
        parts[0] = ([header, *parts[0][0]], parts[0][1])
        return parts

    def _packet(self, block: RamBlock, runs: Runs, sequence: int, epoch: int) -> list[Buffer]:
        """Header, then the pages with data: views of guest RAM, or frames."""
        views, normal = _data_views(block, runs)
        frames: Sequence[Buffer]
        if self.compress and normal:
            frames = self._frames(views)
            payload_length = sum(len(frame) for frame in frames)
            codec = self.codec.wire_id
        else:
            frames, payload_length, codec = views, normal * PAGE_SIZE, 0
        return [self._header(block, runs, sequence, epoch, normal, codec, payload_length), *frames]

    def _header(self, block: RamBlock, runs: Runs, sequence: int, epoch: int, normal: int,
                codec: int, payload_length: int) -> bytes:
        """The RAM_PAGES header (and the channel's page counters)."""
        firsts, counts, zero = runs
        _count_pages(self.ctx, normal, int(counts.sum()), payload_length)
        return packet.encode_ram_pages(sequence, block.index, codec, epoch,
                                       list(zip(firsts.tolist(), counts.tolist(), zero.tolist())),
                                       payload_length)

    def _frames(self, views: list[memoryview]) -> list[Buffer]:
        """The pages of `views` as frames: header, then compressed bytes or RAW views."""
        buffers: list[Buffer] = []
        for frame in _cut(views, FRAME_BYTES):
            size = sum(view.nbytes for view in frame)
            # Compress a copy: the guest may write a page while the codec reads it
            # twice; the copy keeps every codec's input stable (that page is dirty
            # again and goes next round anyway).
            scratch = memoryview(self._scratch)[:size]
            at = 0
            for view in frame:
                scratch[at:at + view.nbytes] = view
                at += view.nbytes
            packed = self.codec.compress(scratch)
            if len(packed) < size:
                buffers += [encode_frame_header(len(packed), raw=False), packed]
            else:
                buffers += [encode_frame_header(size, raw=True), *frame]
        return buffers


def _per_block(ctx: ChannelContext, shared: memoryview | None, dtype: str) -> list[np.ndarray] | None:
    """A per-page shared map of all blocks (present map, page checksums), cut per block."""
    if shared is None:
        return None
    whole = np.frombuffer(shared, dtype=dtype)
    bases = np.cumsum([0] + [b.n_pages for b in ctx.ram.blocks]).tolist()
    return [whole[bases[i]:bases[i + 1]] for i in range(len(ctx.ram.blocks))]


def _chunk_map(ctx: ChannelContext, part: int = 0) -> RegionMap | None:
    """The chunk map (ChannelContext.chunk_sums): its `part`-th array of one uint64
    per chunk of all blocks (0: the checksums; restore's 1: present pages)."""
    if ctx.chunk_sums is None:
        return None
    return RegionMap(ctx.ram.blocks, fmt.CHUNK_PAGES, ctx.chunk_sums, "<u8", fmt.chunk_sum, part)


def _digest_map(ctx: ChannelContext) -> RegionMap | None:
    """Tracked verification's digest map (engine/verify.py), or None where the
    migration tracks no digests: an XXH3-128 per piece of spec.piece_pages pages."""
    if ctx.piece_digests is None:
        return None
    assert ctx.spec.piece_pages > 0
    return RegionMap(ctx.ram.blocks, ctx.spec.piece_pages, ctx.piece_digests,
                     f"S{RAM_DIGEST_SIZE}", xxhash.xxh3_128_digest,
                     on_time=partial(ctx.count, Counter.HASH_NS))  # the downtime's share: engine/verify.py


def _store_runs(digests: RegionMap, block: RamBlock, firsts: np.ndarray, counts: np.ndarray) -> None:
    """Hash every piece the runs touch (a compressed packet's: all at once)."""
    digests.store(block, digests.regions_touched(firsts, counts).tolist())


class RamPagesFileWriter:
    """Snapshot save: slot → zero runs → present map + each non-zero run at its place,
    its pages' checksums in the checksum map (when the save keeps them)."""

    def __init__(self, ctx: ChannelContext) -> None:
        target = ctx.spec.file
        assert target is not None
        self.ctx = ctx
        self.blocks = ctx.ram.blocks
        self.offsets = target.pages_offsets
        self.words = [_words(b) for b in self.blocks] if ctx.spec.zero_page_detection else None
        self.gather = gather_scratch() if ctx.spec.zero_page_detection else None
        present = _per_block(ctx, ctx.present, "u1")
        assert present is not None
        self.present = present
        self.sums = _per_block(ctx, ctx.page_sums, "<u8")
        self.chunks = _chunk_map(ctx)
        # The word of a chunk of n pages all found zero: xxh3-64 of n zero pages
        # (a whole chunk, or a block's shorter last one), never hashed from RAM.
        self.zero_words = {n: fmt.chunk_sum(bytes(n * PAGE_SIZE)) for n in
                           {fmt.CHUNK_PAGES, *(b.n_pages % fmt.CHUNK_PAGES for b in self.blocks)} if n}

    def plan(self, slot: SendSlot) -> list[FileIO]:
        block, runs = _slot_runs(self.blocks, self.words, slot, self.gather)
        firsts, counts, zero = runs
        # A page zero now is absent from the file, whatever an earlier round
        # left at its place: restore leaves it zero.  Its checksum is 0.
        pages, nonzero = runs_to_pages(firsts, counts), np.repeat(~zero, counts)
        self.present[block.index][pages] = nonzero
        normal = int(counts[~zero].sum())
        _count_pages(self.ctx, normal, int(counts.sum()), normal * PAGE_SIZE)
        base, sums = self.offsets[block.index], None
        if self.sums is not None:
            sums = self.sums[block.index]
            if not nonzero.all():
                sums[pages[~nonzero]] = 0
        hashed_last = self._plan_chunk_words(block, runs) if self.chunks is not None else set()
        plan = []
        starts, lengths, _ = cut_runs(firsts[~zero], counts[~zero], _FILE_PIECE_PAGES)
        at_chunks = (starts // fmt.CHUNK_PAGES).tolist()
        for i, (at, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
            chunk = at_chunks[i]
            # A chunk's pieces are consecutive: its last is where the next is in another chunk.
            last = chunk in hashed_last and (i + 1 == len(at_chunks) or at_chunks[i + 1] != chunk)
            view = block.page_view(at, n)
            before = None
            if sums is not None or last:
                before = partial(_before_write, view, sums[at:at + n] if sums is not None else None,
                                 self.chunks if last else None, block, chunk)
            plan.append(FileIO(base + at * PAGE_SIZE, [view], before=before))
        return plan

    def _plan_chunk_words(self, block: RamBlock, runs: Runs) -> set[int]:
        """Every chunk the slot touched, zero pages included, gets a new word: with
        fewer than CHUNK_HASH_MIN_PAGES pages touched, 0 (no chunk word); with every
        page touched and found zero, the constant word of zeros; else its hash from
        guest RAM: now if the slot writes none of its pages, else right before its
        last piece is written, just after that piece's page checksums (its bytes in
        cache).  Returns the chunks hashed at their last piece."""
        chunks = self.chunks
        assert chunks is not None
        words = chunks.of_block(block)
        firsts, counts, zero = runs
        touched, n_touched = chunks.regions_of_runs(firsts, counts)
        words[touched[n_touched < CHUNK_HASH_MIN_PAGES]] = 0
        dense = n_touched >= CHUNK_HASH_MIN_PAGES
        n_pages = np.minimum(fmt.CHUNK_PAGES, block.n_pages - touched * fmt.CHUNK_PAGES)
        n_zero = np.zeros(touched.size, dtype=np.int64)
        if zero.any():
            zero_chunks, zero_pages = chunks.regions_of_runs(firsts[zero], counts[zero])
            n_zero[np.searchsorted(touched, zero_chunks)] = zero_pages
        all_zero = dense & (n_zero == n_pages)
        for chunk, n in zip(touched[all_zero].tolist(), n_pages[all_zero].tolist()):
            words[chunk] = self.zero_words[n]
        hashed = dense & ~all_zero
        written = dense & (n_zero < n_touched)  # some of its pages have a piece to write
        chunks.store(block, touched[hashed & ~written].tolist())
        return set(touched[hashed & written].tolist())


def _before_write(view: memoryview, sums: np.ndarray | None, chunks: RegionMap | None,
                  block: RamBlock, chunk: int) -> None:
    """Right before a piece is written: its pages' checksums, then (its chunk's last
    piece) the chunk's word, from guest RAM as it is now, in the round that writes
    (or finds zero) some of its pages (docs/snapshot-format.md §8: why the last
    round's is right)."""
    if sums is not None:
        _checksum(view, sums)
    if chunks is not None:
        chunks.store(block, (chunk,))


def _checksum(view: memoryview, sums: np.ndarray) -> None:
    """Right before the write, from the bytes about to be written (see
    docs/snapshot-format.md §8 for why a guest write in between is harmless)."""
    sums[:] = fmt.page_sums(view, PAGE_SIZE)


class RamPagesFileReader:
    """Snapshot restore: slot (runs of present pages) → each run read into its pages,
    every page checked right after the read: a dense chunk's by its chunk word
    after its last piece, other pages by their page words."""

    def __init__(self, ctx: ChannelContext) -> None:
        target = ctx.spec.file
        assert target is not None
        self.ctx = ctx
        self.blocks = ctx.ram.blocks
        self.offsets = target.pages_offsets
        self.sums = _per_block(ctx, ctx.page_sums, "<u8")
        self.chunks = _chunk_map(ctx)
        self.present = _chunk_map(ctx, part=1)  # each chunk's present pages (the restore's)

    def plan(self, slot: SendSlot) -> list[FileIO]:
        block = self.blocks[slot.a0]
        base = self.offsets[block.index]
        items = slot.used_items()
        pages = int(items[:, 1].sum())
        _count_pages(self.ctx, pages, pages, pages * PAGE_SIZE)
        starts, lengths, _ = cut_runs(items[:, 0], items[:, 1], _FILE_PIECE_PAGES)
        pieces = list(zip(starts.tolist(), lengths.tolist()))
        views = [block.page_view(at, n) for at, n in pieces]
        if self.sums is None:
            return [FileIO(base + at * PAGE_SIZE, [view]) for (at, _), view in zip(pieces, views)]
        # Chunks whose every present page is in this slot, dense enough to be worth
        # one hash of the whole chunk, with a chunk word (not 0): checked by it after
        # their last piece; every other piece page by page after its read.  A piece
        # lies in one chunk and a chunk's pieces are consecutive.
        # The slot's chunks' words and present pages, as lists (per chunk below; numpy
        # scalars cost more), of these chunks only.
        c0, c1 = int(starts.min()) // fmt.CHUNK_PAGES, int(starts.max()) // fmt.CHUNK_PAGES + 1
        words = self.chunks.of_block(block)[c0:c1].tolist() if self.chunks else []
        present = self.present.of_block(block)[c0:c1].tolist() if self.present else []
        afters: list[Callable[[], None] | None] = [None] * len(pieces)
        for chunk, group in groupby(range(len(pieces)), key=lambda i: pieces[i][0] // fmt.CHUNK_PAGES):
            indices = list(group)
            held = sum(pieces[i][1] for i in indices)
            word = words[chunk - c0] if words else 0
            if word and held == present[chunk - c0] and held >= CHUNK_CHECK_MIN_PAGES:
                afters[indices[-1]] = partial(self._check_chunk, block, chunk, word,
                                              [(pieces[i][0], views[i]) for i in indices])
            else:
                for i in indices:
                    afters[i] = partial(self._check, block, pieces[i][0], views[i])
        return [FileIO(base + at * PAGE_SIZE, [view], after=after)
                for (at, _), view, after in zip(pieces, views, afters)]

    def _check_chunk(self, block: RamBlock, chunk: int, word: int,
                     pieces: list[tuple[int, memoryview]]) -> None:
        """After the chunk's last piece is read: its RAM (pages read, and zero where the
        snapshot holds no page) against its chunk word.  A mismatch is told by the
        page words: the damaged page, or (every page intact) RAM that is not zero
        where it should be."""
        chunks = self.chunks
        assert chunks is not None
        if chunks.hash_fn(chunks.view(block, chunk)) == word:
            return
        for at, view in pieces:
            self._check(block, at, view)
        first, n_pages = chunks.span(block, chunk)
        offset = self.offsets[block.index] + first * PAGE_SIZE
        raise SnapshotFormatError(f"block {block.name!r} pages {first}-{first + n_pages - 1} (file offset "
                                  f"{offset}) do not match their chunk checksum, though every page "
                                  f"read matches its own: the chunk checksums are damaged, or the RAM "
                                  f"is not zero where the snapshot holds no page (ram_is_zeroed?)")

    def _check(self, block: RamBlock, first: int, view: memoryview) -> None:
        """Right after the read: every page of `view` (pages first...) has its checksum."""
        assert self.sums is not None
        n_pages = view.nbytes // PAGE_SIZE
        bad = fmt.damaged_pages(view, self.sums[block.index][first:first + n_pages], PAGE_SIZE)
        if bad.size:
            page = first + int(bad[0])
            offset = self.offsets[block.index] + page * PAGE_SIZE
            more = f" ({bad.size - 1} more in pages {first}-{first + n_pages - 1})" if bad.size > 1 else ""
            raise SnapshotFormatError(f"block {block.name!r} page {page} (file offset {offset}) is "
                                      f"damaged: its checksum does not match{more}")


class RamPagesReceiver:
    """A checked RAM_PAGES header → the views its payload goes into → pages placed."""

    def __init__(self, ctx: ChannelContext) -> None:
        self.ctx = ctx
        self.blocks = ctx.ram.blocks
        self.codec = codecs.make_codec(ctx.spec.codec, None)
        self._frame = bytearray(FRAME_BYTES) if self.codec.wire_id else bytearray()
        self._frame_header = memoryview(bytearray(FRAME_HEADER.size))
        self.digests = _digest_map(ctx)

    def receive(self, record: packet.Packet) -> Iterator[Sequence[memoryview]]:
        assert isinstance(record, packet.RamPagesHeader)
        block = self.blocks[record.block_index]
        firsts, counts, flags = (np.fromiter(column, dtype=np.int64, count=len(column))
                                 for column in record.columns)
        zero = (flags & packet.RunFlags.ZERO) != 0
        digests = self.digests
        if record.codec == 0 and digests is not None:
            # Tracked verification: part by part, its pages land, its ZERO runs
            # are placed, then its pieces are hashed from RAM (in cache).
            normal = total = 0
            for segments, pieces in _piece_parts(firsts, counts, zero, digests.region_pages, _PART_PAGES):
                views = _segment_views(block, *segments)
                if views:
                    yield views
                part_normal, part_total = _place_marks(block, *segments)
                normal, total = normal + part_normal, total + part_total
                digests.store(block, pieces)
        else:
            views = _segment_views(block, firsts, counts, zero)
            if record.codec == 0:
                yield views
            else:
                yield from self._frames(views)
            normal, total = _place_marks(block, firsts, counts, zero)
            if digests is not None:  # compressed: every piece the packet touched, once in place
                _store_runs(digests, block, firsts, counts)
        _count_pages(self.ctx, normal, total, record.payload_length)

    def _frames(self, views: list[memoryview]) -> Iterator[Sequence[memoryview]]:
        """Frame by frame: its header, then its pages (RAW) or its compressed bytes."""
        for frame in _cut(views, FRAME_BYTES):
            size = sum(view.nbytes for view in frame)
            yield [self._frame_header]
            length, raw = decode_frame_header(self._frame_header, size)
            if raw:
                yield frame
                continue
            packed = memoryview(self._frame)[:length]
            yield [packed]
            pages = memoryview(self.codec.decompress(packed, size))  # exactly `size` bytes, or an error
            at = 0
            for view in frame:
                view[:] = pages[at:at + view.nbytes]
                at += view.nbytes


def _piece_parts(firsts: np.ndarray, counts: np.ndarray, zero: np.ndarray, piece: int,
                 group_pages: int) -> list[tuple[Runs, Sequence[int]]]:
    """Runs cut at every `piece` boundary, then grouped (a group ends at a piece
    boundary once it holds `group_pages`): each group's runs (first, count, zero)
    and the pieces they touch.  Every piece is in one group (the runs ascend)."""
    if firsts.size == 1:  # one run (RAM without zero pages): arithmetic, no array work per part
        return _one_run_parts(int(firsts[0]), int(counts[0]), bool(zero[0]), piece, group_pages)
    return _runs_parts(firsts, counts, zero, piece, group_pages)


def _runs_parts(firsts: np.ndarray, counts: np.ndarray, zero: np.ndarray, piece: int,
                group_pages: int) -> list[tuple[Runs, Sequence[int]]]:
    """:func:`_piece_parts` of any runs."""
    starts, lengths, source = cut_runs(firsts, counts, piece)
    if not starts.size:
        return []
    pieces, zeros = starts // piece, zero[source]
    # Segment indices where a piece begins, and the pages before each segment.
    bounds = [*(np.flatnonzero(np.diff(pieces) != 0) + 1).tolist(), int(starts.size)]
    before = np.concatenate(([0], np.cumsum(lengths))).tolist()
    parts: list[tuple[Runs, Sequence[int]]] = []
    begin = 0
    for end in bounds:
        if before[end] - before[begin] >= group_pages or end == starts.size:
            part = slice(begin, end)
            parts.append(((starts[part], lengths[part], zeros[part]),
                          np.unique(pieces[part]).tolist()))
            begin = end
    return parts


def _one_run_parts(first: int, count: int, zero: bool, piece: int,
                   group_pages: int) -> list[tuple[Runs, Sequence[int]]]:
    """:func:`_piece_parts` of one run: each part ends at the first piece boundary
    `group_pages` or more past its start (or at the run's end).  The parts of a
    16 MiB one-run packet: 34 µs, against 193 µs by the array path (2-vCPU VM, 2026-11-30);
    tests/property/test_runs.py holds the two paths to the same parts."""
    parts: list[tuple[Runs, Sequence[int]]] = []
    at, end = first, first + count
    while at < end:
        stop = min(end, -(-(at + group_pages) // piece) * piece)
        parts.append(((np.array([at]), np.array([stop - at]), np.array([zero])),
                      range(at // piece, (stop - 1) // piece + 1)))
        at = stop
    return parts


def _segment_views(block: RamBlock, firsts: np.ndarray, counts: np.ndarray,
                   zero: np.ndarray) -> list[memoryview]:
    """Views of the non-zero runs' pages, adjacent ones joined."""
    if firsts.size == 1:
        return [] if zero[0] else [block.page_view(int(firsts[0]), int(counts[0]))]
    firsts, counts = firsts[~zero], counts[~zero]
    if not firsts.size:
        return []
    starts = np.concatenate(([0], np.flatnonzero(firsts[1:] != firsts[:-1] + counts[:-1]) + 1))
    return [block.page_view(first, count)
            for first, count in zip(firsts[starts].tolist(), np.add.reduceat(counts, starts).tolist())]


def _cut(views: list[memoryview], limit: int) -> list[list[memoryview]]:
    """Cut a sequence of views into consecutive groups of `limit` bytes (last one less)."""
    groups: list[list[memoryview]] = [[]]
    room = limit
    for view in views:
        while view.nbytes:
            if room == 0:
                groups.append([])
                room = limit
            take = min(room, view.nbytes)
            groups[-1].append(view[:take])
            view = view[take:]
            room -= take
    return [group for group in groups if group]


def _place_marks(block: RamBlock, firsts: np.ndarray, counts: np.ndarray,
                 zero: np.ndarray) -> tuple[int, int]:
    """After a packet landed: zero its ZERO pages where they may hold data, and
    mark its other pages as holding data.  One numpy pass over the runs, not a
    Python step per run: a zero-heavy packet has hundreds of runs.  Returns the
    pages with data, and all pages."""
    if firsts.size == 1 and not zero[0]:  # one run with data: mark a slice
        count = int(counts[0])
        block.dirty.mark(int(firsts[0]), count)
        return count, count
    if zero.any():
        stale = block.dirty.take_pages(runs_to_pages(firsts[zero], counts[zero]))
        if stale.size:
            block.array()[stale] = 0
    if not zero.all():
        block.dirty.mark_pages(runs_to_pages(firsts[~zero], counts[~zero]))
    return int(counts[~zero].sum()), int(counts.sum())
