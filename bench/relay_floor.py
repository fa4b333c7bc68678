"""The floor of any gateway on this RPC layer: a process that only relays (bench/gateway.py runs it).

    python bench/relay_floor.py      # environment as a service's: INFERSWARM_MESH_SECRET, _BOOTSTRAP, _DATA_DIR

A mesh member in the gateway's role serving one public stream, `relay.infer`:
it opens `inference.generate` on a worker of the model named (found through
the DHT and chosen as the gateway's clients choose: `ServiceClient.stream`)
and passes the chunks on, unchanged. No key check, no limits, no journal,
no receipt, no metrics of its own: what is left is what every gateway must
do -- be a server to the caller and a client to the worker, over CurveZMQ and
msgpack. bench/gateway.py measures callers through it beside the direct path
and the real gateway, so its `relay_rps_64` and `relay_cpu_us_64` say how near
the gateway's own work can bring it to the direct path on this machine.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.config import MeshConfig, load_or_exit  # noqa: E402
from shared.dht import model_topic  # noqa: E402
from shared.rpc import method  # noqa: E402
from shared.runner import MeshNode, run  # noqa: E402


#: Announced here: a gateway-role member may announce only the gateway's `inferswarm/` topics,
#: and topics outside `inferswarm/` are any member's (shared/roles.py).
TOPIC = "bench/relay"


class Relay:
    name = "relay"

    def __init__(self, node: MeshNode) -> None:
        self._mesh = node.mesh

    @method(public=True)
    async def infer(self, model: str, messages: list[Any], max_tokens: int = 16) -> AsyncIterator[Any]:
        params = {"model": model, "messages": messages, "max_tokens": max_tokens}
        stream = await self._mesh.topic(model_topic(model)).stream("inference.generate", params, timeout=30.0)
        async with stream:
            async for chunk in stream:
                yield chunk


async def build(stack: AsyncExitStack, node: MeshNode) -> list[object]:
    return [Relay(node)]


def main() -> None:
    config = load_or_exit(MeshConfig, "relay")
    run("relay", build, config, role="gateway", topics=[TOPIC])


if __name__ == "__main__":
    main()
