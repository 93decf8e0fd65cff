"""Command-line client (`cifar-svc`, or `python -m client`).

cifar-svc submit urls.txt|images/ [--server URL] [--out results.jsonl|.csv] [--top-k N]
cifar-svc get <job or batch id> [--server URL]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as Bar

from client.api import Client, ServiceError
from client.submit import submit
from shared.schemas import TOP_K_DEFAULT


class Progress:
    """A rich progress bar: done (and failed) out of all inputs."""

    def start(self, total: int, done: int) -> None:
        self.failed = 0
        self.bar = Bar(
            TextColumn("[bold]classifying"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TimeRemainingColumn(),
            transient=False,
            disable=not sys.stderr.isatty() and not os.environ.get("FORCE_PROGRESS"),
        )
        self.bar.start()
        self.task = self.bar.add_task("", total=total, completed=done, failed=0)

    def advance(self, n: int, failed: int = 0) -> None:
        self.failed += failed
        self.bar.update(self.task, advance=n, failed=self.failed)

    def stop(self) -> None:
        self.bar.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cifar-svc", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default=os.environ.get("CIFAR_SVC_SERVER", "http://127.0.0.1:8000"))
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="classify a file of URLs (one per line) or a folder of images")
    s.add_argument("source", type=Path)
    s.add_argument(
        "--out",
        type=Path,
        default=Path("results.jsonl"),
        help="results, one line per input: .jsonl or .csv (default results.jsonl)",
    )
    s.add_argument("--top-k", type=int, default=TOP_K_DEFAULT)
    s.add_argument("--batch-size", type=int, default=500, help="inputs per request")
    g = sub.add_parser("get", help="print a job or a batch as JSON")
    g.add_argument("id")
    c = sub.add_parser("cancel", help="cancel a batch's unfinished jobs (or one job); prints it as JSON")
    c.add_argument("id")
    args = p.parse_args(argv)
    client = Client(args.server)
    try:
        if args.command == "cancel":
            print(json.dumps(client.cancel(args.id), indent=2))
            return 0
        if args.command == "get":
            try:
                print(json.dumps(client.batch(args.id), indent=2))
            except ServiceError as exc:
                if exc.status != 404:
                    raise
                print(json.dumps(client.job(args.id), indent=2))
            return 0
        if not args.source.exists():
            p.error(f"{args.source} does not exist")
        counts = submit(client, args.source, args.out, args.top_k, args.batch_size, Progress())
        print(
            f"{counts['inputs']} inputs: {counts['already_done']} were already in {args.out}, "
            f"{counts['resumed']} resumed, {counts['submitted']} submitted; results in {args.out}",
            file=sys.stderr,
        )
        return 0
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
