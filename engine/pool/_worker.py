"""The main loop of a process-pool worker (runs in the worker process)."""

from __future__ import annotations

import os
import signal
import socket
import traceback
from collections.abc import Mapping

from engine.errors import PoolError
from engine.pool._frames import FRAME, FrameReader, JobUnpickler, encode_reply


def run_job(payload: bytes, fds: list[int]) -> bytes:
    """Unpickle and run one job; answer its encoded outcome.  The job's sockets (and
    token views) are closed when it returns."""
    adopted: list[socket.socket] = []
    try:
        try:
            fn, args, kwargs = JobUnpickler(payload, fds, adopted).load()
        except Exception as exc:
            raise PoolError("the worker could not unpickle the job") from exc
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
        result = fn(*args, **kwargs)
    except BaseException as exc:  # a job's failure, whatever it is, belongs in its future
        return encode_reply(False, exc, "".join(traceback.format_exception(exc)))
    finally:
        for sock in adopted:  # the job's copies: the job has them while it runs
            sock.close()
    return encode_reply(True, result, None)


def worker_main(control: socket.socket, env: Mapping[str, str]) -> None:
    """Main of a worker process: run jobs from `control` until it reaches EOF.

    `env`: the pool's worker environment, set here for names the environment lacks
    (a spawned worker started with it already; a forked one gets it now, in itself only).
    """
    for name, value in env.items():
        os.environ.setdefault(name, value)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner handles Ctrl-C, and cancels us
    control.setblocking(True)
    reader = FrameReader()
    try:
        while True:
            frame = reader.next_frame()
            if frame is None:
                if not reader.receive(control):
                    return  # EOF: the pool stopped us, or the owner died
                continue
            job_id, payload, fds = frame
            reply = run_job(payload, fds)
            del payload, fds
            control.sendall(FRAME.pack(job_id, len(reply), 0) + reply)
    except (BrokenPipeError, ConnectionResetError):
        return  # the owner is gone: nobody to report to
    finally:
        reader.close()
        control.close()
