"""The source side of a live migration.

::

    setup      main channel: hello ⇄ hello, CONFIG → CONFIG_ACK
               N channel connections (hello each) → N channel processes → READY
               ← CHANNELS_READY; PING/PONG for the round-trip time
    precopy    round 1 sends every page; round k sends the pages dirtied since;
               each round ends with flush + sync (SYNC on every channel, SYNC_MARKER)
               until the remaining dirty bytes at the measured bandwidth fit the
               downtime limit (or max_rounds: switch over or fail, as configured)
    switchover pause the guest → SWITCHOVER → final round, flush + sync → END on
               every channel → COMPLETE (→ DIGESTS if verifying) → ← RESUMED
    teardown   always; on failure or cancel the guest is resumed, running and intact

A return-path reader (a thread-pool job) reads the destination's messages for
the whole migration, so an ABORT or a lost connection wakes the orchestrator
through the failure latch at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from engine import codecs, packet
from engine import message as wire
from engine.channel import ChannelSpec, run_send_channel
from engine.device import DeviceReport, DeviceSaving, MigratableDevice, device_key
from engine.errors import (
    CancelledError,
    ConfigError,
    ConvergenceError,
    HandshakeError,
    LocalProtocolError,
    MigrationError,
    RemoteProtocolError,
    TransportClosedError,
)
from engine.migration import Migration, MigrationConfig
from engine.multifd import MultifdSender
from engine.payload import PrecopyClient, payload_entry
from engine.pool import WorkerPool
from engine.shm import PAGE_SIZE, GuestRAM
from engine.slots import SlotTable
from engine.stats import MigrationResult, StatsTracker, device_extra
from engine.sync import MigrationEvent, MigrationState, Signal, wait_any
from engine.transport import Connection, connect
from engine.verify import DIGEST_CHUNK, dump_ram, ram_digests

log = logging.getLogger("multifd.source")

M = TypeVar("M")

RAM_CLIENT = 0
_PROGRESS_EVERY_S = 0.1


class SourceMigration(Migration):
    """Migrate `ram` (owned by the caller's VMM) to the destination at `to`.

    `pause_guest` stops the guest's vCPUs (returns once no more writes happen);
    `resume_guest` restarts them and is called if the migration fails or is
    cancelled after the pause: a failed migration leaves the guest running.
    """

    role = "source"
    peer = "destination"

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
    ) -> None:
        super().__init__(config or MigrationConfig(), secret)
        self.ram = ram
        self.devices = list(devices)
        self._device_pool: WorkerPool | None = None
        self.device_reports: list[DeviceReport] = []
        self.to = to
        self._pause_guest = pause_guest
        self._resume_guest = resume_guest
        self._paused = False
        self.dump_dir = dump_dir
        self.tracker = StatsTracker(ram.size, PAGE_SIZE)
        self._helpers: WorkerPool | None = None
        self._resumed = Signal()
        self._pongs: dict[int, float] = {}
        self._expect_close = False
        self._last_progress = 0.0
        self._core: MultifdSender | None = None
        self._rtt_s = 0.0
        self._setup_deadline = 0.0

    @property
    def core(self) -> MultifdSender:
        """The multifd core (exists once setup has started the channels)."""
        if self._core is None:
            raise LocalProtocolError("the multifd core is used before setup")
        return self._core

    # -- the phases --------------------------------------------------------

    def _run(self) -> MigrationResult:
        self._machine.fire(MigrationEvent.START)
        t_start = time.perf_counter()
        self._setup()
        t_setup = time.perf_counter()
        self._machine.fire(MigrationEvent.SETUP_DONE)
        self._set_state("active")
        make_client = payload_entry(packet.PacketKind.RAM_PAGES).client
        assert make_client is not None
        client: PrecopyClient = make_client(
            self.ram, self.core, RAM_CLIENT, self.config.packet_pages, self._progress
        )
        expected_downtime_s = self._precopy(client)
        self._machine.fire(MigrationEvent.SWITCHOVER)
        self._set_state("switchover")
        resumed, t_pause, t_switchover_sent, t_complete, verify_ms = self._switchover(client)
        t_end = time.perf_counter()
        self._machine.fire(MigrationEvent.COMPLETE)
        self._set_state("completed")
        assert self.tracker is not None
        downtime_ms = (
            (t_switchover_sent - t_pause) * 1000 + self._rtt_s * 500 + resumed.downtime_us / 1000
        )
        return MigrationResult(
            status="completed",
            role="source",
            migration_id=str(self.migration_id),
            ram_bytes=self.ram.size,
            channels=self.config.channels,
            total_time_s=t_end - t_start,
            setup_time_ms=(t_setup - t_start) * 1000,
            downtime_ms=downtime_ms,
            rounds=self.tracker.round,
            **self.tracker.traffic(t_complete - t_setup),  # until every page is on its way
            compression=self.config.compression,
            verified=None if resumed.verified == 0 else resumed.verified == 1,
            verify_detail=resumed.detail,
            verify_time_ms=max(verify_ms, resumed.verify_us / 1000),
            expected_downtime_ms=expected_downtime_s * 1000,
            dirty_rate_bytes_per_s=self.tracker.dirty_rate,
            rtt_ms=self._rtt_s * 1000,
            channel_memory_kib=self._channel_memory(),
            extra=device_extra(self.device_reports),
        )

    def _setup(self) -> None:
        cfg = self.config
        conn = self._conn = connect(self.to, cfg.connect_timeout_s, self.latch)
        conn.settimeout(cfg.handshake_timeout_s)  # bounds sends; reads wait on the latch
        self._setup_deadline = time.monotonic() + cfg.handshake_timeout_s
        # Mutual authentication: our hello, then the destination's reply over our nonce.
        nonce = os.urandom(packet.NONCE_SIZE)
        conn.send_all(packet.encode_hello(
            packet.HelloRole.MAIN, self.migration_id, 0, cfg.channels, self.secret, nonce=nonce
        ))
        reply = packet.decode_hello(self._read_hello_reply(), self.secret, peer_nonce=nonce)
        if reply.role is not packet.HelloRole.MAIN_REPLY or reply.migration_id != self.migration_id:
            raise HandshakeError(f"destination {self.to} answered with an unexpected hello")
        self._send_message(self._config_record())
        ack = self._read_setup_message(wire.ConfigAck)
        if ack.status != 0:
            raise ConfigError(f"destination refused the configuration: {ack.reason}")

        # N channel slots + one for the RAM client + one per device save job,
        # each big enough for a device chunk when there are devices.
        self._slots = SlotTable.create(
            n_slots=cfg.channels + 1 + len(self.devices), max_items=cfg.packet_pages,
            payload_capacity=packet.MAX_DEVICE_CHUNK if self.devices else 0,
            n_channels=cfg.channels,
        )
        assert self.tracker is not None
        self.tracker.slots = self._slots
        conns: list[Connection] = []
        try:
            for channel_id in range(cfg.channels):
                data = connect(self.to, cfg.connect_timeout_s, self.latch)
                conns.append(data)
                data.send_all(packet.encode_hello(
                    packet.HelloRole.CHANNEL, self.migration_id, channel_id, cfg.channels, self.secret
                ))
        except BaseException:
            for data in conns:
                data.close()
            raise
        spec = ChannelSpec(
            channel_id=0, n_channels=cfg.channels, ram=self.ram.handle,
            slots=self._slots.handle, packet_pages=cfg.packet_pages,
            codec=cfg.compression, codec_level=cfg.compression_level,
            zero_page_detection=cfg.zero_page_detection,
            payload_kinds=self._payload_kinds(), devices=self._device_table(),
        )
        self._start_channels(run_send_channel, conns, spec)
        self._wait_channels_ready(cfg.handshake_timeout_s * 3)
        self._setup_deadline = time.monotonic() + cfg.handshake_timeout_s
        self._read_setup_message(wire.ChannelsReady)
        self._rtt_s = self._measure_rtt()
        conn.settimeout(None)
        self._core = MultifdSender(
            self._links, self._slots, n_clients=1 + len(self.devices), latch=self.latch,
            marker=lambda epoch: self._send_message(wire.SyncMarker(epoch)),
            stall_timeout=cfg.stall_timeout_s, max_bandwidth=cfg.max_bandwidth,
        )
        self._helpers = WorkerPool("thread", 2, name="mfd-src-helper")
        self._helpers.submit(self._read_return_path)
        if self.devices:
            self._device_pool = WorkerPool("thread", len(self.devices), name="mfd-src-devices")

    def _precopy(self, client: PrecopyClient) -> float:
        """Rounds until converged.  Returns the expected downtime (s) at switchover."""
        assert self.tracker is not None
        cfg, tracker = self.config, self.tracker
        limit_s = cfg.downtime_limit_ms / 1000
        t_precopy = time.perf_counter()
        wire_at_start = tracker.totals()["wire_bytes"]
        taken = 0
        while True:
            tracker.round += 1
            t_round = time.perf_counter()
            taken = client.queue_all() if tracker.round == 1 else client.queue_dirty()
            client.flush()
            self.core.sync()
            now = time.perf_counter()
            sent = tracker.totals()["wire_bytes"] - wire_at_start
            tracker.bandwidth = sent / max(now - t_precopy, 1e-9)
            pending = client.pending_pages()
            tracker.remaining_pages = pending
            tracker.dirty_rate = pending * PAGE_SIZE / max(now - t_round, 1e-9)
            expected = tracker.expected_downtime_s()
            self._progress(force=True)
            log.debug("round %d: %d pages sent, %d dirty, expected downtime %.1f ms",
                      tracker.round, taken, pending, expected * 1000)
            if expected <= limit_s:
                return expected
            if tracker.round >= cfg.max_rounds:
                if cfg.on_max_rounds == "fail":
                    raise ConvergenceError(
                        f"not converged after {tracker.round} rounds: {pending * PAGE_SIZE} bytes "
                        f"dirty, expected downtime {expected * 1000:.0f} ms "
                        f"> limit {cfg.downtime_limit_ms:.0f} ms"
                    )
                log.info("forcing switchover after %d rounds", tracker.round)
                return expected

    def _switchover(
        self, client: PrecopyClient
    ) -> tuple[wire.Resumed, float, float, float, float]:
        """Pause, last round, END, COMPLETE, (DIGESTS), RESUMED.

        Returns RESUMED and the times of the pause, of SWITCHOVER and of
        COMPLETE being sent, and the source's hashing time in ms.
        """
        assert self.tracker is not None
        if self._pause_guest is not None:
            self._pause_guest()
        self._paused = True
        t_pause = time.perf_counter()
        self._send_message(wire.Switchover())
        t_switchover_sent = time.perf_counter()
        saver = self._start_device_saves()
        self.tracker.round += 1
        client.queue_dirty()
        client.flush()
        if saver is not None:
            done, self.device_reports = saver.wait(self.latch)
            self._send_message(wire.DevicesDone(tuple(done)))
        self.tracker.remaining_pages = 0
        # No sync for the last round: END, after each channel's last pages, is
        # the barrier the destination waits for before it resumes.
        final_epoch = self.core.finish()
        self._send_message(wire.Complete(final_epoch, self.config.verify))
        t_complete = time.perf_counter()
        verify_ms = 0.0
        if self.config.verify:
            # Hash while the destination hashes its copy; the guest stays paused.
            t_hash = time.perf_counter()
            digests = ram_digests(self.ram, DIGEST_CHUNK)
            verify_ms = (time.perf_counter() - t_hash) * 1000
            self._send_message(wire.Digests(DIGEST_CHUNK, tuple(digests)))
        if self.dump_dir:
            dump_ram(self.ram, os.path.join(self.dump_dir, "source.ram"))
        self._expect_close = True
        resumed = self._resumed.wait(self.latch, timeout=None)
        assert isinstance(resumed, wire.Resumed)
        self.core.wait_finished()
        return resumed, t_pause, t_switchover_sent, t_complete, verify_ms

    # -- helpers -----------------------------------------------------------

    def _start_device_saves(self) -> DeviceSaving | None:
        """Every device saves at once, on the device pool, beside the last RAM round."""
        if not self.devices:
            return None
        make_saver = payload_entry(packet.PacketKind.DEVICE_STATE).client
        assert make_saver is not None and self._device_pool is not None
        saver: DeviceSaving = make_saver(self.devices, self.core, RAM_CLIENT + 1, self._device_pool)
        saver.start(self.latch)
        return saver

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
            devices=tuple(wire.DeviceSpec(idstr, instance) for idstr, instance in self._device_table()),
        )

    def _device_table(self) -> tuple[tuple[str, int], ...]:
        return tuple(device_key(device) for device in self.devices)

    def _payload_kinds(self) -> tuple[int, ...]:
        kinds = [packet.PacketKind.RAM_PAGES]
        if self.devices:
            kinds.append(packet.PacketKind.DEVICE_STATE)
        return tuple(kinds)

    def _read_hello_reply(self) -> bytes:
        reply = b""
        while len(reply) < packet.HELLO_SIZE:
            data = self._read_main(self._setup_deadline)
            if not data:
                raise HandshakeError(f"destination {self.to} refused the connection")
            reply += data
        if len(reply) > packet.HELLO_SIZE:  # an ABORT right after the reply, say
            self._main_decoder.receive_data(reply[packet.HELLO_SIZE:])
        return reply[:packet.HELLO_SIZE]

    def _read_setup_message(self, expected: type[M]) -> M:
        """Read the next main-channel message during setup (before the reader runs)."""
        decoder = self._main_decoder
        while True:
            message = decoder.next_message()
            if message is packet.NEED_DATA:
                data = self._read_main(self._setup_deadline)
                if not data:
                    raise TransportClosedError(f"destination {self.to} closed the main channel")
                decoder.receive_data(data)
                continue
            if isinstance(message, wire.Pong):
                self._pongs[message.token] = time.perf_counter()
            if isinstance(message, wire.Abort):
                raise self._peer_error(message)
            if not isinstance(message, expected):
                raise RemoteProtocolError(
                    f"expected {expected.__name__} from the destination, got {type(message).__name__}"
                )
            return message

    def _measure_rtt(self, samples: int = 3) -> float:
        best = float("inf")
        for token in range(1, samples + 1):
            sent = time.perf_counter()
            self._send_message(wire.Ping(token))
            self._read_setup_message(wire.Pong)
            best = min(best, self._pongs.get(token, sent) - sent)
        return best

    def _read_return_path(self) -> None:
        """Thread job: dispatch the destination's messages until the migration ends."""
        assert self._conn is not None
        conn, decoder = self._conn, self._main_decoder
        try:
            while True:
                message = decoder.next_message()
                if message is packet.NEED_DATA:
                    if not wait_any([conn], None, self.latch):
                        continue
                    data = conn.recv_some()
                    if not data:
                        if not self._expect_close or not self._resumed.is_set():
                            self.latch.fail(TransportClosedError(
                                f"destination {self.to} closed the main channel"
                            ))
                        return
                    decoder.receive_data(data)
                elif isinstance(message, wire.Resumed):
                    self._resumed.set(message)
                    return
                elif isinstance(message, wire.Abort):
                    self.latch.fail(self._peer_error(message))
                    return
                elif isinstance(message, wire.Pong):
                    continue
                else:
                    raise RemoteProtocolError(
                        f"unexpected {type(message).__name__} from the destination"
                    )
        except MigrationError as exc:
            self.latch.fail(exc)

    def _progress(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self._last_progress >= _PROGRESS_EVERY_S:
            self._last_progress = now
            if self.tracker is not None:
                self.tracker.snapshot()  # keeps the throughput window fed

    def _set_state(self, state: str) -> None:
        if self.tracker is not None:
            self.tracker.state = state

    def _on_failure(self, error: BaseException) -> None:
        self._set_state("cancelled" if isinstance(error, CancelledError) else "failed")
        if self._paused:
            self._paused = False
            if self._resume_guest is not None:
                try:
                    self._resume_guest()
                except Exception:
                    log.exception("resuming the source guest after a failed migration failed")

    def _teardown(self) -> None:
        super()._teardown()
        if self._helpers is not None:
            self._step("stop the return-path reader", self._helpers.shutdown, wait=True, cancel=True)
            self._helpers = None
        if self._device_pool is not None:
            failed = self._machine.state is not MigrationState.COMPLETED
            self._step("stop the device save jobs", self._device_pool.shutdown, wait=True, cancel=failed)
            self._device_pool = None
        self._step("close the resumed signal", self._resumed.close)
