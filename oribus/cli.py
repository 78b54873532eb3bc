"""The ``oribus`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path


def _cmd_repair(args: argparse.Namespace) -> int:
    from oribus.shards.wal import repair_wal

    data = Path(args.data_dir)
    wal_dirs = sorted(p for p in data.glob("shard-*/wal") if p.is_dir())
    if (data / "wal").is_dir():
        wal_dirs.insert(0, data / "wal")
    if not wal_dirs:
        print(f"no WAL directories under {data}", file=sys.stderr)
        return 2
    changed = False
    for d in wal_dirs:
        actions = repair_wal(d)
        for a in actions:
            print(f"{d}: {a}")
        changed = changed or bool(actions)
        if not actions:
            print(f"{d}: intact")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from oribus.demo import run_demo

    return asyncio.run(run_demo(Path(args.data_dir), shards=args.shards, fresh=not args.keep))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oribus", description="A state bus for fleets of agents.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("repair", help="truncate a damaged WAL at its first bad record (keeps .broken copies)")
    p.add_argument("--data-dir", required=True, help="an engine data dir, or one shard's dir")
    p.set_defaults(fn=_cmd_repair)

    p = sub.add_parser("demo", help="run a small fleet of agents on the embedded engine")
    p.add_argument("--data-dir", default="./oribus-data/demo")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the data dir's existing contents")
    p.set_defaults(fn=_cmd_demo)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a clear message, not a traceback, for operator errors
        from oribus.errors import OribusError

        if isinstance(e, OribusError):
            print(json.dumps({"error": e.code, "message": e.message, **e.details}), file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
