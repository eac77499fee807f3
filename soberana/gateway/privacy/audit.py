"""A hash-chained, append-only audit log: one JSON line per request, never a PII value.

Each record carries `seq`, the `prev` record's hash and its own `hash` =
sha256(prev || canonical JSON of the record without hash/sig); with a key, `sig` =
HMAC-SHA256(key, hash). Removing, editing or reordering a line breaks the chain (`verify`).
Without a key anyone able to rewrite the whole file could rebuild the chain; the key (kept
away from the log's host, e.g. in the gateway's environment only) stops that.

Durability: records are written by one writer thread. `fsync: always` fsyncs after every
batch the thread drains (group commit: at most the records of requests that finished while
the previous fsync ran share one), `interval` at most every `fsync_interval_s`, `never` leaves
it to the page cache. A record is written when its request has finished (it needs the status
and token counts), so a crash loses at most the records still queued or not yet fsynced.
Rotation: past `rotate_bytes` the file is renamed `<path>.<first seq of the next file>` and a
new one continues the same chain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("soberana.gateway.audit")

GENESIS = "0" * 64


def canonical(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k not in ("hash", "sig")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(prev: str, record: dict[str, Any]) -> str:
    return hashlib.sha256(prev.encode() + b"\n" + canonical(record)).hexdigest()


def signature(key: bytes, digest: str) -> str:
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


class AuditLog:
    """Appends chained records from a writer thread; `write` never blocks the event loop."""

    def __init__(
        self,
        path: str | Path,
        fsync: str = "always",
        fsync_interval_s: float = 1.0,
        rotate_bytes: int = 64 * 1024 * 1024,
        key: bytes | None = None,
    ) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.rotate_bytes = rotate_bytes
        self.key = key
        self.seq, self.prev = self._resume()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._file = open(self.path, "ab")  # noqa: SIM115 - owned by the writer thread
        self._last_sync = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        """Queue one request's record (hash, seq and signature are added in order by the writer)."""
        self._queue.put(record)

    def close(self) -> None:
        """Write everything queued, fsync, stop the writer."""
        self._queue.put(None)
        self._thread.join(30)

    def _resume(self) -> tuple[int, str]:
        """Continue the chain of an existing file from its last complete record."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            older = sorted(self.path.parent.glob(self.path.name + ".*"))
            source = older[-1] if older else None
        else:
            source = self.path
        if source is None:
            return 0, GENESIS
        last = None
        with open(source, "rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    last = line
        if last is None:
            return 0, GENESIS
        record = json.loads(last)
        return record["seq"] + 1, record["hash"]

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            stop = batch[-1] is None
            for record in batch:
                if record is not None:
                    self._append(record)
            self._file.flush()
            now = time.monotonic()
            if (
                self.fsync == "always"
                or stop
                or (self.fsync == "interval" and now - self._last_sync >= self.fsync_interval_s)
            ):
                os.fsync(self._file.fileno())
                self._last_sync = now
            if stop:
                self._file.close()
                return

    def _append(self, record: dict[str, Any]) -> None:
        record = {**record, "seq": self.seq, "prev": self.prev}
        digest = record_hash(self.prev, record)
        record["hash"] = digest
        if self.key is not None:
            record["sig"] = signature(self.key, digest)
        line = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        self._file.write(line.encode() + b"\n")
        self.seq += 1
        self.prev = digest
        if self._file.tell() >= self.rotate_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.path.rename(self.path.with_name(f"{self.path.name}.{self.seq:012d}"))
        self._file = open(self.path, "ab")  # noqa: SIM115


def verify(
    lines_by_file: list[tuple[str, list[bytes]]], key: bytes | None, allow_partial: bool
) -> list[str]:
    """Problems found in the chain over these files, in order (empty: intact)."""
    problems: list[str] = []
    prev: str | None = None
    expected_seq: int | None = None
    for name, lines in lines_by_file:
        for n, raw in enumerate(lines, 1):
            where = f"{name}:{n}"
            try:
                record = json.loads(raw)
                seq, claimed_prev, digest = record["seq"], record["prev"], record["hash"]
            except (ValueError, KeyError, TypeError):
                problems.append(f"{where}: not a valid audit record")
                prev = expected_seq = None
                continue
            if expected_seq is None:
                if seq == 0 and claimed_prev != GENESIS:
                    problems.append(f"{where}: seq 0 does not start from the genesis hash")
                elif seq != 0 and not allow_partial:
                    problems.append(
                        f"{where}: the chain starts at seq {seq}, not 0: records before it are "
                        "missing (pass every rotated file, oldest first, or --allow-partial)"
                    )
            else:
                if seq != expected_seq:
                    problems.append(
                        f"{where}: seq {seq} where {expected_seq} was expected (a record was removed or reordered)"
                    )
                if claimed_prev != prev:
                    problems.append(
                        f"{where}: prev hash does not match the previous record (removed, edited or reordered)"
                    )
            if record_hash(claimed_prev, record) != digest:
                problems.append(f"{where}: hash does not match the record's content (edited)")
            if key is not None and not hmac.compare_digest(
                record.get("sig", ""), signature(key, digest)
            ):
                problems.append(f"{where}: signature does not verify with the given key")
            prev, expected_seq = digest, seq + 1
    return problems
