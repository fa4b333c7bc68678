"""`inferswarm receipts verify FILE`: check signed usage receipts (shared/receipts.py).

    inferswarm receipts verify receipts.txt --keys gateways.json
    inferswarm receipts verify - --base-url https://ai.example.com      # keys from GET /api/receipts/keys
    inferswarm receipts verify receipts.txt                             # keys from the mesh's live gateways

FILE (or `-`, stdin) holds one receipt per line (an `x-inferswarm-receipt`
header's value, several comma-separated, is fine too; blank lines and `#`
comments are skipped). Each good receipt is printed with its fields and `OK`;
each bad one is one line on stderr naming the line, the code and the reason
(`format`, `unknown_signer`, `signature`). The exit code is 0 when every
receipt verified, that of `INVALID_PARAMS` (9) when one did not, and a file
with no receipt is an error too.

The trusted keys: `--keys FILE` (a JSON list of hex keys, as
`/api/receipts/keys` answers, or one per line), else the web service's list
(`--base-url`), else the gateways found on the mesh (their node keys, from
records the mesh's members signed and certified for the gateway role). Only
the first needs no network: keep the list to verify receipts of gateways
retired since.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from inferswarm.errors import describe, exit_code
from inferswarm.httpclient import HttpSession, within
from inferswarm.localmesh import cache_dir
from inferswarm.session import ClientSession, SessionError, resolve_bootstrap, resolve_mesh_id
from shared.errors import InvalidParams, MeshError
from shared.receipts import InvalidReceipt, read_keys, verify

__all__ = ["add_arguments", "run_verify"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="receipts, one per line; - reads stdin")
    parser.add_argument("--keys", type=Path, metavar="FILE",
                        help="the trusted gateway keys: a JSON list of hex keys (GET /api/receipts/keys) or one "
                             "per line (default: ask the web service at --base-url, else the mesh)")
    parser.set_defaults(run=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    """Verify every receipt of `args.file`; print each; 0 when all are good."""
    try:
        texts = _receipts(sys.stdin.read() if args.file == "-" else _read(Path(args.file), "FILE"))
        trusted = asyncio.run(_trusted_keys(args))
    except MeshError as error:
        print(f"inferswarm: {describe(error)}", file=sys.stderr)
        return exit_code(error)
    except SessionError as error:
        print(f"inferswarm: {error}", file=sys.stderr)
        return 6
    results, worst = [], 0
    for line, text in texts:
        try:
            receipt = verify(text, trusted)
        except InvalidReceipt as error:
            worst = worst or exit_code(error)
            results.append({"line": line, "ok": False, "error": {"code": error.code, "reason": error.reason,
                                                                  "message": error.message}})
            if not args.json:
                print(f"inferswarm: line {line}: {error.code} ({error.reason}): {error.message}", file=sys.stderr)
            continue
        fields = receipt.fields()
        results.append({"line": line, "ok": True, **fields})
        if not args.json:
            print(f"OK  line {line}  " + "  ".join(f"{name}={_shown(value)}" for name, value in fields.items()))
    if args.json:
        print(json.dumps(results))
    return worst


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InvalidParams(f"{what} {path}: {reason.lower()}", {"param": what.lower()}) from None


def _receipts(text: str) -> list[tuple[int, str]]:
    """(line number, receipt) for each receipt of `text`."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            found += [(number, part.strip()) for part in line.split(",") if part.strip()]
    if not found:
        raise InvalidParams("no receipt to verify (one per line)", {"param": "file"})
    return found


async def _trusted_keys(args: argparse.Namespace) -> frozenset[str]:
    if args.keys is not None:
        return read_keys(_read(args.keys, "--keys"))
    deadline = time.monotonic() + args.timeout
    if args.base_url:
        web = HttpSession(args.base_url, timeout=args.timeout, ca_file=args.ca_file)
        reply = await web.request("GET", "/api/receipts/keys", deadline=deadline)
        try:
            return _keys_of(await within(deadline, reply.answer(), reply.url))
        finally:
            reply.close()
    mesh_id = resolve_mesh_id(args.data_dir)
    session = ClientSession(resolve_bootstrap(args.bootstrap, mesh_id), mesh_id, timeout=args.timeout,
                            cache_dir=cache_dir())
    async with session:
        providers = await session("gateway").providers(timeout=args.timeout)
    return frozenset(provider.node_hex for provider in providers)


def _keys_of(answer: Any) -> frozenset[str]:
    if not isinstance(answer, list) or not all(isinstance(key, str) for key in answer):
        raise InvalidParams("the web service's /api/receipts/keys is not a list of keys", {"param": "base_url"})
    return read_keys(json.dumps(answer))


def _shown(value: Any) -> str:
    return "-" if value is None else str(value)

