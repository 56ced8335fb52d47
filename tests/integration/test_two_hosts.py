"""Two hosts for real: `multifd listen` in one network namespace, `multifd migrate`
in another, joined by a veth pair whose rate the kernel sets (tc tbf), over plain
TCP (MAC records) and over TLS 1.3.  The bytes are seen to cross the veth (its
counters), not loopback; namespaces, pair and processes are gone afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from engine.sync import wait_readable
from tests.certs import NoOpenssl, Pki, make_pki
from tests.integration.test_cli import MULTIFD
from tests.netns import Hosts, two_hosts, unavailable

WHY_NOT = unavailable()
pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=f"two namespaces: {WHY_NOT}")
RAM = 24 << 20


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    with two_hosts(rate="1gbit") as made:
        yield made


def tx_bytes(hosts: Hosts) -> int:
    device = f"{hosts.source[:-1]}a"
    done = subprocess.run(hosts.run(hosts.source, "cat", f"/sys/class/net/{device}/statistics/tx_bytes"),
                          capture_output=True, text=True, check=True, timeout=10)
    return int(done.stdout)


def migrate_between(hosts: Hosts, listen_args: list[str], migrate_args: list[str],
                    scheme: str = "tcp") -> tuple[dict, dict]:
    env = {**os.environ, "MULTIFD_SECRET": "two-hosts"}
    listen = subprocess.Popen(
        hosts.run(hosts.destination, *MULTIFD, "listen", "--address",
                  f"{scheme}://{hosts.destination_ip}:0", "--accept-timeout", "60", "--json",
                  *listen_args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert listen.stderr is not None
        line = listen.stderr.readline() if wait_readable([listen.stderr], 60) else ""
        assert line.startswith(f"LISTENING {scheme}://{hosts.destination_ip}:"), line
        source = subprocess.run(
            hosts.run(hosts.source, *MULTIFD, "migrate", "--to", line.split()[1], "--ram", str(RAM),
                      "--channels", "2", "--json", *migrate_args),
            capture_output=True, text=True, env=env, timeout=120)
        out, err = listen.communicate(timeout=60)
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.communicate()
    assert source.returncode == 0, source.stderr
    assert listen.returncode == 0, err
    return json.loads(source.stdout), json.loads(out)


def check(hosts: Hosts, before: int, source: dict, destination: dict) -> None:
    assert source["status"] == destination["status"] == "completed"
    assert source["verified"] is True and destination["committed"] is True
    assert tx_bytes(hosts) - before >= RAM  # every page went over the veth


def test_two_hosts_over_tcp(hosts: Hosts) -> None:
    before = tx_bytes(hosts)
    check(hosts, before, *migrate_between(hosts, [], []))


@pytest.mark.heavy
def test_two_hosts_over_tls(hosts: Hosts, tmp_path) -> None:
    try:
        pki: Pki = make_pki(tmp_path / "pki")
    except NoOpenssl as exc:
        pytest.skip(str(exc))
    files = lambda who: ["--tls-cert", str(pki.dir / f"{who}.pem"), "--tls-key",  # noqa: E731
                         str(pki.dir / f"{who}.key"), "--tls-ca", str(pki.dir / "ca.pem")]
    before = tx_bytes(hosts)
    check(hosts, before, *migrate_between(
        hosts, [*files("dest"), "--tls-peer-name", "source.test"],
        [*files("source"), "--tls-peer-name", "localhost"], scheme="tls"))


def test_the_namespaces_are_gone_afterwards() -> None:
    with two_hosts() as made:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert made.source in names and made.destination in names
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert made.source not in names and made.destination not in names
