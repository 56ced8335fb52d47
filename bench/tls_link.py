"""Where TLS's CPU goes: one link alone, no migration around it.

A sender process writes guest RAM (engine/shm.py, random pages) to a receiver
process that reads it into fresh guest RAM (both attached with their page tables
built first, as channels map RAM), over tcp
loopback, through the engine's own link code (``engine.link.secure``: the
connections a multifd channel uses), in packets of ``--packet`` bytes, each a
64-byte header and one view of memory (``send_buffers`` / ``recv_into_buffers``).
Modes, rotating each repetition:

* **bare** — the plain socket connection;
* **tls** — TLS 1.3 as a migration sets it up (the suite OpenSSL picks);
* **tls-aes128** — the same, the receiver and sender processes started with an
  ``OPENSSL_CONF`` whose ``Ciphersuites`` line offers only TLS_AES_128_GCM_SHA256
  (only those two processes see it).

After each transfer (off the clock) each side hashes its memory, and the run
fails if the receiver's differs from the sender's.

Prints the medians of each side's CPU seconds per GiB (``time.process_time``
around the transfer) and of the rate, each mode's CPU against bare in the same
run, and the suite each TLS mode negotiated; writes every run to JSON.

    python bench/tls_link.py [--size 256M] [--packet 16M] [--repeat 5]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.remote import write_report  # noqa: E402
from clients.guest import fill_ram  # noqa: E402
from engine.cli import parse_size  # noqa: E402
from engine.link import LinkSecurity, TlsConfig, secure  # noqa: E402
from engine.shm import GuestRAM, RamHandle  # noqa: E402
from engine.transport import Connection  # noqa: E402
from tests.certs import Pki, make_pki  # noqa: E402

MODES = ("bare", "tls", "tls-aes128")
AES128_CONF = """openssl_conf = conf
[conf]
ssl_conf = ssl
[ssl]
system_default = tls
[tls]
Ciphersuites = TLS_AES_128_GCM_SHA256
"""
HEADER = bytes(64)


def _side(receiver: bool, sock: socket.socket, tls: TlsConfig | None, handle: RamHandle,
          size: int, step: int, out: Any) -> None:
    """One end: secure the socket as a channel would, move `size` bytes, then (off
    the clock) hash its memory."""
    with GuestRAM.attach(handle, populate=True) as ram:
        view = ram.blocks[0].pages
        conn = Connection(sock)
        if tls is not None:
            link = LinkSecurity("tls", server_side=receiver, tls=tls,
                                peer_name="source.test" if receiver else "localhost", peer="peer")
            conn = secure(conn, link, 0)
        cpu, wall = time.process_time(), time.perf_counter()
        for offset in range(0, size, step):
            if receiver:
                conn.recv_exact(len(HEADER))
                conn.recv_into_buffers([view[offset:offset + step]])
            else:
                conn.send_buffers([HEADER, view[offset:offset + step]])
        if receiver:
            conn.send_all(b"k")  # everything is in: the sender's clock stops on this
        else:
            conn.recv_exact(1)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        cipher = conn.sock.cipher() if tls is not None else None  # type: ignore[attr-defined]
        conn.close()
        digest = hashlib.sha256(view[:size]).hexdigest()
        del view
    out.send({"cpu_s": cpu, "wall_s": wall, "suite": cipher[0] if cipher else None, "sha256": digest})
    out.close()


def transfer(pki: Pki, mode: str, src: RamHandle, dst: RamHandle, size: int, step: int,
             conf: str) -> dict[str, Any]:
    """One transfer src -> dst (fresh: nothing of an earlier transfer in it) in
    `mode`; both sides' figures.  Raises RuntimeError if dst's memory is not src's."""
    ctx = multiprocessing.get_context("spawn")  # fresh processes: OPENSSL_CONF is read at start
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    tls = mode != "bare"
    saved = os.environ.get("OPENSSL_CONF")
    procs, pipes = [], []
    try:
        if mode == "tls-aes128":
            os.environ["OPENSSL_CONF"] = conf
        for receiver, sock in ((True, server), (False, client)):
            mine, theirs = ctx.Pipe(duplex=False)
            config = (pki.config("dest", peer_name="source.test") if receiver
                      else pki.config("source", peer_name="localhost")) if tls else None
            proc = ctx.Process(target=_side, args=(receiver, sock, config, dst if receiver else src,
                                                   size, step, theirs))
            proc.start()
            theirs.close()
            procs.append(proc)
            pipes.append(mine)
    finally:
        if saved is None:
            os.environ.pop("OPENSSL_CONF", None)
        else:
            os.environ["OPENSSL_CONF"] = saved
        server.close()
        client.close()
    try:
        results = [pipe.recv() if pipe.poll(120) else None for pipe in pipes]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for pipe in pipes:
            pipe.close()
    receive, send = results
    if receive is None or send is None:
        raise RuntimeError(f"a {mode} side did not report (see its traceback above)")
    if receive["sha256"] != send["sha256"]:
        raise RuntimeError(f"{mode}: the receiver's memory differs from the sender's")
    gib = size / 2**30
    return {"gb_per_s": size / max(receive["wall_s"], send["wall_s"]) / 1e9,
            "send_cpu_s_per_gib": send["cpu_s"] / gib, "recv_cpu_s_per_gib": receive["cpu_s"] / gib,
            "suite": send["suite"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("256M"))
    parser.add_argument("--packet", type=parse_size, default=parse_size("16M"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default="bench/results/tls_link.json")
    args = parser.parse_args()
    step = min(args.packet, args.size)
    size = args.size - args.size % step
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with GuestRAM.create({"pc.ram": size}) as src, \
            tempfile.TemporaryDirectory(prefix="mfd-bench-pki-") as where:
        fill_ram(src, "random", seed=7)
        pki = make_pki(Path(where))
        conf = Path(where) / "aes128.cnf"
        conf.write_text(AES128_CONF)
        for rep in range(args.repeat):
            for mode in MODES[rep % 3:] + MODES[:rep % 3]:
                with GuestRAM.create({"pc.ram": size}, prealloc=True) as dst:  # all zero
                    runs[mode].append(transfer(pki, mode, src.handle, dst.handle, size, step,
                                               str(conf)))

    print(f"{size / 2**30:.2f} GiB over one tcp loopback link, {step >> 20} MiB packets, "
          f"{args.repeat} runs, medians; CPU: each side's process, seconds per GiB")
    report: dict[str, Any] = {"size": size, "packet": step, "repeat": args.repeat, "cases": []}
    bare_cpu = statistics.median(r["send_cpu_s_per_gib"] + r["recv_cpu_s_per_gib"] for r in runs["bare"])
    bare_rate = statistics.median(r["gb_per_s"] for r in runs["bare"])
    for mode in MODES:
        rate = statistics.median(r["gb_per_s"] for r in runs[mode])
        send = statistics.median(r["send_cpu_s_per_gib"] for r in runs[mode])
        recv = statistics.median(r["recv_cpu_s_per_gib"] for r in runs[mode])
        total = statistics.median(r["send_cpu_s_per_gib"] + r["recv_cpu_s_per_gib"] for r in runs[mode])
        suite = runs[mode][0]["suite"] or "-"
        print(f"  {mode:10}  {rate:5.2f} GB/s (x{rate / bare_rate:4.2f})  CPU send {send:4.2f}  "
              f"receive {recv:4.2f}  both {total:4.2f} (x{total / bare_cpu:4.2f} bare)  {suite}")
        report["cases"].append({"mode": mode, "gb_per_s": rate, "send_cpu_s_per_gib": send,
                                "recv_cpu_s_per_gib": recv, "cpu_to_bare": total / bare_cpu,
                                "suite": runs[mode][0]["suite"], "runs": runs[mode]})
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
