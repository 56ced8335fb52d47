"""The one exception tree of multifd.

Every error the engine raises derives from :class:`MigrationError`::

    MigrationError
    ├── ProtocolError
    │   ├── LocalProtocolError        we were about to break the protocol (a bug)
    │   └── RemoteProtocolError       the peer sent something invalid
    │       ├── HandshakeError        a hello that must not join a migration
    │       │   └── TlsError          a TLS handshake or record failed (certificates)
    │       └── IntegrityError        a record's MAC did not match: bytes changed in flight
    ├── TransportError
    │   ├── TransportClosedError      the peer closed the connection
    │   └── TransportBrokenError      reset, timeout, refused: the link failed
    ├── PoolError
    │   ├── BrokenPoolError           an earlier failure broke the pool
    │   └── WorkerCrashedError        a worker process died (exit code attached)
    ├── CompressionError
    ├── DeviceStateError
    ├── SnapshotError                 a snapshot file could not be written or read
    │   └── SnapshotFormatError       not a snapshot, or a damaged one: refused before loading
    ├── ConfigError                   invalid or mismatched configuration
    ├── ConvergenceError              precopy did not converge in the allowed rounds
    ├── VerificationError             destination memory differs from the source's
    ├── GuestControlError             pause_guest / resume_guest raised: says where the guest is
    ├── OutcomeUnknownError           the source sent COMMIT but never heard back: guest paused
    ├── CancelledError                the migration was cancelled
    ├── WaitTimeout                   wait(timeout) returned before the operation ended (a TimeoutError too)
    └── RemoteTraceback               (a cause, never raised) another process's traceback

Errors cross process boundaries (channel processes report them to the main
process), so every class pickles with its arguments intact.  Always raise with
``raise NewError(...) from cause`` so the first cause stays attached.
"""

from __future__ import annotations


class MigrationError(Exception):
    """Root of every error raised by multifd."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # The default reduction re-calls __init__ with self.args, which breaks
        # for subclasses whose __init__ takes other arguments; keep the state
        # explicitly so every subclass round-trips through pickle.
        return (_rebuild, (type(self), self.args, self.__dict__.copy()))


def _rebuild(cls: type[MigrationError], args: tuple, state: dict) -> MigrationError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class ProtocolError(MigrationError):
    """A violation of the multifd wire protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid packet or message."""


class HandshakeError(RemoteProtocolError):
    """A connection's hello was refused (magic, version, auth, UUID, channel id)."""


class IntegrityError(RemoteProtocolError):
    """Bytes after the handshake failed their check: a record's MAC did not match
    (a bit changed in flight, or bytes were inserted, dropped or reordered)."""


class TlsError(HandshakeError):
    """A TLS handshake or TLS record failed: a certificate refused on either side
    (expired, unknown CA, wrong name, none sent), or a record that does not decrypt."""


class TransportError(MigrationError):
    """Moving bytes over a transport failed."""


class TransportClosedError(TransportError):
    """The peer closed the connection (cleanly or in the middle of a packet)."""


class TransportBrokenError(TransportError):
    """The connection failed: reset, refused, timed out, unreachable."""


class PoolError(MigrationError):
    """A worker pool could not run a job."""


class BrokenPoolError(PoolError):
    """The pool is broken by an earlier failure (kept as ``__cause__``)."""


class WorkerCrashedError(PoolError):
    """A worker process died while it ran a job."""

    def __init__(self, message: str, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode


class CompressionError(MigrationError):
    """A codec failed, or a payload decompressed to the wrong size."""


class DeviceStateError(MigrationError):
    """A device's state stream was malformed, or its save or load failed."""


class SnapshotError(MigrationError):
    """A snapshot file could not be written, made durable or read."""


class SnapshotFormatError(SnapshotError):
    """The file is not a multifd snapshot, or a damaged or incomplete one."""


class ConfigError(MigrationError):
    """Invalid parameters, or a configuration the two sides do not share."""


class ConvergenceError(MigrationError):
    """Precopy did not converge within the allowed number of rounds."""


class VerificationError(MigrationError):
    """The destination's memory does not equal the source's at switchover."""


class GuestControlError(MigrationError):
    """A VMM hook that drives the guest raised: ``pause_guest``, ``resume_guest``,
    ``throttle_guest`` or the ``dirty_source``.

    The message says what state the guest was left in ("still running" after a
    failed pause, "NOT running" after a failed resume); the callback's exception
    is the ``__cause__``.
    """


class OutcomeUnknownError(MigrationError):
    """Source only: COMMIT was handed to the destination, but its answer never came.

    The destination may or may not own the VM now, so the source guest stays
    paused (it must never run twice).  Ask the destination whether migration
    ``migration_id`` committed, then call ``SourceMigration.settle()``.
    """


class CancelledError(MigrationError):
    """The migration (or a pool job) was cancelled."""


class WaitTimeout(MigrationError, TimeoutError):
    """``Operation.wait(timeout)`` ran out of time; the operation goes on (wait
    again, or cancel it).  Also a TimeoutError, as ``Future.result`` raises."""


class RemoteTraceback(MigrationError):
    """The formatted traceback of an exception raised in another process.

    Never raised: a worker pool attaches it as ``__cause__`` of an exception that
    crossed a process boundary (pickling drops tracebacks), so the remote frames
    print under "The above exception was the direct cause of ...".
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'



# Classes whose meaning is this side's own state (where its guest is, what it
# committed): the peer's use of them says nothing of ours, so they arrive plain.
_LOCAL_MEANING = (RemoteTraceback, GuestControlError, OutcomeUnknownError, WaitTimeout)


def remote_error(name: str, message: str) -> MigrationError:
    """The error a peer reported (an ABORT names the class): an instance of the
    class of this tree called `name`, or a plain MigrationError for any other name."""
    found = globals().get(name)
    if not (isinstance(found, type) and issubclass(found, MigrationError)) or found in _LOCAL_MEANING:
        found = MigrationError
    return _rebuild(found, (message,), {})
