"""Discovery over a Kademlia DHT: signed, expiring provider records per topic.

    async with KademliaDiscovery(identity=identity, mesh=mesh, seeds=["10.0.0.5:7400"]) as dht:
        async with Announcer(dht, [service_topic("auth")], service="auth",
                             endpoint="tcp://10.0.0.7:5555", version="1.0"):
            providers = await dht.lookup(service_topic("auth"))

Layers: `wire` (datagram codec) -> `protocol` (RPCs, dead-node memory) ->
`crawl` / `server` (kademlia lookups, storage) -> `node` (the `Discovery`
implementation) -> `announcer`. The wire format is in PROTOCOL.md.
"""

from shared.dht.announcer import DEFAULT_TTL, Announcer
from shared.dht.config import DHTConfig
from shared.dht.interface import Discovery, Provider, model_topic, service_topic
from shared.dht.memory import MemoryDiscovery, MemoryRegistry
from shared.dht.node import KademliaDiscovery, select_providers
from shared.dht.record import InvalidRecord, Record, RecordVerifier, sign_record, topic_key
from shared.dht.storage import RecordStore

__all__ = [
    "Announcer",
    "DEFAULT_TTL",
    "DHTConfig",
    "Discovery",
    "InvalidRecord",
    "KademliaDiscovery",
    "MemoryDiscovery",
    "MemoryRegistry",
    "Provider",
    "Record",
    "RecordStore",
    "RecordVerifier",
    "model_topic",
    "select_providers",
    "service_topic",
    "sign_record",
    "topic_key",
]
