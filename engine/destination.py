"""The destination side of a live migration.

::

    listen     bind now (so .address is known, port 0 included); on every connection
               send a fresh challenge; accept until a hello answers it as a main
               channel; strangers are refused and logged, and never join
    setup      reply hello; CONFIG → check it fits (RAM layout, codec) → CONFIG_ACK;
               accept N channel hellos (same migration id and count, ids unique)
               → N channel processes → READY → CHANNELS_READY; stop listening
    receive    main-channel messages in order: SYNC_MARKER(e) = barrier (every
               channel waits at SYNC(e) until all are there, then all go on);
               iterative devices' live chunks load as they come; LIVE_ROUND is
               checked (every live chunk it counts arrived before the sync) and
               answered with DEVICES_LOADED once loaded (SWITCHOVER_ACK if asked)
    complete   SWITCHOVER marks the source's pause; COMPLETE: wait for END on
               every channel (no channel writes RAM after this), every device
               loaded, digests verified if asked, dump if asked → PREPARED
    commit     ← COMMIT: from here this side owns the VM (it never frees its RAM
               again) → resume the guest (unless ``autostart`` is off) → RESUMED.
               Before COMMIT the guest has never run: any failure, or a source
               that closes, ends the migration with nothing started.
    local      (CONFIG flag LOCAL; unix:// only, unless refused) no RAM is created
               and the channels map none; after SWITCHOVER, RAM_HANDOVER brings the
               source's RAM as descriptors: mapped here (``on_ram`` tells the VMM),
               not owned; COMMIT adopts it (this side unlinks it from then on);
               a failure before COMMIT only unmaps it

Downtime is measured here, from SWITCHOVER to the guest's resume, everything
included (verification too, when asked for); verification time is also
reported on its own.  A source that sends nothing for ``stall_timeout_s``, on
any channel, fails the migration.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Final, Literal, TypeAlias

from engine import codecs
from engine.admission import Admission
from engine.channel import ChannelSpec, run_recv_channel
from engine.config import DestinationConfig, MigrationConfig, check_argument, check_hooks
from engine.device import DeviceLoading, MigratableDevice, is_iterative, loading_devices
from engine.errors import (
    ConfigError,
    GuestControlError,
    MigrationError,
    RemoteProtocolError,
    TransportBrokenError,
    VerificationError,
)
from engine.link import LinkSecurity, TlsConfig, destination_peer_name, require_tls_files
from engine.migration import Migration
from engine.multifd import MultifdReceiver
from engine.operation import check_ram
from engine.payload import DeliveryConsumer, payload_modules, slot_capacity
from engine.pool import WorkerPool
from engine.shm import PAGE_SIZE, GuestRAM, RamHandle
from engine.slots import SlotTable
from engine.stats import MigrationResult, StatsTracker
from engine.sync import MigrationEvent, ProgressWatch, Signal, wait_any
from engine.transport import Connection, check_address, close_all, listen
from engine.verify import (
    DIGEST_CHUNK,
    PieceDigests,
    check_dump_dir,
    compare_digests,
    dump_ram,
    ram_digests,
    tracked_piece_pages,
    verification_extra,
)
from engine.wire import frames, packet
from engine.wire import message as wire

log = logging.getLogger("multifd.destination")

# close() waits this long at most for a cancelled destination's teardown (which the
# channels' cancel grace and the stall timeout bound well below it).
_CLOSE_WAIT_S = 120.0

def _destination_config(config: DestinationConfig | MigrationConfig | None) -> DestinationConfig:
    """A destination's configuration.  Given a source's MigrationConfig (as older
    callers do), it takes the part that applies and names what it cannot use."""
    if config is None:
        return DestinationConfig()
    if isinstance(config, DestinationConfig):
        return config
    if not isinstance(config, MigrationConfig):
        raise ConfigError(f"config must be a DestinationConfig, not {type(config).__name__}")
    unused = config.validate().unused_by_destination()
    if unused:
        given = ", ".join(f"{name}={value!r}" for name, value in unused.items())
        log.warning("destination: %s not used here (the source chooses them; CONFIG tells this "
                    "side what it chose); pass a DestinationConfig", given)
    return config.for_destination()


# Slots per channel for handing device chunks to this process (engine/channel.py
# Deliveries): one being filled while the main process copies the other out.
DELIVERY_SLOTS = 2

# Refused connections: each is a log line until this many in a window, then only
# counted (a flood must not write without bound into a log nobody may read: a
# full stderr pipe would block the thread that admits connections, the
# migration's own), and the first ones' reasons are kept in `refused`.
REFUSALS_LOGGED = 10
REFUSAL_WINDOW_S = 10.0
REFUSALS_KEPT = 1000


class _Phase(enum.Enum):
    """How far the source's main-channel messages got (its order: wire-format §3)."""

    PRECOPY = "before SWITCHOVER"
    SWITCHED_OVER = "after SWITCHOVER"          # the source's guest is paused: the final round
    RAM_HANDED_OVER = "after RAM_HANDOVER"      # local mode: the source's RAM is mapped here
    DEVICES_DONE = "after DEVICES_DONE"
    COMPLETE = "after COMPLETE"                 # the main loop's end: _complete() takes over


_MainOrder: TypeAlias = dict[tuple[_Phase, type], _Phase]

# A message the source sends only in some modes, and why it is refused in the others.
_MODE_ONLY: Final[dict[type, str]] = {
    wire.LiveRound: "without an iterative device",
    wire.RamHandover: "without LOCAL",
    wire.DevicesDone: "without devices",
}


def _main_order(local: bool, devices: bool, live: bool) -> _MainOrder:
    """Which source message the main channel takes in which phase, and the phase
    it leads to, for a migration of this mode.  Anything else is the source's
    fault (RemoteProtocolError), never this side's state table's.

    Precopy: PING, SYNC_MARKER and LIVE_ROUND (iterative devices) until SWITCHOVER;
    then, in this order: RAM_HANDOVER (local mode), DEVICES_DONE (devices),
    COMPLETE.  (The final round is not synced: END on every channel is its barrier.)
    """
    order: _MainOrder = {(_Phase.PRECOPY, wire.Ping): _Phase.PRECOPY,
                         (_Phase.PRECOPY, wire.SyncMarker): _Phase.PRECOPY,
                         (_Phase.PRECOPY, wire.Switchover): _Phase.SWITCHED_OVER}
    if live:
        order[_Phase.PRECOPY, wire.LiveRound] = _Phase.PRECOPY
    phase = _Phase.SWITCHED_OVER
    for message, after, wanted in ((wire.RamHandover, _Phase.RAM_HANDED_OVER, local),
                                   (wire.DevicesDone, _Phase.DEVICES_DONE, devices),
                                   (wire.Complete, _Phase.COMPLETE, True)):
        if wanted:
            order[phase, message] = after
            phase = after
    return order


def _out_of_place(order: _MainOrder, phase: _Phase, message: wire.Message) -> RemoteProtocolError:
    """The error for `message`, which `order` does not take in `phase`."""
    kind = type(message)
    name = wire.message_type(kind).name
    if kind in _MODE_ONLY and not any(taken is kind for _, taken in order):
        return RemoteProtocolError(f"{name} {_MODE_ONLY[kind]}")
    expected = [wire.message_type(taken).name for at, taken in order if at is phase]
    return RemoteProtocolError(f"{name} {phase.value} is out of place (expected "
                               f"{' or '.join(expected)})")


class DestinationMigration(Migration):
    """Receive a migration on `address` into `ram` (or into RAM created from CONFIG).

    The listener is bound at construction, so :attr:`address` (with the real port
    when asked for port 0) can be given to the source before :meth:`run`.
    `resume_guest` starts the guest once its memory is complete.  If `ram` is
    None the RAM is created (owned by this object) to match the source, and is
    handed to the caller as :attr:`ram` on success.
    `pool`: the VMM's warm process pool for the channels (:class:`Migration`);
    `own_pool_if_short`: a source asking for more channels than `pool` has free
    workers gets channel processes started for its migration instead of a refusal.
    `autostart` False: after the commit the guest stays paused and the VMM
    starts it (QEMU's ``-S`` then ``cont``); the result's ``running`` says which.
    `payloads`: a :class:`~engine.payload.DeliveryConsumer` per registered payload
    kind the source sends (its ``payloads``); each gets its kind's payloads as
    they arrive, and its ``finish()`` once every channel ended, before PREPARED.
    `on_ram(ram)` is called once the RAM this side did not get from its VMM
    exists, before the guest resumes: created here from CONFIG (at setup), or
    handed over (local mode) — the VMM builds its VM on those pages (KVM memory
    slots, say).  `accept_local` False refuses a same-host migration (the
    source's ``config.local``) in CONFIG_ACK; so does a destination given its
    own `ram` or listening on anything but unix://.  In local mode the source's
    RAM arrives after its guest paused; before the commit it is not this side's
    to keep (a failure unmaps it, and the VMM must drop its uses), after it
    :attr:`ram` is owned here like RAM created here.
    """

    role = "destination"
    config: DestinationConfig
    peer = "source"

    def __init__(
        self,
        address: str,
        *,
        secret: bytes,
        ram: GuestRAM | None = None,
        resume_guest: Callable[[], None] | None = None,
        config: DestinationConfig | MigrationConfig | None = None,
        prealloc: bool = True,
        dump_dir: str | None = None,
        accept_timeout_s: float | None = None,
        ram_is_zeroed: bool = False,
        accept_codecs: tuple[str, ...] | None = None,
        devices: Sequence[MigratableDevice] = (),
        device_load: Literal["parallel", "serial"] = "parallel",
        max_device_buffer: int = 64 << 20,
        pool: WorkerPool | None = None,
        own_pool_if_short: bool = False,
        autostart: bool = True,
        payloads: Sequence[DeliveryConsumer] = (),
        accept_local: bool = True,
        on_ram: Callable[[GuestRAM], None] | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        # Every argument is checked before anything is made (the operation's latch).
        check_address(address)
        require_tls_files(address, tls)
        check_ram(ram, optional=True)
        keyed_devices = loading_devices(devices, device_load)
        check_dump_dir(dump_dir)
        check_hooks(resume_guest=resume_guest, on_ram=on_ram)
        check_argument("payloads", payloads, isinstance(payloads, Sequence), "a sequence")
        check_argument("accept_timeout_s", accept_timeout_s, accept_timeout_s is None or (
            type(accept_timeout_s) in (int, float) and 0 < accept_timeout_s < math.inf),
            "a positive number of seconds or None")
        check_argument("max_device_buffer", max_device_buffer,
                       type(max_device_buffer) is int and max_device_buffer >= packet.MAX_DEVICE_CHUNK,
                       f"a whole number of bytes, at least one chunk ({packet.MAX_DEVICE_CHUNK})")
        self.tls = tls.validate() if tls is not None else None
        peer_name = destination_peer_name(tls) if tls is not None else None
        super().__init__(_destination_config(config), secret, pool, own_pool_if_short)
        self._link = LinkSecurity(
            "tls" if tls is not None else self.config.integrity, server_side=True, tls=tls,
            peer_name=peer_name, peer="source",
            handshake_timeout_s=self.config.handshake_timeout_s)
        self.payloads = list(payloads)
        self.ram = ram
        self._resume_guest = resume_guest
        self.prealloc = prealloc
        self.dump_dir = dump_dir
        self.accept_timeout_s = accept_timeout_s
        # RAM created here is zero; RAM handed in is only if the caller says so.
        self.ram_is_zeroed = ram_is_zeroed or ram is None
        self.accept_codecs = accept_codecs  # None: every codec this side has
        self.devices = keyed_devices
        self.device_load = device_load
        self.max_device_buffer = max_device_buffer
        self._loader: DeviceLoading | None = None
        self.accept_local = accept_local
        self._on_ram = on_ram
        try:  # a listen that fails (address in use) must not leak what the operation holds
            self._listener = listen(address)
            # Released by teardown, also a cancel's before the destination ran.
            self._defer("stop listening", self._listener.close)
            self.address = self._listener.address
            # Connections are challenged and read concurrently: a stranger stalls nobody.
            self._admission = Admission(self._listener, self.config.handshake_timeout_s, self.latch,
                                        self._refuse)
            self._defer("log the refusals only counted", self._log_quiet_refusals)  # after the close below
            self._defer("close connections not admitted", self._admission.close)
        except BaseException:
            self._abandon()
            raise
        self.negotiated: wire.Config | None = None
        self.refused: list[str] = []   # why each refused connection was refused (the first REFUSALS_KEPT)
        self._refusals_window = (-REFUSAL_WINDOW_S, 0, 0)  # (start, logged, not logged) of the window
        self._receiver: MultifdReceiver | None = None
        self._channel_conns: list[Connection] = []  # main's copies of the channels' connections
        self._session_key = b""  # from the main channel's handshake; channels authenticate with it
        self.autostart = autostart
        self.running = False  # the guest was resumed here (after the commit)
        self.source_known = False  # a source's main hello was accepted: migration_id is its
        # Iterative devices: a LIVE_ROUND waits for its answer until
        # the loads catch up; a load job sets the wake signal after each chunk.
        self._live_wake: Signal | None = None
        self._live_due = False
        self._ack_due = False
        self._digests: PieceDigests | None = None  # tracked verification: CONFIG's PAGE_SUMS
        self.ram_digests: bytes | None = None  # ours, as compared with DIGESTS, joined
        self._hashed_at_switchover: list[int] = []  # each channel's hashing ns at SWITCHOVER

    def close(self) -> None:
        """Stop listening, for a destination that will not run: :meth:`cancel` it
        (``start()``, ``run()`` and ``wait()`` then raise CancelledError), and
        return once it is over and its port closed.  After the commit point nothing
        is cancelled and it returns at once, as it does when a hook of the operation
        calls it (its own thread tears down after the hook)."""
        self.cancel("closed: the destination will not run")
        if self._committed or self._thread is threading.current_thread():
            return
        # The thread that runs it tears down (bounded); a deadlock guard only.
        if self._claimed_by in ("run", "start") and not self._over.wait(_CLOSE_WAIT_S):
            log.warning("destination: close() gave up waiting for the teardown after %.0f s",
                        _CLOSE_WAIT_S)

    # -- the phases --------------------------------------------------------

    def _run(self) -> MigrationResult:
        self._machine.fire(MigrationEvent.LISTEN)
        conn, hello, challenge = self._accept_main()
        self._own_conn(conn)
        t_start = time.perf_counter()
        self._machine.fire(MigrationEvent.START)
        self.migration_id, self.source_known = hello.migration_id, True
        self._session_key = packet.session_key(self.secret, hello.migration_id, hello.nonce, challenge)
        self._link = replace(self._link, session_key=self._session_key)
        self._check_protection(hello)
        if self._link.mode == "tls":  # the reply and everything after it inside TLS
            conn = self._secure_main(conn, self._link)
        self._setup(hello)
        t_setup = time.perf_counter()
        self._machine.fire(MigrationEvent.SETUP_DONE)
        return self._receive(t_start, t_setup)

    def _accept_main(self) -> tuple[Connection, packet.ChannelHello, bytes]:
        """The source's main connection, its hello, and the challenge it answered."""
        deadline = None if self.accept_timeout_s is None else time.monotonic() + self.accept_timeout_s
        return self._admission.next_hello(self.secret, packet.HelloRole.MAIN, deadline,
                                          "a source to connect")

    def _setup(self, hello: packet.ChannelHello) -> None:
        """The set-up steps of the module's docstring, in order: the main channel's
        reply and CONFIG → CONFIG_ACK, the channels' hellos, the slot table and the
        RAM's dirty marks, the channel processes, then the receiver and CHANNELS_READY."""
        conn, config = self._handshake_main(hello)
        self._mark("main_channel")
        conns = self._accept_channels(hello)
        self._channel_conns = conns  # after END nothing may come on them (_complete)
        self._mark("channel_handshakes")
        self._defer("close the channel connections", close_all, conns)
        # Destination slots carry no pages: they deliver device chunks to this
        # process (DELIVERY_SLOTS per channel) and hold the channels' counters.
        devices = [self.devices[(d.idstr, d.instance_id)] for d in config.devices]
        kinds = self._payload_kinds(devices)
        per_channel = DELIVERY_SLOTS if devices or self.payloads else 0
        slots = self._create_slots(config, per_channel, kinds, devices)
        self._prepare_ram(config)
        spec = self._channel_spec(config, slots, kinds, per_channel)
        self._mark("slots")
        self._start_channels(run_recv_channel, conns, spec)
        self._mark("channel_processes")
        self._start_receiver(conn, slots, devices)

    def _handshake_main(self, hello: packet.ChannelHello) -> tuple[Connection, wire.Config]:
        """Answer the source's main hello (reply hello, then MAC records if agreed),
        read its CONFIG and check it fits, make the RAM it asks for (or expect the
        RAM's descriptors, local mode), → CONFIG_ACK.  Returns the main connection
        (secured) and the configuration.  Raises ConfigError for a configuration
        refused (after telling the source why)."""
        cfg = self.config
        conn = self._conn
        assert conn is not None
        conn.settimeout(cfg.handshake_timeout_s)
        conn.send_all(packet.encode_hello(
            packet.HelloRole.MAIN_REPLY, hello.migration_id, 0, hello.channel_count, self.secret,
            hello.nonce, flags=hello.flags,
        ))
        if self._link.mode == "mac":  # every byte from here in MAC records
            conn = self._secure_main(conn, self._link)
        config = self._read_message(wire.Config, time.monotonic() + cfg.handshake_timeout_s)
        refusal = self._check_config(config, hello)
        if refusal:
            self._send_message(wire.ConfigAck(1, refusal))
            raise ConfigError(f"refused the source's configuration: {refusal}")
        self.negotiated = config
        if config.local:
            self._main.accept_fds(len(config.blocks))  # RAM_HANDOVER's, one per block
        elif self.ram is None:
            self.ram = GuestRAM.create(
                [(b.name, b.size) for b in config.blocks], prealloc=self.prealloc
            )
            self._defer("free the RAM it created", self._free_created_ram)
            self._ram_arrived(self.ram)
        self._send_message(wire.ConfigAck(0, ""))
        return conn, config

    def _payload_kinds(self, devices: list[MigratableDevice]) -> list[int]:
        """The packet kinds the channels deliver: RAM pages, device state when
        `devices` load here, and each payload consumer's kind."""
        kinds: list[int] = [packet.PacketKind.RAM_PAGES]
        if devices:
            kinds.append(packet.PacketKind.DEVICE_STATE)
        kinds += sorted({consumer.kind for consumer in self.payloads})
        return kinds

    def _create_slots(self, config: wire.Config, per_channel: int, kinds: list[int],
                      devices: list[MigratableDevice]) -> SlotTable:
        """The statistics tracker and the slot table (freed at teardown):
        `per_channel` delivery slots for each channel, at least one."""
        self.tracker = StatsTracker(sum(block.size for block in config.blocks), PAGE_SIZE)
        return self._own_slots(SlotTable.create(
            n_slots=max(1, per_channel * config.channel_count), max_items=1,
            payload_capacity=max(packet.MAX_DEVICE_CHUNK if devices else 0, slot_capacity(kinds)),
            n_channels=config.channel_count,
        ))

    def _prepare_ram(self, config: wire.Config) -> None:
        """The RAM here (none yet in local mode) before any page comes: its dirty
        marks held and set to the pages that may hold data, and the digest map of
        tracked verification if CONFIG asks for page sums."""
        # During an incoming migration the dirty map says which pages may hold
        # data, so a ZERO run only writes pages that need it (clients/ram_payload.py).
        # (Local mode: no RAM here yet, and the source's is not ours to touch.)
        if self.ram is not None:  # and nothing else of this process takes its marks meanwhile
            self._lease_dirty_marks()
        for block in self.ram.blocks if self.ram is not None else ():
            if self.ram_is_zeroed:
                block.dirty.clear_all()
            else:
                block.dirty.mark(0, block.n_pages)
        if config.page_sums and self.ram is not None:  # tracked verification (engine/verify.py)
            self._digests = PieceDigests(self.ram, tracked_piece_pages(config.packet_pages, self.ram))
            self._defer("unlink the digest map", self._digests.close)

    def _channel_spec(self, config: wire.Config, slots: SlotTable, kinds: list[int],
                      per_channel: int) -> ChannelSpec:
        """What each receiving channel process is started with."""
        return ChannelSpec(
            # Local mode: no page comes, so the channels map no RAM (and refuse pages).
            channel_id=0, ram=RamHandle(()) if self.ram is None else self.ram.handle,
            slots=slots.handle, packet_pages=config.packet_pages,
            codec=config.codec, zero_page_detection=config.zero_page_detection,
            delivery_slots=per_channel,
            devices=tuple((d.idstr, d.instance_id) for d in config.devices),
            payload_kinds=tuple(kinds), payload_modules=payload_modules(kinds),
            link=self._link,  # each channel process secures its own socket (TLS: handshakes there)
            digest_map=self._digests.name if self._digests is not None else None,
            piece_pages=self._digests.piece_pages if self._digests is not None else 0,
            limits=wire.packet_limits(config, codecs.codec_entry(config.codec).wire_id,
                                      frames.payload_bound),
        )

    def _start_receiver(self, conn: Connection, slots: SlotTable, devices: list[MigratableDevice]) -> None:
        """Every channel joined: stop listening, start the receiver (the main
        channel's reads, the deliveries to the device loader and the payload
        consumers), → CHANNELS_READY."""
        self._listener.close()  # every channel joined: nobody else may connect
        self._admission.close()
        self._receiver = MultifdReceiver(self._links, self.latch, self.config.stall_timeout_s, slots=slots)
        self._receiver.watch(conn.fileno(), self._main.receive)
        if devices:
            self._start_device_loader(devices)
        for consumer in self.payloads:
            self._receiver.on_delivery(consumer.kind, consumer.on_delivered)
        self._send_message(wire.ChannelsReady())
        conn.settimeout(self.config.stall_timeout_s)  # bounds a send to a peer that stopped reading

    def _start_device_loader(self, devices: list[MigratableDevice]) -> None:
        """Chunks delivered by the channels go to the device-state client's loader."""
        assert self._receiver is not None and self._slots is not None
        self._loader = self._device_loader(devices, self.device_load, self._slots,
                                           self.max_device_buffer)
        self._receiver.on_delivery(packet.PacketKind.DEVICE_STATE, self._loader.on_delivered)
        assert self.negotiated is not None
        iterative = [spec.iterative for spec in self.negotiated.devices]
        if any(iterative):
            self._live_wake = Signal()
            self._defer("close the live-loading signal", self._close_live_wake)
        self._loader.expect_live(iterative, self._live_progress)

    @property
    def _local(self) -> bool:
        return self.negotiated is not None and self.negotiated.local

    def _take_ram(self, handover: wire.RamHandover) -> None:
        """RAM_HANDOVER: map the source's RAM from the descriptors that came with
        it; the source still owns it (teardown before COMMIT only unmaps it)."""
        assert self.negotiated is not None
        fds = self._main.take_fds()
        try:
            blocks = self.negotiated.blocks
            if len(fds) != len(blocks) or len(handover.segments) != len(blocks):
                raise RemoteProtocolError(
                    f"RAM_HANDOVER brought {len(fds)} descriptors and {len(handover.segments)} "
                    f"segment names for {len(blocks)} RAM blocks")
            self.ram = GuestRAM.from_fds([(b.name, b.size) for b in blocks], handover.segments, fds)
        finally:
            for fd in fds:
                os.close(fd)  # the segments keep their own
        self._defer("unmap the RAM handed over", self._release_handed_over_ram)
        self._ram_arrived(self.ram)

    def _ram_arrived(self, ram: GuestRAM) -> None:
        """Tell the VMM (``on_ram``) about the RAM it did not give: created here, or
        handed over.  A hook that raises fails the migration (GuestControlError)."""
        if self._on_ram is not None:
            try:
                self._on_ram(ram)
            except Exception as exc:
                raise GuestControlError(f"on_ram raised {type(exc).__name__}: {exc}") from exc

    def _release_handed_over_ram(self) -> None:
        """Teardown: the source's RAM is unmapped here unless the migration
        committed (then it is ours, and the VMM's to unlink)."""
        if self._committed or self.ram is None:
            return
        ram, self.ram = self.ram, None
        ram.close()

    def _check_config(self, config: wire.Config, hello: packet.ChannelHello) -> str:
        if config.local:
            if not self.accept_local:
                return "local mode (the RAM handed over on this host) is not accepted by this destination"
            if not self.address.startswith("unix://"):
                return f"local mode needs a unix:// listener on this host, not {self.address}"
            if self.ram is not None:
                return ("local mode hands over the source's RAM, but this destination was given "
                        "RAM of its own")
        if config.channel_count != hello.channel_count:
            return f"CONFIG says {config.channel_count} channels, the hello said {hello.channel_count}"
        if config.codec not in codecs.available():
            return f"compression {config.codec!r} is not available on this destination"
        if self.accept_codecs is not None and config.codec not in self.accept_codecs:
            return f"compression {config.codec!r} is not accepted here ({', '.join(self.accept_codecs)} are)"
        theirs = {(d.idstr, d.instance_id) for d in config.devices}
        for idstr, instance in sorted(theirs - set(self.devices)):
            return f"device {idstr!r}/{instance} is on the source only"
        for idstr, instance in sorted(set(self.devices) - theirs):
            return f"device {idstr!r}/{instance} is on the destination only: it would get no state"
        for spec in config.devices:
            here = is_iterative(self.devices[(spec.idstr, spec.instance_id)])
            if spec.iterative and not here:
                return (f"device {spec.idstr!r}/{spec.instance_id} is iterative on the source but "
                        f"not on this destination: it cannot load live state")
            if here and not spec.iterative:
                return (f"device {spec.idstr!r}/{spec.instance_id} is iterative on this destination but "
                        f"not on the source: it would load the source's plain state as live state")
        layout = tuple((b.name, b.size) for b in config.blocks)
        if self.ram is not None and layout != self.ram.layout:
            return f"RAM layout differs: source {list(layout)}, destination {list(self.ram.layout)}"
        return ""

    def _accept_channels(self, main: packet.ChannelHello) -> list[Connection]:
        n = main.channel_count
        joined: dict[int, Connection] = {}
        deadline = time.monotonic() + self.config.handshake_timeout_s
        try:
            while len(joined) < n:
                # Authenticated with this migration's session key over a fresh
                # challenge: a hello of another migration, or a recorded one, fails.
                assert self._conn is not None
                conn, hello, _ = self._admission.next_hello(
                    self._session_key, packet.HelloRole.CHANNEL, deadline,
                    f"{n - len(joined)} of {n} multifd channels", watch=(self._conn, self._source_gone))
                problem = ""
                if hello.migration_id != main.migration_id:
                    problem = f"migration id {hello.migration_id} is not {main.migration_id}"
                elif hello.channel_count != n:
                    problem = f"channel count {hello.channel_count}, expected {n}"
                elif hello.channel_id in joined:
                    problem = f"duplicate channel id {hello.channel_id}"
                elif hello.flags != main.flags:
                    problem = f"channel protection {hello.flags!r}, the main channel's is {main.flags!r}"
                if problem:
                    self._refuse(conn, problem)
                    continue
                joined[hello.channel_id] = conn
        except BaseException:
            for conn in joined.values():
                conn.close()
            raise
        return [joined[i] for i in range(n)]

    def _receive(self, t_start: float, t_setup: float) -> MigrationResult:
        receiver = self._receiver
        assert receiver is not None and self._conn is not None and self.tracker is not None
        order = _main_order(self._local, self._loader is not None, self._live_wake is not None)
        phase = _Phase.PRECOPY
        t_switchover = 0.0
        devices_done: wire.DevicesDone | None = None
        stall = self.config.stall_timeout_s
        watch = ProgressWatch(stall, time.monotonic())  # the channels' bytes move in their processes
        while True:
            self._answer_live()
            message = self._main.poll()  # an ABORT raises the source's error
            if message is None:
                wake = [self._live_wake] if self._live_due and self._live_wake is not None else []
                ready = wait_any([self._conn, *receiver.fds(), *wake], watch.wait_s(time.monotonic()),
                                 self.latch)
                if wake and wake[0] in ready:
                    wake[0].clear()  # seen: the next load's set() wakes the loop again
                if ready:
                    receiver.poll()  # channel reports, and the main channel through its watch
                if watch.look(self.tracker.totals()["wire_bytes"], time.monotonic(), moved=bool(ready)):
                    raise TransportBrokenError(f"nothing came from the source for {stall:.0f} s, "
                                               f"on the main channel or any multifd channel")
                continue
            following = order.get((phase, type(message)))
            if following is None:
                raise _out_of_place(order, phase, message)
            phase = following
            if isinstance(message, wire.Ping):
                self._send_message(wire.Pong(message.token))
            elif isinstance(message, wire.SyncMarker):
                receiver.sync(message.epoch)
                self.tracker.round += 1
            elif isinstance(message, wire.LiveRound):
                self._on_live_round(message)
            elif isinstance(message, wire.Switchover):
                t_switchover = time.perf_counter()
                if not self._local:  # the final round's pages follow (counted as the source does)
                    self.tracker.round += 1
                self._hashed_at_switchover = self._hashing_ns()
                self._machine.fire(MigrationEvent.SWITCHOVER)
            elif isinstance(message, wire.RamHandover):
                self._take_ram(message)
            elif isinstance(message, wire.DevicesDone):
                devices_done = message
            elif isinstance(message, wire.Complete):
                return self._complete(message, t_start, t_setup, t_switchover, devices_done)

    # -- iterative devices in precopy -------------------------------------

    def _on_live_round(self, message: wire.LiveRound) -> None:
        """LIVE_ROUND, right after its round's SYNC_MARKER (so every chunk it counts
        was delivered), in precopy with an iterative device (the main channel's
        order says so): check it; tell how far the loads are, and answer again
        once they catch up."""
        assert self._loader is not None
        self._loader.check_live_round(message.chunks)
        self._live_due = True
        self._ack_due = self._ack_due or message.ack_wanted
        if not self._loader.live_caught_up():
            # How far the loads got, now: the source's estimate needs the load
            # rate before they catch up (the answer proper follows then).
            self._send_message(wire.DevicesLoaded(self._loader.live_loaded()))

    def _answer_live(self) -> None:
        """DEVICES_LOADED (with SWITCHOVER_ACK if one is due), once every device
        loaded what the last LIVE_ROUND counted."""
        if not self._live_due or self._loader is None or not self._loader.live_caught_up():
            return
        self._send_message(wire.DevicesLoaded(self._loader.live_loaded(), self._ack_due))
        self._live_due = self._ack_due = False

    def _live_progress(self) -> None:
        """A device loaded a chunk (a pool thread): wake the main loop."""
        wake = self._live_wake
        if wake is not None:
            wake.set()

    def _close_live_wake(self) -> None:
        wake, self._live_wake = self._live_wake, None
        if wake is not None:
            wake.close()

    def _check_protection(self, hello: packet.ChannelHello) -> None:
        """The source's hello must promise the protection this side requires; a
        side that allows bare links speaks MAC records with a source that sends them."""
        flags, mode = hello.flags, self._link.mode
        if mode == "none" and flags == packet.HelloFlags.MAC:
            self._link = replace(self._link, mode="mac")  # the reply echoes the flag: both switch
        if mode == "tls" and flags != packet.HelloFlags.TLS:
            raise ConfigError("the source does not use TLS, and this destination requires it "
                              "(give the source the TLS files too)")
        if mode != "tls" and flags == packet.HelloFlags.TLS:
            raise ConfigError("the source asks for TLS, and this destination has no TLS files "
                              "(give it --tls-cert, --tls-key, --tls-ca)")
        if mode == "mac" and flags != packet.HelloFlags.MAC:
            raise ConfigError("the source sends without integrity protection (integrity 'none'); "
                              "this destination requires MAC records or TLS")

    def _source_gone(self) -> None:
        """The main channel spoke while channels are awaited: the source says
        nothing there until CHANNELS_READY, so it is an ABORT, its end, or garbage."""
        self._main.receive()
        message = self._main.poll()
        if message is not None:
            raise RemoteProtocolError(f"unexpected {type(message).__name__} from the source in setup")

    def _complete(
        self, message: wire.Complete, t_start: float, t_setup: float, t_switchover: float,
        devices_done: wire.DevicesDone | None,
    ) -> MigrationResult:
        assert self._receiver is not None and self.ram is not None and self.tracker is not None
        self._receiver.wait_all_ended()
        for channel_id, conn in enumerate(self._channel_conns):
            if conn.peek():  # the source sent COMPLETE after END on every channel: nothing follows END
                raise RemoteProtocolError(f"the source sent bytes after END on multifd channel {channel_id}")
        last_epoch = self._receiver.barrier.epochs[0] - 1
        if message.final_epoch != last_epoch:
            raise RemoteProtocolError(
                f"COMPLETE for epoch {message.final_epoch}, channels ended after {last_epoch}"
            )
        if self._loader is not None and devices_done is not None:
            # Every chunk is delivered (END on every channel): wait for the loads, as
            # long as the source waits for PREPARED, and hear it if it gives up first.
            self.device_reports = self._loader.wait_loaded(
                devices_done.devices, until=time.monotonic() + self.config.stall_timeout_s,
                # the source's end (after an ABORT, raised then) ends the wait now; a
                # DIGESTS it sent meanwhile waits in the buffer for its turn
                watch=self._main.receive_if_ready)
        for consumer in self.payloads:
            consumer.finish()  # every payload is delivered too
        t_ready = time.perf_counter()
        verify_s, verified = 0.0, wire.Verification.NOT_CHECKED
        if message.digests_follow:
            t_hash = time.perf_counter()
            if self._digests is not None:  # each piece was hashed as it landed
                ours, chunk = self._digests.digests(), self._digests.chunk
            else:
                ours, chunk = ram_digests(self.ram), DIGEST_CHUNK
            self.ram_digests = ours
            theirs = self._read_message(wire.Digests, time.monotonic() + self.config.stall_timeout_s)
            if theirs.digest_chunk != chunk:
                raise RemoteProtocolError(f"DIGESTS of {theirs.digest_chunk}-byte pieces, "
                                          f"expected {chunk}")
            detail = compare_digests(self.ram, chunk, ours, theirs.digests)
            verify_s = time.perf_counter() - t_hash
            if self._digests is not None:  # the pieces hashed as they landed after SWITCHOVER
                verify_s += self._hashing_since(self._hashed_at_switchover)
            if detail:
                # Before PREPARED: nothing commits, and RESUMED never says "different".
                raise VerificationError(f"destination memory differs from the source: {detail}")
            verified = wire.Verification.EQUAL
        if self.dump_dir:
            dump_ram(self.ram, os.path.join(self.dump_dir, "dest.ram"))
        # Everything is in place and the guest has not run: the source may commit.
        self._send_message(wire.Prepared())
        self._read_message(wire.Commit, time.monotonic() + self.config.stall_timeout_s)
        self._commit()  # from here on this side owns the VM, whatever happens
        if self._local:
            self.ram.adopt()  # the source gave it up before it sent COMMIT
        resume_error = self._start_guest()
        downtime_s = time.perf_counter() - t_switchover
        try:
            self._send_message(wire.Resumed(int(downtime_s * 1e6), int(verify_s * 1e6), verified,
                                            str(resume_error or "")[:1000], self.running))
        except MigrationError as exc:
            # Committed all the same: the source will report an unknown outcome and
            # keep its guest paused until its VMM asks us.
            log.warning("committed, but could not tell the source: %s", exc)
        if resume_error is not None:
            raise resume_error
        self._machine.fire(MigrationEvent.COMPLETE)
        t_end = time.perf_counter()
        assert self.negotiated is not None
        return self._result(
            t_start, t_setup, t_ready, t_end,  # moved: every page is in place
            downtime_ms=downtime_s * 1000,
            rounds=self.tracker.round,
            compression=self.negotiated.codec,
            verified=True if verified is wire.Verification.EQUAL else None,
            verify_time_ms=verify_s * 1000,
            extra={"running": self.running, **({"local": True} if self._local else {}),
                   **verification_extra(message.digests_follow, self._digests is not None)},
        )

    def _start_guest(self) -> GuestControlError | None:
        """After the commit: resume the guest, unless autostart is off.  A resume
        that raises is returned, to be raised once the source has been told."""
        if not self.autostart:
            return None
        if self._resume_guest is not None:
            try:
                self._resume_guest()
            except Exception as exc:
                error = GuestControlError(
                    f"committed, but resume_guest raised {type(exc).__name__}: {exc}: the guest is "
                    f"NOT running; its RAM and devices are in place (this side owns them)")
                error.__cause__ = exc
                return error
        self.running = True
        return None


    # -- helpers -----------------------------------------------------------

    def _refuse(self, conn: Connection, why: str) -> None:
        conn.close()
        if len(self.refused) < REFUSALS_KEPT:
            self.refused.append(why)
        now = time.monotonic()
        start, logged, quiet = self._refusals_window
        if now - start >= REFUSAL_WINDOW_S:
            self._log_quiet_refusals()
            start, logged, quiet = now, 0, 0
        if logged < REFUSALS_LOGGED:
            log.warning("refused a connection from %s: %s", conn.peer, why)
            logged += 1
            if logged == REFUSALS_LOGGED:
                log.warning("further refusals in these %.0f s are only counted", REFUSAL_WINDOW_S)
        else:
            quiet += 1
        self._refusals_window = (start, logged, quiet)

    def _log_quiet_refusals(self) -> None:
        """One line for the refusals of the window that were only counted."""
        start, logged, quiet = self._refusals_window
        if quiet:
            log.warning("refused %d more connection(s) in %.0f s (after %d logged one by one)",
                        quiet, REFUSAL_WINDOW_S, logged)
            self._refusals_window = (start, logged, 0)

    def _free_created_ram(self) -> None:
        """Teardown: the RAM this side created goes, unless the migration committed
        (then the guest is ours, running or not, and its RAM is the VMM's)."""
        if self._committed or self.ram is None:
            return
        ram, self.ram = self.ram, None
        ram.close()
        ram.unlink()
