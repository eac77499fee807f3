"""`soberana audit verify FILE...`: check an audit log's hash chain (and signatures)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from soberana.gateway.privacy.audit import verify


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `soberana audit`'s options."""
    sub = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    v = sub.add_parser("verify", help="verify the hash chain of audit log files, oldest first")
    v.add_argument("files", nargs="+", type=Path, help="rotated files oldest first, current last")
    v.add_argument(
        "--key-env", help="environment variable holding the HMAC key: also check signatures"
    )
    v.add_argument(
        "--allow-partial",
        action="store_true",
        help="accept a chain that starts after seq 0 (older rotated files not at hand)",
    )
    v.add_argument(
        "--expect-last-seq",
        type=int,
        help="fail unless the last record has this seq (detects a cut tail)",
    )


def run(args: argparse.Namespace) -> int:
    """Exit 0 if the chain is intact, 1 if tampering is found, 2 on a usage error."""
    key = None
    if args.key_env:
        value = os.environ.get(args.key_env)
        if not value:
            print(f"error: environment variable {args.key_env} is not set", file=sys.stderr)
            return 2
        key = value.encode()
    files = []
    for path in args.files:
        try:
            files.append((str(path), path.read_bytes().splitlines()))
        except OSError as e:
            print(f"error: cannot read {path}: {e.strerror}", file=sys.stderr)
            return 2
    problems = verify(files, key, args.allow_partial)
    records = sum(len(lines) for _, lines in files)
    if args.expect_last_seq is not None:
        import json

        last = files[-1][1][-1] if files and files[-1][1] else b"{}"
        try:
            seq = json.loads(last).get("seq")
        except ValueError:
            seq = None
        if seq != args.expect_last_seq:
            problems.append(
                f"the last record has seq {seq}, expected {args.expect_last_seq} (records cut from the end)"
            )
    for p in problems:
        print(p)
    if problems:
        print(f"TAMPERED: {len(problems)} problem(s) in {records} record(s)")
        return 1
    print(f"OK: {records} record(s), chain intact" + (", signatures valid" if key else ""))
    return 0
