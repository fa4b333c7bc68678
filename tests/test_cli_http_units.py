"""The CLI's HTTP errors and `--json-schema` file, without a server: what each reply becomes.

The stack tests (test_cli_http.py) meet the web service's own replies; these
are the replies it does not send but a proxy or another OpenAI-compatible
server may: HTML error pages, OpenAI's own codes, redirects.
"""

from __future__ import annotations

import json

import pytest

from inferswarm.commands import json_schema_format
from inferswarm.errors import describe, exit_code
from inferswarm.httpclient import HttpSession, error_of
from shared.errors import InvalidParams, MeshError

pytestmark = pytest.mark.unit

URL = "https://ai.example.com"


def line(error: MeshError) -> tuple[int, str]:
    return exit_code(error), describe(error)


def test_our_codes_come_from_the_body_of_either_api():
    openai_body = {"error": {"message": "invalid API key", "type": "authentication_error", "code": "unauthenticated"}}
    rest_body = {"error": {"code": "CONFLICT", "message": "username taken"}}
    assert line(error_of(401, {}, openai_body, URL)) == (3, "unauthenticated: invalid API key")
    assert line(error_of(409, {}, rest_body, URL)) == (8, "conflict: username taken")
    mid_stream = {"error": {"message": "no worker left", "type": "service_unavailable", "code": "unavailable"}}
    assert line(error_of(None, {}, mid_stream, URL)) == (6, "unavailable: no worker left")


@pytest.mark.parametrize("status, body, expected", [
    (400, {"error": {"message": "bad", "code": "model_not_found"}}, 9),  # another server's code: the status
    (404, {"error": {"message": "no such model", "code": "model_not_found"}}, 5),
    (403, None, 3),
    (500, "<html>oops</html>", 1),
    (502, None, 6),
    (503, None, 6),
    (504, None, 7),
    (599, None, 6),
    (418, None, 9),
])
def test_the_status_decides_when_the_body_does_not(status, body, expected):
    error = error_of(status, {}, body, URL)
    assert exit_code(error) == expected
    if not isinstance(body, dict):
        assert f"{URL} answered HTTP {status}" in describe(error)


def test_a_429_reads_like_the_mesh_s_refusal():
    headers = {"retry-after": "90", "x-ratelimit-limit-tokens": "400", "x-ratelimit-remaining-tokens": "12"}
    body = {"error": {"message": "this request needs 500 of tokens_per_month but the limit is 400",
                      "type": "rate_limit_error", "code": "rate_limited"}}
    assert line(error_of(429, headers, body, URL)) == (4, "rate limited: 12 of 400 tokens left this month, "
                                                          "resets in 2 min")
    bare = error_of(429, {"retry-after": "5"}, None, URL)  # a proxy's, say
    assert line(bare) == (4, f"rate limited: {URL} answered HTTP 429, resets in 5 s")


def test_a_429_of_a_money_budget_says_the_budget_and_of_the_hour_when_the_next_fits():
    message = ("the key's spend_per_month budget of 1.00 has 0.004 left; this request may cost up to 0.012 "
               "(its prompt and max_tokens at the model's prices)")
    headers = {"retry-after": "86400", "x-inferswarm-budget-limit": "1.00", "x-inferswarm-budget-remaining": "0.004"}
    body = {"error": {"message": message, "type": "insufficient_quota", "code": "insufficient_quota"}}
    error = error_of(429, headers, body, URL)
    assert error.data["rate_limit"] == {"spend_per_month": {"limit": "1.00", "remaining": "0.004"}}
    assert line(error) == (4, f"over budget: {message}, resets in 24.0 h")
    hourly = {"retry-after": "36", "x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "0"}
    body = {"error": {"message": "the user's requests_per_hour limit of 100 reached", "type": "requests",
                      "code": "rate_limit_exceeded"}}
    assert line(error_of(429, hourly, body, URL)) == (4, "rate limited: 0 of 100 requests left in the last hour, "
                                                         "next in 36 s")


def test_a_redirect_says_where_to_point_instead():
    error = error_of(301, {"location": "https://ai.example.com/"}, None, "http://ai.example.com")
    assert isinstance(error, InvalidParams)
    assert "redirects to https://ai.example.com/: give that as --base-url" in describe(error)


@pytest.mark.parametrize("url", ["ai.example.com", "ftp://ai.example.com", "https://"])
def test_a_base_url_that_is_not_http_is_invalid(url):
    with pytest.raises(InvalidParams, match="must be http"):
        HttpSession(url)


def test_the_schema_is_named_after_its_file(tmp_path):
    path = tmp_path / "a person (v2).schema.json"
    path.write_text(json.dumps({"type": "object"}))
    assert json_schema_format(path) == {"type": "json_schema", "json_schema": {
        "name": "a_person__v2__schema", "schema": {"type": "object"}, "strict": True}}
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(InvalidParams, match="not JSON"):
        json_schema_format(binary)
