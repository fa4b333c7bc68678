"""Which failures move a request to the next model of its chain (services/gateway/fallback.py)."""

from __future__ import annotations

import pytest

from shared.errors import Forbidden, InvalidParams, NotFound, RateLimited, Timeout, TooLarge, Unavailable
from services.gateway.fallback import Chain, code_of, falls_back

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("error, cut_short, moves", [
    (Unavailable("down"), False, True),
    (Unavailable("keys", {"reason": "upstream_keys_exhausted", "upstream_status": 429}), False, True),
    (NotFound("not served after all"), False, True),
    (Timeout("first token late"), True, True),  # the model's first-token time
    (Timeout("the caller's deadline"), False, False),  # no time left: not the model's
    (InvalidParams("too long", {"reason": "context_length_exceeded"}), False, True),
    (InvalidParams("bad temperature", {"param": "temperature"}), False, False),
    (TooLarge("too big"), False, False),
    (Forbidden("no"), False, False),
    (RateLimited("the caller's own limit"), False, False),
])
def test_only_the_models_failures_move_the_request(error, cut_short, moves):
    assert falls_back(error, cut_short=cut_short) is moves


def test_an_upstreams_rate_limit_behind_the_relays_error_is_kept_as_rate_limited():
    for cause in (Unavailable("429", {"upstream_status": 429}), Unavailable("529", {"upstream_status": 529}),
                  Unavailable("pool", {"reason": "upstream_keys_exhausted"})):
        relayed = Unavailable("no worker could answer")  # what the caller sees: the cause's data stripped
        relayed.__cause__ = cause
        assert code_of(relayed) == "RATE_LIMITED"
    plain = Unavailable("no worker could answer")
    plain.__cause__ = Unavailable("503", {"upstream_status": 503})
    assert code_of(plain) == "UNAVAILABLE" and code_of(Timeout("late")) == "TIMEOUT"


def test_a_chain_hands_out_each_model_once_and_keeps_what_failed():
    chain = Chain(["a", "b", "c"])
    chain.take("b")
    assert chain.pending == ["a", "c"] and chain.left
    chain.failed("b", Unavailable("down"))
    chain.take("a")
    chain.take("c")
    chain.take("zzz")  # not in the chain: nothing happens
    assert not chain.left and chain.tried == [{"model": "b", "code": "UNAVAILABLE"}]
