"""A client of the multi-host test: inferences through whatever gateway the DHT names.

    python tests/multihost_client.py --count N --model M --prompt TEXT [--concurrency C] [--until-worker ID] < api_key

Reads the bootstrap and the mesh id from INFERSWARM_BOOTSTRAP and
INFERSWARM_MESH_ID, as the CLI does, and prints one JSON line per request:
{"ok": true, "text", "worker"} or {"ok": false, "code", "message"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from inferswarm.session import ClientSession
from shared.errors import MeshError
from shared.identity import MeshId
from shared.logging import configure_logging


async def main(args: argparse.Namespace, api_key: str) -> None:
    params = {"api_key": api_key, "model": args.model, "messages": [{"role": "user", "content": args.prompt}],
              "max_tokens": 64}
    mesh_id = MeshId.from_text(os.environ["INFERSWARM_MESH_ID"])
    async with ClientSession(os.environ["INFERSWARM_BOOTSTRAP"].split(","), mesh_id, timeout=20) as session:
        left = args.count
        found = asyncio.Event()

        async def one() -> None:
            try:
                async with await session("gateway").stream("gateway.infer", params) as stream:
                    chunks = [chunk async for chunk in stream]
            except MeshError as exc:
                print(json.dumps({"ok": False, "code": exc.code, "message": exc.message}), flush=True)
                return
            text = "".join(c.get("text", "") for c in chunks if not c.get("done"))
            worker = chunks[-1]["worker"]["id"]
            print(json.dumps({"ok": True, "text": text, "worker": worker}), flush=True)
            if worker == args.until_worker:
                found.set()

        async def client() -> None:
            nonlocal left
            while left > 0 and not found.is_set():
                left -= 1
                await one()

        await asyncio.gather(*(client() for _ in range(args.concurrency)))

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--until-worker")
    arguments = parser.parse_args()
    configure_logging("error")  # stdout is for the results
    asyncio.run(main(arguments, sys.stdin.read().strip()))
