"""msgpack RPC over CurveZMQ: codec -> transport (server/client) -> dispatcher -> service.

The wire format is specified in PROTOCOL.md beside this file.
"""

from shared.rpc.client import Connection, Stream, new_trace_id
from shared.rpc.dispatcher import Dispatcher, RequestContext, current_request, method
from shared.rpc.limits import Limits
from shared.rpc.mesh import MeshClient, ServiceClient
from shared.rpc.server import RpcServer

__all__ = [
    "Connection",
    "Dispatcher",
    "Limits",
    "MeshClient",
    "RequestContext",
    "RpcServer",
    "ServiceClient",
    "Stream",
    "current_request",
    "method",
    "new_trace_id",
]
