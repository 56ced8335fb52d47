"""The source side of a live migration.

::

    setup      main channel: ← challenge, hello → ← hello (the session key), CONFIG → CONFIG_ACK
               N channel connections (← challenge, hello each) → N channel processes → READY
               and precopy starts: ← CHANNELS_READY is read by the return-path reader,
               and waited for only before the first main-channel message (the
               destination reads none before it); PING/PONG during precopy (RTT)
    precopy    round 1 sends every page; round k sends the pages dirtied since;
               iterative devices hand out live chunks beside it (at most a window
               ahead of what the destination loaded);
               each round ends with flush + sync (SYNC on every channel, SYNC_MARKER),
               then LIVE_ROUND (live chunks so far) → ← DEVICES_LOADED once loaded;
               until the remaining dirty bytes and devices' pending state at the
               measured bandwidth, plus the devices' load time left, fit the
               downtime limit and a device that asked has its SWITCHOVER_ACK
               (or max_rounds: switch over or fail, as configured)
    switchover pause the guest → SWITCHOVER → final round, flushed (no sync: END is
               the barrier) → END on every channel → COMPLETE (→ DIGESTS if verifying)
    commit     ← PREPARED (the destination has it all, its guest has not run) →
               COMMIT: from here the destination owns the VM → ← RESUMED
    local      (``config.local``, unix:// only) no page and no RAM round: the
               rounds (only if a device is iterative) carry live device chunks,
               LIVE_ROUND and the ack as above; then pause → SWITCHOVER →
               RAM_HANDOVER with the RAM's descriptors (SCM_RIGHTS) → devices → END
               → COMPLETE → ← PREPARED → disown the RAM, COMMIT → ← RESUMED; a
               COMMIT that cannot be sent, or a destination that did not commit,
               gives the RAM back to this side with its guest
    teardown   always; a failure before COMMIT (or an ABORT from a destination that
               did not commit) resumes the guest, running and intact; a failure after
               COMMIT without an answer keeps it paused: OutcomeUnknownError, settle()

A return-path reader (a thread-pool job) reads the destination's messages for
the whole migration, so an ABORT or a lost connection wakes the orchestrator
through the failure latch at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import replace
from urllib.parse import urlsplit

from engine import codecs
from engine.channel import ChannelSpec, run_send_channel
from engine.config import MigrationConfig, check_argument, source_config
from engine.device import LiveDevices, MigratableDevice, device_key, is_iterative, wants_switchover_ack
from engine.dirty import DirtySource
from engine.errors import (
    ConfigError,
    GuestControlError,
    HandshakeError,
    MigrationError,
    OutcomeUnknownError,
    RemoteProtocolError,
    TlsError,
    TransportBrokenError,
    TransportError,
)
from engine.link import LinkSecurity, TlsConfig, require_tls_files, source_peer_name
from engine.migration import Migration
from engine.multifd import MultifdSender
from engine.operation import check_ram
from engine.payload import PrecopyClient, SwitchoverSaver, SwitchoverSaves, payload_modules, slot_capacity
from engine.pool import WorkerPool
from engine.saving import RAM_CLIENT, SavingOperation
from engine.shm import PAGE_SIZE, GuestRAM, RamHandle
from engine.slots import SlotTable
from engine.stats import MigrationResult
from engine.sync import MigrationEvent, MigrationState, Signal
from engine.transport import Connection, check_address, close_all, connect
from engine.verify import (
    DIGEST_CHUNK,
    PieceDigests,
    dump_ram,
    ram_digests,
    tracked_fits,
    tracked_piece_pages,
    verification_extra,
)
from engine.wire import message as wire
from engine.wire import packet

log = logging.getLogger("multifd.source")

#: Bytes an iterative device may have handed out in live rounds and not yet had
#: loaded on the destination (half the destination's default max_device_buffer).
LIVE_WINDOW = 32 << 20

#: Channel connections opened at once, before their hellos (engine/admission.py
#: holds up to MAX_PER_PEER unauthenticated connections from one peer).
HELLO_BATCH = 16

#: PING/PONG round trips measured in precopy, one after the other; the RTT is the best.
RTT_SAMPLES = 3
#: Round trips of the switchover the paused guest waits for beyond the data: SWITCHOVER's
#: way there (half), then PREPARED back and COMMIT there (one); the downtime_ms reported
#: counts them, so the estimate it is compared with, and converges on, does too.
COMMIT_ROUND_TRIPS = 1.5


def _link_security(to: str, tls: TlsConfig | None, config: MigrationConfig) -> LinkSecurity:
    """What protects a migration to `to` after the hellos.  Raises ConfigError."""
    require_tls_files(to, tls)
    if tls is None:
        return LinkSecurity(config.integrity, peer="destination",
                            handshake_timeout_s=config.handshake_timeout_s)
    peer_name = source_peer_name(to, tls.validate())
    return LinkSecurity("tls", tls=tls, peer_name=peer_name, peer="destination",
                        handshake_timeout_s=config.handshake_timeout_s)


class SourceMigration(SavingOperation, Migration):
    """Migrate `ram` (owned by the caller's VMM) to the destination at `to`.

    `pause_guest` stops the guest's vCPUs (returns once no more writes happen);
    `resume_guest` restarts them and is called if the migration fails or is
    cancelled after the pause: a failed migration leaves the guest running.
    `pool`: the VMM's warm process pool for the channels (:class:`Migration`).
    `dirty_source` (engine/dirty.py) gives each round's dirty pages (None: each
    block's DirtyMap); `throttle_guest(percent)` is the VMM's throttle, used by
    auto-converge (see :class:`~engine.saving.SavingOperation`).
    `payloads`: :class:`~engine.payload.SwitchoverSaver` objects of registered
    payload kinds, saved with the guest paused beside the devices (the
    destination needs a :class:`~engine.payload.DeliveryConsumer` for each kind).
    """

    role = "source"
    peer = "destination"
    #: Iterative devices: bytes one may have handed out and not yet had loaded
    #: (a VMM may set it on the object before run(); keep it at most half the
    #: destination's max_device_buffer).
    live_window = LIVE_WINDOW

    def __init__(
        self,
        ram: GuestRAM,
        to: str,
        *,
        secret: bytes,
        config: MigrationConfig | None = None,
        pause_guest: Callable[[], None] | None = None,
        resume_guest: Callable[[], None] | None = None,
        dump_dir: str | None = None,
        devices: Sequence[MigratableDevice] = (),
        pool: WorkerPool | None = None,
        dirty_source: DirtySource | None = None,
        throttle_guest: Callable[[int], None] | None = None,
        payloads: Sequence[SwitchoverSaver] = (),
        tls: TlsConfig | None = None,
    ) -> None:
        check_ram(ram)  # before local mode asks it who owns it
        check_address(to)
        check_argument("payloads", payloads, isinstance(payloads, Sequence), "a sequence")
        self.payloads = list(payloads)
        config = source_config(config)
        if config.local:
            if urlsplit(to).scheme != "unix":
                raise ConfigError(f"local mode hands the RAM over a unix socket on this host: "
                                  f"use a unix:///PATH address, not {to!r}")
            if not ram.owner:  # its owner would unlink it under the destination
                raise ConfigError("local mode hands the RAM's ownership over: this process must own "
                                  "it (created or adopted here, not attached)")
        # What protects every byte after the hellos (checked before anything is made).
        self._link = _link_security(to, tls, config)
        super().__init__(ram, config, secret=secret, pause_guest=pause_guest,
                         resume_guest=resume_guest, dump_dir=dump_dir, devices=devices, pool=pool,
                         dirty_source=dirty_source, throttle_guest=throttle_guest)
        self.to = to
        self.tls = tls
        self._helpers: WorkerPool | None = None
        self._prepared = Signal()
        self._resumed = Signal()
        self._channels_joined = Signal()  # the destination's CHANNELS_READY came
        self._first_rtt = Signal()  # the first PONG came: the commit's cost is known
        self._defer("close the return-path signals", self._close_signals)
        self._rtt_s = 0.0  # the best PING's round trip (0 until a PONG came)
        # When the PING whose PONG is due went (None: none is due), and how many
        # went: RTT_SAMPLES, one at a time, during precopy (the orchestrator
        # sends, the return path reads the PONG).
        self._ping_sent_at: float | None = None
        self._pings_sent = 0
        self._setup_deadline = 0.0
        self._session_key = b""  # from the main channel's handshake; channels authenticate with it
        self._live: LiveDevices | None = None  # iterative devices' precopy
        self._live_counts: tuple[int, ...] = ()  # the last LIVE_ROUND's
        self._ack_deadline: float | None = None
        # Verification: tracked (each page hashed by the channel that sent it) unless
        # the RAM is handed over, or its digests would not fit one DIGESTS (then
        # hashed after the pause); the digests sent in DIGESTS, once they are.
        self._tracked_piece_pages = tracked_piece_pages(config.packet_pages, ram)
        self._tracks_pages = (config.verify and not config.local
                              and tracked_fits(ram, self._tracked_piece_pages))
        self._digests: PieceDigests | None = None
        self.ram_digests: bytes | None = None  # as sent in DIGESTS, joined

    # -- the phases --------------------------------------------------------

    def _run(self) -> MigrationResult:
        t_start, t_setup, client, expected_downtime_s = self._until_switchover()
        resumed, t_pause, t_switchover_sent, t_complete, verify_ms = self._switchover(client)
        t_end = time.perf_counter()
        self._paused = False  # the guest is the destination's now
        self._machine.fire(MigrationEvent.COMPLETE)
        assert self.tracker is not None
        downtime_ms = (
            (t_switchover_sent - t_pause) * 1000 + self._rtt_s * 500 + resumed.downtime_us / 1000
        )
        return self._result(
            t_start, t_setup, t_complete, t_end,  # moved: every page is on its way
            downtime_ms=downtime_ms,
            rounds=self.tracker.round,
            compression=self.config.compression,
            # Committed: the destination's memory matched, or nobody compared it (a
            # mismatch fails it before PREPARED; its decoder refuses any other value).
            verified=True if resumed.verified is wire.Verification.EQUAL else None,
            verify_time_ms=max(verify_ms, resumed.verify_us / 1000),
            expected_downtime_ms=expected_downtime_s * 1000,
            dirty_rate_bytes_per_s=self.tracker.dirty_rate,
            rtt_ms=self._rtt_s * 1000,
            extra={"destination_running": resumed.running, **({"local": True} if self.config.local else {}),
                   # committed, but the destination's resume_guest raised: why
                   **({"destination_error": resumed.detail} if resumed.detail else {}),
                   **verification_extra(self.config.verify, self._digests is not None)},
        )

    def _sends_pages(self) -> bool:
        return not self.config.local

    def settle(self, destination_runs: bool) -> None:
        """Settle an OutcomeUnknownError once the VMM has asked the destination.

        `destination_runs` True: the destination committed (it owns the VM); the
        guest here stays stopped, and the migration counts as completed.  False:
        the destination did not commit and never will (it failed, or is gone):
        the guest here resumes.  Raises ConfigError in any other state, and
        GuestControlError if resume_guest raises.
        """
        if self.state is not MigrationState.OUTCOME_UNKNOWN:
            raise ConfigError(f"settle() is for a migration whose outcome is unknown, not {self.state.name}")
        if destination_runs:
            self._paused = False
            if self.config.local:
                self.ram.drop_spare()
            self._machine.fire(MigrationEvent.SETTLE_DESTINATION)
            return
        error = self._resume_after(OutcomeUnknownError("settled: the destination did not commit"))
        self._machine.fire(MigrationEvent.SETTLE_SOURCE)
        if isinstance(error, GuestControlError):
            raise error

    def _setup(self) -> None:
        """The set-up steps of the module's docstring, in order: the main channel's
        handshake, the channel connections and their hellos, the channel processes,
        the return-path reader; then the sender and the device pool."""
        cfg = self.config
        kinds = self._payload_kinds()
        conn, slots = self._handshake_main(kinds)
        self._mark("main_channel")
        # From here the main thread reads nothing on the main channel: the return
        # path does (CHANNELS_READY first), its thread started once our channels serve.
        conns = self._connect_channels()
        self._mark("channel_handshakes")
        self._start_send_channels(conns, slots, kinds)
        self._mark("channel_processes")
        self._start_return_path()
        conn.settimeout(cfg.stall_timeout_s)  # bounds a send to a peer that stopped reading
        self._core = MultifdSender(
            self._links, slots, n_clients=1 + len(self.devices) + len(self.payloads), latch=self.latch,
            marker=lambda epoch: self._send_message(wire.SyncMarker(epoch)),
            stall_timeout=cfg.stall_timeout_s, max_bandwidth=cfg.max_bandwidth,
        )
        self._start_device_pool(len(self.payloads))
        if any(map(is_iterative, self.devices)):
            self._live = LiveDevices(self.devices, self.live_window, self.latch)
            self._device_saver()

    def _handshake_main(self, kinds: tuple[int, ...]) -> tuple[Connection, SlotTable]:
        """Connect the main channel and authenticate both ways (← challenge, our
        hello, ← its reply), protect it as agreed, CONFIG → ← CONFIG_ACK.  Returns
        the main connection (secured) and the slot table for `kinds`, made while
        the destination checks our hello.  Raises HandshakeError, or ConfigError
        when the destination refuses the configuration."""
        cfg = self.config
        conn = self._own_conn(connect(self.to, cfg.connect_timeout_s, self.latch))
        conn.settimeout(cfg.handshake_timeout_s)  # bounds sends; reads wait on the latch
        self._setup_deadline = time.monotonic() + cfg.handshake_timeout_s
        # Mutual authentication, fresh on both sides: the destination's challenge,
        # our hello answering it, its reply answering our hello's nonce.
        challenge = packet.decode_challenge(self._read_handshake(packet.CHALLENGE_SIZE))
        nonce = os.urandom(packet.NONCE_SIZE)
        flags = self._link.hello_flags
        conn.send_all(packet.encode_hello(
            packet.HelloRole.MAIN, self.migration_id, 0, cfg.channels, self.secret, challenge, nonce,
            flags,
        ))
        self._session_key = packet.session_key(self.secret, self.migration_id, nonce, challenge)
        self._link = replace(self._link, session_key=self._session_key)
        # While the destination checks our hello: the slot table.
        slots = self._create_slots(kinds)
        if self._link.mode == "tls":  # the reply and everything after it inside TLS
            conn = self._secure_main(conn, self._link)
        answer = self._read_handshake(packet.HELLO_SIZE)
        try:
            reply = packet.decode_hello(answer, self.secret, nonce, roles=(packet.HelloRole.MAIN_REPLY,))
        except HandshakeError:
            self._abort_in_handshake(answer)
            raise
        if reply.migration_id != self.migration_id:
            raise HandshakeError(f"destination {self.to} answered for another migration")
        if reply.flags != flags:
            raise HandshakeError(f"destination {self.to} answered with protection "
                                 f"{reply.flags!r}, not {flags!r}")
        if self._link.mode == "mac":  # every byte from here in MAC records
            conn = self._secure_main(conn, self._link)
        self._send_message(self._config_record())
        ack = self._read_message(wire.ConfigAck, self._setup_deadline)
        if not ack.accepted:
            raise ConfigError(f"destination refused the configuration: {ack.reason}")
        return conn, slots

    def _create_slots(self, kinds: tuple[int, ...]) -> SlotTable:
        """The slot table, freed at teardown: N channel slots + one for the RAM
        client + one per device save job + one per switchover payload, each big
        enough for a device chunk when there are devices (and for `kinds`)."""
        cfg = self.config
        return self._own_slots(SlotTable.create(
            n_slots=cfg.channels + 1 + len(self.devices) + len(self.payloads), max_items=cfg.packet_pages,
            payload_capacity=max(packet.MAX_DEVICE_CHUNK if self.devices else 0, slot_capacity(kinds)),
            n_channels=cfg.channels,
        ))

    def _connect_channels(self) -> list[Connection]:
        """Connect the channels and answer each one's challenge with its hello (the
        session key's); returns their connections, closed at teardown."""
        cfg = self.config
        conns: list[Connection] = []
        # Until the channel processes own them (and after: closing twice is harmless).
        self._defer("close the channel connections", close_all, conns)
        # Connected a batch at a time, so the destination's admission challenges a
        # batch at once: a round trip per batch, not per channel (a batch stays well
        # under what admission holds from one peer before it evicts the oldest).
        for first in range(0, cfg.channels, HELLO_BATCH):
            batch = range(first, min(cfg.channels, first + HELLO_BATCH))
            self._connect_batch(conns, batch.stop)
            for channel_id in batch:
                data = conns[channel_id]
                self._track(data)  # a cancel wakes the read of its challenge
                try:
                    channel_challenge = packet.decode_challenge(data.recv_exact(packet.CHALLENGE_SIZE))
                finally:
                    self._untrack(data)
                self.latch.raise_if_failed()
                data.send_all(packet.encode_hello(
                    packet.HelloRole.CHANNEL, self.migration_id, channel_id, cfg.channels,
                    self._session_key, channel_challenge, flags=self._link.hello_flags,
                ))
                data.settimeout(None)
        return conns

    def _connect_batch(self, conns: list[Connection], up_to: int) -> None:
        """Connect channel connections until there are `up_to` (hellos not sent)."""
        while len(conns) < up_to:
            conns.append(connect(self.to, self.config.connect_timeout_s, self.latch))
            conns[-1].settimeout(self.config.handshake_timeout_s)

    def _start_send_channels(self, conns: list[Connection], slots: SlotTable, kinds: tuple[int, ...]) -> None:
        """The channel processes, one per connection (and the digest map they
        hash into, for tracked verification)."""
        cfg = self.config
        if self._tracks_pages:  # verification hashes each piece as it leaves (engine/verify.py)
            self._digests = PieceDigests(self.ram, self._tracked_piece_pages)
            self._defer("unlink the digest map", self._digests.close)
        spec = ChannelSpec(
            # Local mode: the channels carry device state only, so they map no RAM.
            channel_id=0, ram=RamHandle(()) if cfg.local else self.ram.handle,
            slots=slots.handle, packet_pages=cfg.packet_pages,
            codec=cfg.compression, codec_level=cfg.compression_level,
            zero_page_detection=cfg.zero_page_detection,
            payload_kinds=kinds, payload_modules=payload_modules(kinds), devices=self._device_table(),
            link=self._link,  # each channel process secures its own socket (TLS: handshakes there)
            digest_map=self._digests.name if self._digests is not None else None,
            piece_pages=self._digests.piece_pages if self._digests is not None else 0,
        )
        self._start_channels(run_send_channel, conns, spec)

    def _start_return_path(self) -> None:
        """The return-path reader, a thread job reading the destination's messages
        until teardown.  Our channels serve: pages may go.  The destination's
        channels may still be starting (their sockets buffer what comes); its
        CHANNELS_READY is read by the return path within the set-up deadline (else
        the migration fails, whether or not round 1 still fits in the sockets), and
        waited for before our first main-channel message."""
        self._setup_deadline = time.monotonic() + self.config.handshake_timeout_s
        self._helpers = WorkerPool("thread", 1, name="mfd-src-return-path")
        self._defer("stop the return-path reader", self._helpers.shutdown, wait=True, cancel=True)
        reader = self._helpers.submit(self._read_return_path)
        reader.add_done_callback(self._reader_done)

    def _switchover(
        self, client: PrecopyClient | None
    ) -> tuple[wire.Resumed, float, float, float, float]:
        """Pause, last round, END, COMPLETE, (DIGESTS), ← PREPARED, COMMIT, ← RESUMED.

        Returns RESUMED and the times of the pause, of SWITCHOVER and of
        COMPLETE being sent, and the source's hashing time in ms.
        """
        assert self.tracker is not None
        t_pause = self._pause()
        hashed_at_pause = self._hashing_ns()
        self._send_message(wire.Switchover())
        t_switchover_sent = time.perf_counter()
        if client is None:  # local mode: the RAM itself, not its pages
            self._hand_over_ram()
        saver = self._start_device_saves()
        others = self._start_payload_saves()
        if client is not None:
            self.tracker.round += 1
            client.queue_dirty()
            client.flush()
        if saver is not None:
            done, self.device_reports = saver.wait(self.latch)
            self._send_message(wire.DevicesDone(tuple(done)))
        if others is not None:
            others.wait()
        self.tracker.remaining_pages = 0
        # No sync for the last round: END, after each channel's last pages, is
        # the barrier the destination waits for before it resumes.
        final_epoch = self.core.finish()
        self.core.wait_finished()  # every channel wrote END: its work is done
        self._send_message(wire.Complete(final_epoch, self.config.verify))
        t_complete = time.perf_counter()
        verify_ms = 0.0
        if self.config.verify:
            t_hash = time.perf_counter()
            hashed_s = 0.0
            if self._digests is not None:
                # Every piece was hashed as it left, the final round's with the guest
                # paused: that hashing is the downtime's share too.
                self.ram_digests, chunk = self._digests.digests(), self._digests.chunk
                hashed_s = self._hashing_since(hashed_at_pause)
            else:  # hash while the destination hashes its copy; the guest stays paused
                self.ram_digests, chunk = ram_digests(self.ram, DIGEST_CHUNK), DIGEST_CHUNK
            verify_ms = (time.perf_counter() - t_hash + hashed_s) * 1000
            self._send_message(wire.Digests(chunk, self.ram_digests))
        if self.dump_dir:
            dump_ram(self.ram, os.path.join(self.dump_dir, "source.ram"))
        self._wait_answer(self._prepared, "PREPARED")
        # The commit point: once COMMIT is in our socket the destination owns the VM.
        self._commit(self._send_commit)
        resumed = self._wait_answer(self._resumed, "RESUMED")
        assert isinstance(resumed, wire.Resumed)
        if self.config.local:
            self.ram.drop_spare()  # the destination holds the RAM: its names are its own
        return resumed, t_pause, t_switchover_sent, t_complete, verify_ms

    def _hand_over_ram(self) -> None:
        """Local mode, guest paused: the RAM's descriptors, one per block in CONFIG
        order, go with RAM_HANDOVER over the main channel (SCM_RIGHTS).  This side
        still owns the RAM until COMMIT."""
        assert self._conn is not None
        segments = [block.segment for block in self.ram.blocks]
        data = wire.encode_message(wire.RamHandover(tuple(segment.name for segment in segments)))
        self._conn.send_with_fds(data, [segment.fileno() for segment in segments])
        self._count_main(len(data))

    def _send_commit(self) -> None:
        """COMMIT.  In local mode the RAM is given up first, so that the
        destination, which adopts it on reading COMMIT, is its only owner from
        then on (one resource tracker shared by both processes sees the
        unregister before the register); if the send fails, it is taken back."""
        if self.config.local:
            # A spare name per block, ours: should the destination die after COMMIT,
            # its resource tracker removes the first names, and a guest resumed here
            # (settle(False)) keeps its RAM by the spares.
            self.ram.disown(spare=True)
        try:
            self._send_message(wire.Commit())
        except TransportError:
            if self.config.local:
                self.ram.adopt()  # not committed: the RAM and its guest stay here
            raise

    def _resume_after(self, error: BaseException) -> BaseException:
        # Local mode: a guest that resumes here takes its RAM back (it was given
        # up with COMMIT, and the destination did not commit after all).
        if self.config.local and not self.ram.owner:
            # After COMMIT the destination may have adopted the RAM, and its tracker may
            # remove the first names; not if it answered ABORT (it never committed).
            self.ram.adopt(renamed=self._committed and error is not self._peer_reason)
        return super()._resume_after(error)

    def _wait_answer(self, answer: Signal, what: str) -> object:
        """The destination's `what`, within stall_timeout_s (else TransportBrokenError)."""
        timeout = self.config.stall_timeout_s
        try:
            return answer.wait(self.latch, timeout)
        except TimeoutError:
            raise TransportBrokenError(
                f"destination {self.to} sent no {what} within {timeout:.0f} s") from None

    # -- helpers -----------------------------------------------------------

    def _piece_pages(self) -> int:
        return self._digests.piece_pages if self._digests is not None else 1

    def _config_record(self) -> wire.Config:
        cfg = self.config
        return wire.Config(
            page_size=PAGE_SIZE,
            packet_pages=cfg.packet_pages,
            channel_count=cfg.channels,
            zero_page_detection=cfg.zero_page_detection,
            codec=cfg.compression,
            codec_level=codecs.make_codec(cfg.compression, cfg.compression_level).level,
            blocks=tuple(wire.BlockSpec(name, size) for name, size in self.ram.layout),
            devices=tuple(wire.DeviceSpec(device.idstr, device.instance_id, is_iterative(device),
                                          wants_switchover_ack(device)) for device in self.devices),
            local=cfg.local,
            page_sums=self._tracks_pages,
        )

    def _device_table(self) -> tuple[tuple[str, int], ...]:
        return tuple(device_key(device) for device in self.devices)

    def _payload_kinds(self) -> tuple[int, ...]:
        kinds: list[int] = [packet.PacketKind.RAM_PAGES]
        if self.devices:
            kinds.append(packet.PacketKind.DEVICE_STATE)
        kinds += sorted({saver.kind for saver in self.payloads})
        return tuple(kinds)

    def _start_payload_saves(self) -> SwitchoverSaves | None:
        """The switchover payloads save at once on the device pool, each on its own
        client slot (after the devices' slots)."""
        if not self.payloads:
            return None
        assert self._device_pool is not None
        return SwitchoverSaves(self.payloads, self.core, RAM_CLIENT + 1 + len(self.devices),
                               self._device_pool, self.latch)

    def _read_handshake(self, size: int) -> bytes:
        """The next `size` bytes of the main channel's handshake (bytes that come
        after them, an ABORT say, go to the message decoder)."""
        data = b""
        while len(data) < size:
            # No byte past the handshake: what follows may be TLS or MAC records.
            more = self._main.read_raw(self._setup_deadline, size - len(data))
            if not more:
                self._abort_in_handshake(data)
                raise HandshakeError(
                    f"destination {self.to} refused the connection (another wire version, a "
                    f"wrong secret, or TLS or integrity settings it does not accept: its log "
                    f"says which)")
            data += more
        return data

    def _main_closed(self) -> str:
        return f"destination {self.to} closed the main channel"

    def _abort_in_handshake(self, data: bytes) -> None:
        """What came instead of a hello may be the destination's ABORT (it refused
        this source's settings, protection say): raise its error if so."""
        if not data or packet.looks_like_hello(data):
            return
        self._main.feed(data)
        try:
            self._main.next(self._setup_deadline)  # an ABORT raises the destination's error
        except MigrationError as exc:
            if self._peer_reason is None:
                return  # not an ABORT either: the caller's error stands
            # Nothing authenticates it (it comes before the reply hello): anyone on the
            # path may have sent it.  It may refuse this source's settings (the
            # destination's ConfigError) or its certificate (TlsError), never report
            # anything else (a cancel, say).
            kind = type(exc) if type(exc) in (ConfigError, TlsError) else HandshakeError
            error = kind(f"{exc} (unauthenticated: sent before the destination proved it holds the secret)")
            self._main.peer_reason = error
            raise error from None


    def _send_message(self, record: wire.Message) -> None:
        """After set-up, the destination reads nothing on the main channel before
        its channels joined (it takes anything there for an ABORT or garbage):
        the first message waits for its CHANNELS_READY (the return path reads it
        within the set-up deadline, or fails the migration through the latch),
        and a PING goes first, which the destination answers at once; so does
        one before each round's SYNC_MARKER (see :meth:`_ping_if_due`)."""
        if self._core is not None and not self._channels_joined.is_set():
            self._channels_joined.wait(self.latch)
        if self._core is not None and (not self._pings_sent or isinstance(record, wire.SyncMarker)):
            self._ping_if_due()
        super()._send_message(record)

    def _ping_if_due(self) -> None:
        """Orchestrator: the next PING for the round-trip time, if no PONG is due.
        The first one goes before any other main-channel message after set-up
        (once the destination's channels joined), so every result has an RTT
        (its PONG comes before PREPARED).  The others go at round boundaries,
        each just before the round's SYNC_MARKER: not among the round's pages
        (it would wait behind them on the link, and so would its PONG), and not
        after the marker (the destination answers it only once its barrier let
        every channel's round in)."""
        if self._ping_sent_at is not None or self._pings_sent >= RTT_SAMPLES:
            return
        self._pings_sent += 1
        self._ping_sent_at = time.perf_counter()
        super()._send_message(wire.Ping(self._pings_sent))

    def _on_pong(self, pong: wire.Pong) -> None:
        """Return path: a PONG's round trip (the best so far is the RTT)."""
        sent = self._ping_sent_at
        if sent is None or pong.token != self._pings_sent:
            raise RemoteProtocolError(f"PONG {pong.token} from the destination, for no PING")
        rtt = time.perf_counter() - sent
        self._rtt_s = rtt if self._pings_sent == 1 else min(self._rtt_s, rtt)
        self._ping_sent_at = None
        if self.tracker is not None:  # the paused guest waits out its way there, PREPARED and COMMIT
            self.tracker.commit_s = COMMIT_ROUND_TRIPS * self._rtt_s
        self._first_rtt.set()

    def _read_return_path(self) -> None:
        """Thread job: dispatch the destination's messages until RESUMED or failure.
        Every error it meets fails the migration (see :meth:`_reader_done`)."""
        # An ABORT, or a close, raises.
        self._main.read(wire.ChannelsReady, self._setup_deadline, late=lambda: HandshakeError(
            f"the destination's {self.config.channels} channels did not join within "
            f"{self.config.handshake_timeout_s:g} s"))
        self._channels_joined.set()
        while True:
            message = self._main.next()  # an ABORT, or a close before RESUMED, raises
            if isinstance(message, wire.Prepared):
                if not self._prepared.set(message):
                    raise RemoteProtocolError("a second PREPARED from the destination")
            elif isinstance(message, wire.Resumed):
                with self._commit_lock:  # COMMIT is sent under it: wait until it is marked
                    committed = self._committed
                if not committed:
                    raise RemoteProtocolError("RESUMED from the destination before COMMIT")
                self._resumed.set(message)
                return
            elif isinstance(message, wire.DevicesLoaded):
                if self._live is None:
                    raise RemoteProtocolError("DEVICES_LOADED, but no device is iterative")
                self._live.on_loaded(message)
            elif isinstance(message, wire.Pong):
                self._on_pong(message)
            else:
                raise RemoteProtocolError(f"unexpected {type(message).__name__} from the destination")

    def _reader_done(self, reader: Future) -> None:
        error = reader.exception()
        if error is None:
            return
        if not isinstance(error, MigrationError):
            wrapped = MigrationError(f"the return-path reader failed: {type(error).__name__}: {error}")
            wrapped.__cause__ = error
            error = wrapped
        self.latch.fail(error)


    # -- iterative devices in precopy -------------------------------------

    def _live_start(self) -> None:
        if self._live is not None:
            assert self._saver is not None
            self._live.poll_pending()  # once a round here, once after its chunks (_live_report)
            self._saver.start_live(self.latch, self._live.allowances())

    def _live_wait(self) -> None:
        if self._live is not None:
            assert self._saver is not None
            self._live.handed_out(self._saver.wait_live(self.latch))

    def _live_report(self, wait_loaded: bool = False) -> tuple[int, float]:
        """LIVE_ROUND: live chunks so far per device (ACK_WANTED once every device
        that asks for the switchover ack has handed out its initial state).

        `wait_loaded` (local mode: no RAM round beside the devices' chunks): then
        wait, up to stall_timeout_s, for the destination to load them, so the
        estimate never counts bytes still in flight at a load rate not measured
        yet (round 1 would "converge" at once, and their loading would be
        downtime); the pending bytes are asked again after the wait."""
        live = self._live
        if live is None:
            return 0, 0.0
        assert self._saver is not None
        live.poll_pending()
        ask = live.ask_ack_now()
        if ask:
            self._ack_deadline = time.monotonic() + self.config.stall_timeout_s
        self._live_counts = tuple(self._saver.chunks)
        self._send_message(wire.LiveRound(self._live_counts, ask))
        if wait_loaded:
            live.wait_loaded(self._live_counts, self.config.stall_timeout_s)
            live.poll_pending()
        return live.remaining()

    def _live_ready(self, final: bool = False) -> bool:
        """The switchover ack, if a device asks for it: a short wait for it each
        converged round; at a forced switchover (`final`), a wait up to
        stall_timeout_s after it was asked for, or none if it was not asked yet."""
        live = self._live
        if live is None or not live.wants_ack or live.acked:
            return True
        if not live.ack_asked:
            if final:  # forced: what is left of the initial state goes in the downtime
                log.warning("switching over after max_rounds before a device handed out its "
                            "initial state: no switchover ack")
            return final
        if not final:
            return live.wait_ack(0.05, self._ack_deadline)
        while not live.wait_ack(1.0, self._ack_deadline):
            pass  # raises at the deadline
        return True

    def _live_pace(self) -> None:
        """A device whose window is full waits for the destination to load the
        round's chunks (else the rounds would spin and the destination's buffer
        overflow); bounded by stall_timeout_s."""
        live = self._live
        if live is not None and live.blocked():
            live.wait_loaded(self._live_counts, self.config.stall_timeout_s)

    def _close_signals(self) -> None:
        self._prepared.close()
        self._resumed.close()
        self._channels_joined.close()
        self._first_rtt.close()

    def _await_commit_cost(self) -> None:
        """Before switching over: the RTT (its first PONG, sent right after set-up),
        for the commit's round trips count in the expected downtime; bounded by
        stall_timeout_s."""
        try:
            self._first_rtt.wait(self.latch, self.config.stall_timeout_s)
        except TimeoutError:
            raise TransportBrokenError(f"the destination did not answer a PING in "
                                       f"{self.config.stall_timeout_s:.0f} s") from None

