"""Configuration of an operation: what is negotiated and what is local.

:class:`MigrationConfig` is what a source (or a snapshot save or restore) is
given.  Its fields are of three sorts::

    NEGOTIATED    the source chooses, the destination follows: sent in CONFIG
                  (channels, packet_pages, compression, compression_level,
                  zero_page_detection, local) or in COMPLETE (verify)
    SOURCE_LOCAL  shape the source's rounds and connections only (downtime limit,
                  rounds, bandwidth cap, connect timeout, auto-converge)
    SHARED_LOCAL  each side's own: its handshake and stall timeouts, how its
                  channel processes start and how long it waits for them to stop,
                  and what protects a link without TLS (``integrity``: the source
                  says what it sends in its hello, the destination what it accepts)

A destination is given a :class:`DestinationConfig`: the SHARED_LOCAL fields,
nothing else.  A :class:`MigrationConfig` handed to a destination still works
(the destination takes :meth:`MigrationConfig.for_destination`), but not
silently: the fields it set that a destination cannot use are named in a
warning (the source decides them).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Protocol, Self

from engine import codecs
from engine.errors import ConfigError
from engine.wire import packet


class LocalConfig(Protocol):
    """What every operation reads of its configuration (engine/operation.py)."""

    @property
    def handshake_timeout_s(self) -> float: ...
    @property
    def stall_timeout_s(self) -> float: ...
    @property
    def start_method(self) -> str: ...
    @property
    def cancel_grace_s(self) -> float: ...
    @property
    def integrity(self) -> Literal["mac", "none"]: ...

    def validate(self) -> Self: ...


def _check_types(config: Any) -> None:
    """Each field of the dataclass `config` holds what its annotation says (a JSON
    or YAML config file gives 2.0 for 2, "2" for 2, inf for "no limit"): ConfigError
    naming the first that does not.  bool is not taken for int or float."""
    for spec in fields(config):
        value, kind = getattr(config, spec.name), str(spec.type)
        if value is None and kind.endswith("| None"):
            continue
        if kind.startswith("int"):
            ok, want = type(value) is int, "a whole number"
        elif kind.startswith("float"):
            ok = type(value) in (int, float) and math.isfinite(value)
            want = "a finite number"
        elif kind == "bool":
            ok, want = type(value) is bool, "True or False"
        elif kind == "str" or kind.startswith("Literal"):
            ok, want = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise ConfigError(f"{spec.name} must be {want}, got {value!r}")


def _check_local(config: LocalConfig) -> None:
    if config.integrity not in ("mac", "none"):
        raise ConfigError(f"integrity must be 'mac' or 'none', not {config.integrity!r}")
    for name in ("handshake_timeout_s", "stall_timeout_s", "cancel_grace_s"):
        if not getattr(config, name) > 0:
            raise ConfigError(f"{name} must be a positive number of seconds")
    if config.start_method not in ("spawn", "forkserver", "fork"):
        raise ConfigError(f"start_method must be spawn, forkserver or fork, not {config.start_method!r}")


@dataclass(frozen=True)
class DestinationConfig:
    """A destination's own settings; everything else is the source's to choose
    and arrives in CONFIG (see the module's docstring)."""

    handshake_timeout_s: float = 10.0
    stall_timeout_s: float = 60.0           # no progress for this long fails the migration
    start_method: str = "forkserver"        # how channel processes start (engine/pool/_forkserver.py)
    cancel_grace_s: float = 1.0             # then channel processes that do not stop are killed
    # Without TLS, every byte after the hellos travels in MAC records; "none" also
    # accepts a source that sends without them (a trusted link; docs/wire-format.md §1.1).
    integrity: Literal["mac", "none"] = "mac"

    def validate(self) -> DestinationConfig:
        """Return self, or raise ConfigError naming the bad field."""
        _check_types(self)
        _check_local(self)
        return self

    def with_(self, **changes: Any) -> DestinationConfig:
        return replace(self, **changes).validate()


@dataclass(frozen=True)
class MigrationConfig:
    """What the source (or a snapshot) is given; the NEGOTIATED part goes to the
    destination in CONFIG, which checks it fits (CONFIG_ACK)."""

    channels: int = 2
    packet_pages: int = 4096                # 16 MiB per packet: see docs/architecture.md
    downtime_limit_ms: float = 300.0
    max_rounds: int = 30
    on_max_rounds: Literal["switchover", "fail"] = "switchover"
    verify: bool = False                    # hash both memories at switchover and compare
    compression: str = "none"               # none, lz4, zstd, zlib (engine/codecs.py)
    compression_level: int | None = None    # None: the codec's default
    zero_page_detection: bool = True
    max_bandwidth: float | None = None      # bytes/s over all channels together; None: no cap
    connect_timeout_s: float = 10.0
    handshake_timeout_s: float = 10.0
    stall_timeout_s: float = 60.0           # no progress for this long fails the migration
    start_method: str = "forkserver"        # how channel processes start (engine/pool/_forkserver.py)
    cancel_grace_s: float = 1.0             # then channel processes that do not stop are killed
    # Without TLS: "mac" sends every byte after the hellos in MAC records (the
    # default); "none" sends the bare stream, which a destination takes only when
    # its own integrity is "none" (a trusted link).  With TLS, TLS protects them.
    integrity: Literal["mac", "none"] = "mac"
    # Auto-converge (QEMU's): when a precopy round leaves more than
    # throttle_trigger_pct of its pages dirty again for the next one, the source
    # asks its VMM to throttle the guest (SourceMigration's throttle_guest):
    # first throttle_initial_pct, then throttle_step_pct more each such round, at
    # most throttle_max_pct; back to 0 once the guest is paused.  That is
    # throttle_policy "step"; "rate" (engine/converge.py) measures the guest's
    # dirty rate from peeks at the count dirty_sample_ms (of guest running time),
    # 2x, 4x, ... after each collect, throttles as soon as that rate says rounds
    # cannot shrink, and as hard as it takes to reach the downtime limit in
    # throttle_rounds rounds (stepping while no rate is known).
    auto_converge: bool = False
    throttle_trigger_pct: int = 50          # QEMU's throttle-trigger-threshold
    throttle_initial_pct: int = 20
    throttle_step_pct: int = 10
    throttle_max_pct: int = 99
    throttle_policy: Literal["rate", "step"] = "rate"
    throttle_rounds: int = 2
    dirty_sample_ms: float = 5.0
    # Same-host mode (docs/architecture.md, "Local mode"): over unix:// only, the
    # paused guest's RAM is handed to the destination as descriptors; no page is sent.
    local: bool = False

    def validate(self) -> MigrationConfig:
        """Return self, or raise ConfigError naming the bad field."""
        _check_types(self)
        if not 1 <= self.channels <= packet.MAX_CHANNELS:
            raise ConfigError(f"channels must be 1..{packet.MAX_CHANNELS}, got {self.channels}")
        if not 1 <= self.packet_pages <= packet.MAX_PACKET_PAGES:
            raise ConfigError(f"packet_pages must be 1..{packet.MAX_PACKET_PAGES}")
        if not self.downtime_limit_ms >= 0:
            raise ConfigError("downtime_limit_ms must be a non-negative number")
        if not self.connect_timeout_s > 0:
            raise ConfigError("connect_timeout_s must be a positive number of seconds")
        _check_local(self)
        if self.max_rounds < 1:
            raise ConfigError("max_rounds must be at least 1")
        if self.on_max_rounds not in ("switchover", "fail"):
            raise ConfigError("on_max_rounds must be 'switchover' or 'fail'")
        codecs.make_codec(self.compression, self.compression_level)  # raises ConfigError
        if self.max_bandwidth is not None and not self.max_bandwidth > 0:
            raise ConfigError("max_bandwidth must be a positive number of bytes/s, or None")
        for name in ("throttle_trigger_pct", "throttle_initial_pct", "throttle_step_pct",
                     "throttle_max_pct"):
            value = getattr(self, name)
            if not 1 <= value <= 99:
                raise ConfigError(f"{name} must be a whole percentage in 1..99, got {value!r}")
        if self.throttle_policy not in ("rate", "step"):
            raise ConfigError(f"throttle_policy must be 'rate' or 'step', got {self.throttle_policy!r}")
        if not 1 <= self.throttle_rounds <= 10:
            raise ConfigError(f"throttle_rounds must be a whole number in 1..10, "
                              f"got {self.throttle_rounds!r}")
        if not 0 < self.dirty_sample_ms <= 1000:
            raise ConfigError(f"dirty_sample_ms must be in (0, 1000], got {self.dirty_sample_ms!r}")
        if self.throttle_initial_pct > self.throttle_max_pct:
            raise ConfigError(f"throttle_initial_pct ({self.throttle_initial_pct}) is above "
                              f"throttle_max_pct ({self.throttle_max_pct})")
        return self

    def with_(self, **changes: Any) -> MigrationConfig:
        return replace(self, **changes).validate()

    def for_destination(self) -> DestinationConfig:
        """The part of this configuration a destination uses."""
        return DestinationConfig(**{name: getattr(self, name) for name in SHARED_LOCAL})

    def unused_by_destination(self) -> dict[str, Any]:
        """The fields set (other than their defaults) that a destination does not use."""
        default = MigrationConfig()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in SHARED_LOCAL and getattr(self, f.name) != getattr(default, f.name)}


NEGOTIATED = frozenset({"channels", "packet_pages", "compression", "compression_level",
                        "zero_page_detection", "verify", "local"})
SHARED_LOCAL = frozenset(f.name for f in fields(DestinationConfig))
SOURCE_LOCAL = frozenset(f.name for f in fields(MigrationConfig)) - NEGOTIATED - SHARED_LOCAL


def source_config(config: object) -> MigrationConfig:
    """A source's or a snapshot's `config`: the defaults for None; ConfigError
    for anything but a MigrationConfig."""
    if config is None:
        return MigrationConfig()
    if not isinstance(config, MigrationConfig):
        raise ConfigError(f"config must be a MigrationConfig, not {type(config).__name__}")
    return config


def check_argument(name: str, value: object, ok: bool, wanted: str) -> None:
    """ConfigError unless `ok`: a constructor's argument `name` is not `wanted`."""
    if not ok:
        raise ConfigError(f"{name} must be {wanted}, not {value!r}"[:300])


def check_hooks(**hooks: object) -> None:
    """ConfigError for a VMM hook (pause_guest, ...) that is neither callable nor None."""
    for name, hook in hooks.items():
        check_argument(name, hook, hook is None or callable(hook), "callable or None")


def check_path(name: str, value: object) -> None:
    check_argument(name, value, isinstance(value, (str, os.PathLike)), "a file path")
