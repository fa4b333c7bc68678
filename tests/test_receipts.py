"""Signed usage receipts (shared/receipts.py): signing, verifying, the canonical encoding.

Real keys (a node identity, PyNaCl) and real bytes; every tampering is a typed
`InvalidReceipt` (code INVALID_PARAMS) naming its reason.
"""

from __future__ import annotations

import base64
import json
import random
import string

import msgpack
import pytest

from shared.errors import InvalidParams
from shared.identity import NodeIdentity
from shared.receipts import CONTEXT, PREFIX, InvalidReceipt, Receipt, encode, read_keys, sign, verify

pytestmark = pytest.mark.unit

GATEWAY = NodeIdentity.generate()
FIELDS = dict(request_id="gw-0123456789abcdef01234567", model="test-model", prompt_tokens=12,
              completion_tokens=34, at=1764930000.1234, user_id=7)
_ALPHABET = string.ascii_letters + string.digits + "-_."


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _signed(fields: dict, identity: NodeIdentity = GATEWAY) -> str:
    """A receipt whose payload is exactly `fields` packed in the given order (not canonicalised)."""
    payload = msgpack.packb(fields, use_bin_type=True)
    return PREFIX + _b64(payload) + "." + _b64(identity.sign(CONTEXT + payload))


def test_a_signed_receipt_verifies_with_its_fields():
    text = sign(GATEWAY, **FIELDS)
    assert text.startswith("isr-v1.") and "," not in text and "=" not in text and len(text) < 400
    receipt = verify(text, [GATEWAY.public_key.hex()])
    assert receipt == Receipt(request_id=FIELDS["request_id"], model="test-model", prompt_tokens=12,
                              completion_tokens=34, cost=None, at=1764930000.123, user_id=7,
                              gateway=GATEWAY.public_key.hex())
    assert verify(text, [GATEWAY.public_key]) == receipt  # raw keys too
    assert list(receipt.fields()) == sorted(receipt.fields())


def test_a_cost_is_kept_as_a_decimal_string():
    from decimal import Decimal
    receipt = verify(sign(GATEWAY, **FIELDS, cost=Decimal("0.0042")), [GATEWAY.public_key])
    assert receipt.cost == "0.0042"


def test_a_changed_character_anywhere_fails():
    text = sign(GATEWAY, **FIELDS)
    trusted = [GATEWAY.public_key]
    for index, char in enumerate(text):
        for other in {_ALPHABET[(_ALPHABET.index(char) + 1) % len(_ALPHABET)], "A" if char != "A" else "B"}:
            with pytest.raises(InvalidReceipt) as caught:
                verify(text[:index] + other + text[index + 1:], trusted)
            assert caught.value.code == "INVALID_PARAMS"
            assert caught.value.reason in ("format", "signature", "unknown_signer")


def test_a_changed_byte_of_the_payload_or_signature_fails_even_when_re_encoded():
    text = sign(GATEWAY, **FIELDS)
    payload_text, signature_text = text[len(PREFIX):].split(".")
    payload = base64.urlsafe_b64decode(payload_text + "==")
    signature = base64.urlsafe_b64decode(signature_text + "==")
    for index in range(len(payload)):
        changed = bytearray(payload)
        changed[index] ^= 0x01
        with pytest.raises(InvalidReceipt):
            verify(PREFIX + _b64(bytes(changed)) + "." + signature_text, [GATEWAY.public_key])
    for index in range(len(signature)):
        changed = bytearray(signature)
        changed[index] ^= 0x80
        with pytest.raises(InvalidReceipt) as caught:
            verify(PREFIX + payload_text + "." + _b64(bytes(changed)), [GATEWAY.public_key])
        assert caught.value.reason == "signature"


def test_more_tokens_signed_by_someone_else_is_an_unknown_signer_or_a_bad_signature():
    forger = NodeIdentity.generate()
    forged = sign(forger, **{**FIELDS, "prompt_tokens": 1})
    with pytest.raises(InvalidReceipt) as caught:
        verify(forged, [GATEWAY.public_key])
    assert caught.value.reason == "unknown_signer"
    # the forger names the trusted gateway as the signer: its signature does not verify under that key
    fields = {**verify(forged, [forger.public_key]).fields(), "gateway": GATEWAY.public_key.hex()}
    with pytest.raises(InvalidReceipt) as caught:
        verify(_signed(fields, forger), [GATEWAY.public_key])
    assert caught.value.reason == "signature"


def test_no_trusted_key_trusts_nothing():
    with pytest.raises(InvalidReceipt) as caught:
        verify(sign(GATEWAY, **FIELDS), [])
    assert caught.value.reason == "unknown_signer"


def test_the_encoding_does_not_depend_on_the_order_of_the_map():
    fields = verify(sign(GATEWAY, **FIELDS), [GATEWAY.public_key]).fields()
    orders = [list(fields)]
    for seed in range(20):
        names = list(fields)
        random.Random(seed).shuffle(names)
        orders.append(names)
        assert encode({name: fields[name] for name in names}) == encode(fields)
    # a payload signed in another order is refused: there is one encoding of a receipt
    unsorted = {name: fields[name] for name in reversed(sorted(fields))}
    with pytest.raises(InvalidReceipt) as caught:
        verify(_signed(unsorted), [GATEWAY.public_key])
    assert caught.value.reason == "format"
    assert verify(_signed(dict(sorted(fields.items()))), [GATEWAY.public_key]).fields() == fields


@pytest.mark.parametrize("change", [
    {"v": 2}, {"prompt_tokens": -1}, {"prompt_tokens": 1.0}, {"at": 1764930000}, {"user_id": "7"},
    {"cost": "1e3"}, {"cost": 0.5}, {"model": ""}, {"gateway": "AB" * 32}, {"extra": 1},
])
def test_a_payload_that_is_not_a_v1_receipt_is_a_format_error(change):
    fields = {**verify(sign(GATEWAY, **FIELDS), [GATEWAY.public_key]).fields(), **change}
    with pytest.raises(InvalidReceipt) as caught:
        verify(_signed(dict(sorted(fields.items()))), [GATEWAY.public_key, "ab" * 32])
    assert caught.value.reason == "format"


@pytest.mark.parametrize("text", ["", "isr-v1.", "isr-v2.a.b", "isr-v1.abc", "isr-v1.a.b.c", "isr-v1.YQ==.YQ",
                                  "isr-v1.YQ.YQ", "isr-v1.!!!!.YQ", "x" * 5000, "isr-v1.kQ." + "A" * 86])
def test_text_that_is_not_a_receipt_is_a_format_error(text):
    with pytest.raises(InvalidReceipt) as caught:
        verify(text, [GATEWAY.public_key])
    assert caught.value.reason == "format"
    assert isinstance(caught.value, InvalidParams)


def test_a_signature_over_the_bare_payload_is_refused():
    """The context keeps a receipt signature apart from any other the node key makes (DHT records)."""
    payload = encode(verify(sign(GATEWAY, **FIELDS), [GATEWAY.public_key]).fields())
    with pytest.raises(InvalidReceipt) as caught:
        verify(PREFIX + _b64(payload) + "." + _b64(GATEWAY.sign(payload)), [GATEWAY.public_key])
    assert caught.value.reason == "signature"


def test_keys_files_as_json_or_lines():
    one, two = "ab" * 32, "CD" * 32
    assert read_keys(json.dumps([one, two])) == {one, two.lower()}
    assert read_keys(f"# the gateways\n{one}\n\n{two}  # g2\n") == {one, two.lower()}
    for bad in (json.dumps([one, 3]), "not-a-key", json.dumps({"keys": [one]}), "[1,"):
        with pytest.raises(InvalidParams):
            read_keys(bad)
