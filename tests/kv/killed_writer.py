"""A writer process for the crash tests: it publishes entries and is SIGKILLed by the test.

    killed_writer.py disk|shared DIR mid-write|before-rename   stall there (prints "stalled")
    killed_writer.py disk|shared DIR loop                      publish entries until killed
    killed_writer.py redis URL mid-write                       half a SET on the wire, stall

The stall modes hold the writer at a chosen point of `write_atomic` by wrapping the system
call it makes there, so the kill lands exactly mid-write or between fsync and rename.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from urllib.parse import urlparse

from soberana.kv.disk_tier import DiskTier
from soberana.kv.entry import encode_entry
from soberana.kv.shared_dir_tier import SharedDirTier
from tests.kv.helpers import big_layout, make_hashes


def stall() -> None:
    print("stalled", flush=True)
    time.sleep(600)


def main(kind: str, where: str, mode: str) -> None:
    layout = big_layout()
    keys = make_hashes(layout, 300)
    payload = os.urandom(layout.block_nbytes)
    if kind == "redis":
        # Raw RESP, so that exactly half of the value is sent before the stall.
        entry = encode_entry(layout, keys[0], payload)
        key = f"soberana:kv:{layout.namespace}:{keys[0].hex()}".encode()
        url = urlparse(where)
        conn = socket.create_connection((url.hostname, url.port))
        head = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, len(entry))
        conn.sendall(head + entry[: len(entry) // 2])
        stall()
    tier = (
        DiskTier(where, 1 << 40, layout)
        if kind == "disk"
        else SharedDirTier(where, 1 << 40, layout)
    )
    if mode == "mid-write":
        real_write = os.write

        def half_write(fd: int, data) -> int:
            real_write(fd, bytes(data[: len(data) // 2]))
            stall()
            return 0

        os.write = half_write
    elif mode == "before-rename":
        os.fsync = lambda fd: stall()
    for i, key in enumerate(keys):
        tier.put(key, encode_entry(layout, key, payload))
        if i == 0:
            print("published", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
