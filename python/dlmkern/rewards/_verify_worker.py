"""One math-verify worker process (SPEC 5): `dlmkern.rewards.pool` starts a fresh interpreter
(`python -c BOOT FD`, never a fork of the trainer) that runs this file with
`runpy.run_path(this file, run_name=RUN_NAME)`; FD is its end of a socket to the trainer.

It imports nothing from dlmkern: importing the package pulls in torch (~4 s and ~0.8 GB per
worker); math-verify alone is ~0.7 s and ~60 MB. Protocol on the pipe: the worker first sends
None (ready) or an error string (math-verify cannot be imported), then answers each (gold, pred)
with a bool. It has no timeout of its own: the pool kills it when an answer takes too long.
"""

RUN_NAME = "__dlmkern_verify_worker__"


def _watch_parent(interval: float = 1.0) -> None:
    """Exits when the trainer is gone, even while an answer keeps the main thread busy."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _check(parse, verify, gold, pred) -> bool:
    try:
        return bool(verify(parse(f"${gold}$", parsing_timeout=None),
                           parse(f"${pred}$", parsing_timeout=None), timeout_seconds=None))
    except Exception:  # noqa: BLE001 - any failure to parse or compare scores 0
        return False


def serve(conn):
    import logging
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's; it stops us
    _watch_parent()
    logging.disable(logging.WARNING)  # math-verify warns that its own timeout is off: it is ours
    try:
        from math_verify import parse, verify
    except Exception as e:  # noqa: BLE001 - reported to the trainer, which raises it
        conn.send(f"dlmkern math reward: math-verify cannot be imported in the worker ({e!r}); "
                  "pip install math-verify")
        return
    conn.send(None)
    while True:
        try:
            gold, pred = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(_check(parse, verify, gold, pred))


if __name__ == RUN_NAME:
    import sys
    from multiprocessing.connection import Connection

    serve(Connection(int(sys.argv[1])))
