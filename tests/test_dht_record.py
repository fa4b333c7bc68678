"""Signed records, their storage rules, and the choice of providers (no network)."""

from __future__ import annotations

import msgpack
import pytest

from shared.dht.node import select_providers
from shared.dht.record import (
    RECORD_CONTEXT,
    InvalidRecord,
    RecordVerifier,
    sign_record,
    topic_key,
    wall_ms,
)
from shared.dht.storage import RecordStore
from shared.errors import InvalidParams
from shared.identity import MeshCredential, NodeIdentity

pytestmark = pytest.mark.unit

TOPIC = "inferswarm/auth/v1"


@pytest.fixture(scope="module")
def mesh() -> MeshCredential:
    return MeshCredential(MeshCredential.new_secret())


@pytest.fixture(scope="module")
def node() -> NodeIdentity:
    return NodeIdentity.generate()


@pytest.fixture
def verifier(mesh: MeshCredential) -> RecordVerifier:
    return RecordVerifier(mesh.mesh_id, max_ttl=60, clock_skew=2)


def signed(identity: NodeIdentity, mesh: MeshCredential, **fields) -> bytes:
    values = dict(topic=TOPIC, service="auth", endpoint="tcp://127.0.0.1:5555", version="1.0", ttl=30)
    values.update(fields)
    return sign_record(identity, mesh.certify(identity.public_key), **values)


def raw_blob(identity: NodeIdentity, body: dict) -> bytes:
    """A blob with a valid signature over an arbitrary body."""
    body_bytes = msgpack.packb(body, use_bin_type=True)
    return msgpack.packb([body_bytes, identity.sign(RECORD_CONTEXT + body_bytes)], use_bin_type=True)


def body_of(identity: NodeIdentity, mesh: MeshCredential, **changes) -> dict:
    body = {
        "t": TOPIC, "s": "auth", "e": "tcp://127.0.0.1:5555", "k": identity.public_key,
        "c": mesh.certify(identity.public_key), "v": "1.0", "l": {}, "q": wall_ms(), "d": 30,
    }
    body.update(changes)
    return body


def reason(verifier: RecordVerifier, blob: object, **kwargs) -> str:
    with pytest.raises(InvalidRecord) as caught:
        verifier.verify(blob, **kwargs)
    return caught.value.reason


def test_round_trip(verifier, node, mesh):
    blob = signed(node, mesh, load={"queue": 3, "gpu": "a100"})
    record = verifier.verify(blob, key=topic_key(TOPIC), topic=TOPIC)
    provider = record.to_provider()
    assert (provider.topic, provider.service, provider.version) == (TOPIC, "auth", "1.0")
    assert provider.endpoint == "tcp://127.0.0.1:5555"
    assert provider.node_key == node.public_key
    assert provider.curve_key == node.curve.public  # derived from the node key
    assert provider.load == {"queue": 3, "gpu": "a100"}
    assert abs(provider.seq - wall_ms()) < 5000 and provider.ttl == 30


def test_tampered_body_is_rejected(verifier, node, mesh):
    body_bytes, signature = msgpack.unpackb(signed(node, mesh))
    tampered = body_bytes.replace(b":5555", b":6666")
    assert tampered != body_bytes
    assert reason(verifier, msgpack.packb([tampered, signature])) == "BAD_SIGNATURE"


def test_record_signed_by_another_key_is_rejected(verifier, node, mesh):
    # The attacker copies the victim's (public) member cert and node key.
    attacker = NodeIdentity.generate()
    assert reason(verifier, raw_blob(attacker, body_of(node, mesh))) == "BAD_SIGNATURE"


def test_cert_of_another_mesh_is_rejected(verifier, node):
    other_mesh = MeshCredential(MeshCredential.new_secret())
    assert reason(verifier, signed(node, other_mesh)) == "BAD_CERT"


def test_missing_or_malformed_cert_is_rejected(verifier, node, mesh):
    body = body_of(node, mesh)
    del body["c"]
    assert reason(verifier, raw_blob(node, body)) == "BAD_TYPE"
    assert reason(verifier, raw_blob(node, body_of(node, mesh, c=b"\x00" * 160 + b"auth"))) == "BAD_CERT"
    assert reason(verifier, raw_blob(node, body_of(node, mesh, c=b"\x00" * 64))) == "BAD_TYPE"
    assert reason(verifier, raw_blob(node, body_of(node, mesh, c=b"short"))) == "BAD_TYPE"


@pytest.mark.parametrize("role, topic, accepted", [
    ("auth", TOPIC, True),
    ("inference", TOPIC, False),             # a worker cannot pass for auth (and collect passwords)
    ("gateway", TOPIC, False),
    ("inference", "inferswarm/model/llama3", True),
    ("inference", "inferswarm/inference/v1", True),
    ("auth", "inferswarm/model/llama3", False),
    ("web", "inferswarm/gateway/v1", False),
    ("dht", "inferswarm/dht/v1", False),      # no service of that name: nobody's topic
    ("metrics", "inferswarm/whatever/v1", False),
    ("operator", "inferswarm/whatever/v1", True),
    ("operator", TOPIC, True),
    ("web", "tests/scratch", True),           # outside inferswarm/: any member's
])
def test_a_record_is_accepted_only_on_its_roles_topics(verifier, node, mesh, role, topic, accepted):
    blob = sign_record(node, mesh.member(role).certify(node.public_key), topic=topic, service=role,
                       endpoint="tcp://127.0.0.1:5555", version="1.0", ttl=30)
    if accepted:
        assert verifier.verify(blob).topic == topic
    else:
        assert reason(verifier, blob) == "WRONG_ROLE"


def test_a_cert_cannot_be_moved_to_another_role_or_mesh(verifier, node, mesh):
    worker = mesh.member("inference").certify(node.public_key)
    renamed = worker[:160] + b"auth"  # the role's name is signed twice: by the mesh and by the role key
    assert reason(verifier, raw_blob(node, body_of(node, mesh, c=renamed))) == "BAD_CERT"
    # a role key (with the mesh's signature) of another mesh certifies nothing here
    other = MeshCredential(MeshCredential.new_secret()).member("auth").certify(node.public_key)
    assert reason(verifier, raw_blob(node, body_of(node, mesh, c=other))) == "BAD_CERT"
    # another node's cert does not certify this node
    stranger = mesh.member("auth").certify(NodeIdentity.generate().public_key)
    assert reason(verifier, raw_blob(node, body_of(node, mesh, c=stranger))) == "BAD_CERT"


def test_oversized_record_is_rejected(verifier, node, mesh):
    blob = signed(node, mesh, endpoint="tcp://" + "x" * 3000)
    assert len(blob) > verifier.max_size
    assert reason(verifier, blob) == "TOO_LARGE"


def test_expired_and_future_records_are_rejected(verifier, node, mesh):
    now = wall_ms()
    assert reason(verifier, signed(node, mesh, seq=now - 10_000, ttl=5)) == "EXPIRED"
    assert reason(verifier, signed(node, mesh, seq=now + 60_000)) == "FUTURE_SEQ"
    # within the clock skew both ways: accepted
    verifier.verify(signed(node, mesh, seq=now + 1_000))
    verifier.verify(signed(node, mesh, seq=now - 6_000, ttl=5))


def test_withdrawal_lives_max_ttl(verifier, node, mesh):
    old = wall_ms() - 30_000
    assert verifier.verify(signed(node, mesh, seq=old, ttl=0)).withdrawn
    assert reason(verifier, signed(node, mesh, seq=old - 60_000, ttl=0)) == "EXPIRED"


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"d": 61}, "BAD_TTL"),
        ({"d": -1}, "BAD_TTL"),
        ({"d": float("nan")}, "BAD_TTL"),
        ({"d": "30"}, "BAD_TYPE"),
        ({"q": 1.5}, "BAD_TYPE"),
        ({"q": True}, "BAD_TYPE"),
        ({"t": b"bytes-topic"}, "BAD_TYPE"),
        ({"e": None}, "BAD_TYPE"),
        ({"k": b"\x01" * 31}, "BAD_TYPE"),
        ({"l": {"nested": {"a": 1}}}, "BAD_TYPE"),
        ({"l": [1, 2]}, "BAD_TYPE"),
        ({"l": {str(i): i for i in range(17)}}, "BAD_TYPE"),
    ],
)
def test_wrong_types_are_rejected(verifier, node, mesh, changes, expected):
    assert reason(verifier, raw_blob(node, body_of(node, mesh, **changes))) == expected


@pytest.mark.parametrize(
    "blob",
    [b"", b"\xff\xfe", "text", 42, None, msgpack.packb([b"x"]), msgpack.packb([b"x", b"y"]),
     msgpack.packb([b"\x93\x01\x02\x03", b"s" * 64]), msgpack.packb({"a": 1})],
)
def test_garbage_blobs_are_rejected(verifier, blob):
    assert reason(verifier, blob) in {"BAD_TYPE", "BAD_ENCODING"}


def test_record_must_match_its_key_and_topic(verifier, node, mesh):
    blob = signed(node, mesh)
    assert reason(verifier, blob, key=topic_key("another/topic")) == "WRONG_KEY"
    assert reason(verifier, blob, topic="another/topic") == "WRONG_KEY"


def test_sign_rejects_a_bad_load(node, mesh):
    with pytest.raises(InvalidParams):
        signed(node, mesh, load={"nested": {"no": 1}})


# -- storage ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_store_keeps_one_record_per_node_newest_seq(verifier, mesh):
    store = RecordStore(clock=Clock())
    key = topic_key(TOPIC)
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    seq = wall_ms()
    first = verifier.verify(signed(a, mesh, seq=seq, load={"q": 1}))
    newer = verifier.verify(signed(a, mesh, seq=seq + 1, load={"q": 2}))
    assert store.put(key, first, 30) and store.put(key, newer, 30)
    assert store.put(key, verifier.verify(signed(b, mesh, seq=seq)), 30)
    assert store.live_count(key) == 2
    assert newer.blob in store.get(key) and first.blob not in store.get(key)
    assert not store.put(key, first, 30)  # replay of an older seq
    assert store.put(key, newer, 30)  # the very same blob again: a no-op
    assert not store.put(key, verifier.verify(signed(a, mesh, seq=seq + 1, load={"q": 9})), 30)


def test_store_expires_records_at_receive_time_plus_lifetime(verifier, mesh, node):
    clock = Clock()
    store = RecordStore(clock=clock)
    key = topic_key(TOPIC)
    store.put(key, verifier.verify(signed(node, mesh)), 1.5)
    clock.now += 1.4
    assert store.live_count(key) == 1
    clock.now += 0.2
    assert store.get(key) == [] and len(store) == 0


def test_withdrawal_leaves_a_tombstone_that_blocks_replays(verifier, mesh, node):
    clock = Clock()
    store = RecordStore(clock=clock, tombstone_ttl=10)
    key = topic_key(TOPIC)
    seq = wall_ms()
    live = verifier.verify(signed(node, mesh, seq=seq))
    gone = verifier.verify(signed(node, mesh, seq=seq + 1, ttl=0))
    assert store.put(key, live, 30) and store.put(key, gone, 30)
    assert store.live_count(key) == 0 and store.get(key) == [gone.blob]
    assert not store.put(key, live, 30)
    clock.now += 11
    assert store.get(key) == []


def test_store_is_bounded(verifier, mesh):
    clock = Clock()
    store = RecordStore(clock=clock, max_topics=2, max_records=2, tombstone_ttl=10)
    nodes = [NodeIdentity.generate() for _ in range(3)]
    key = topic_key(TOPIC)
    assert store.put(key, verifier.verify(signed(nodes[0], mesh)), 5)
    assert store.put(key, verifier.verify(signed(nodes[1], mesh, ttl=0)), 5)
    # full: the tombstone makes room, a live record does not
    assert store.put(key, verifier.verify(signed(nodes[2], mesh)), 5)
    assert not store.put(key, verifier.verify(signed(nodes[1], mesh)), 5)
    for topic in ("t/2", "t/3"):
        record = verifier.verify(signed(nodes[0], mesh, topic=topic))
        assert store.put(topic_key(topic), record, 5) == (topic == "t/2")
    clock.now += 6  # everything expired: room again
    assert store.put(topic_key("t/3"), verifier.verify(signed(nodes[0], mesh, topic="t/3")), 5)
    assert len(store) == 1


# -- choosing providers ---------------------------------------------------------


def test_select_keeps_newest_valid_record_per_node(verifier, mesh):
    a, b, attacker = NodeIdentity.generate(), NodeIdentity.generate(), NodeIdentity.generate()
    seq = wall_ms()
    old_a = signed(a, mesh, seq=seq - 10, load={"q": 1})
    new_a = signed(a, mesh, seq=seq, load={"q": 2})
    forged = raw_blob(attacker, body_of(a, mesh, q=seq + 500, e="tcp://evil:1"))
    blobs = [old_a, new_a, forged, signed(b, mesh, seq=seq), b"junk", new_a]
    providers = select_providers(verifier, TOPIC, blobs)
    assert [p.node_key for p in providers] == sorted([a.public_key, b.public_key])
    by_key = {p.node_key: p for p in providers}
    assert by_key[a.public_key].load == {"q": 2}


def test_select_hides_a_withdrawn_node_and_other_topics(verifier, mesh):
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    seq = wall_ms()
    blobs = [signed(a, mesh, seq=seq), signed(a, mesh, seq=seq + 1, ttl=0), signed(b, mesh, topic="x/y")]
    assert select_providers(verifier, TOPIC, blobs) == []
