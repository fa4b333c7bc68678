"""Attacks on the web service's edge (issue 15): each performed, each refused.

* an open redirect through `/login?next=`: browsers strip tabs and newlines
  and treat backslashes as slashes before parsing a URL, so `/\\t/evil.example`
  is `//evil.example` to them -- off-site. Every such `next` becomes the
  dashboard, on the form and after a real login, while a same-site path is kept;
* a client writing its own `X-Forwarded-For` behind the one proxy web trusts:
  only the right-most value, the one the proxy appended, is the client's address;
* a private file's temporary name, planted as a link, redirects nothing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.web.security import TRUST_PROXY, client_addr, is_secure
from shared.identity import write_private_file
from web_support import PASSWORD, web_stack

pytestmark = pytest.mark.timeout(120)

OFF_SITE = [
    "/\t/evil.example", "/\n/evil.example", "/\r\n/evil.example", "//evil.example", "/\\evil.example",
    "\\/evil.example", "/\\/evil.example", "https://evil.example/", "javascript:alert(1)", "/%2F/evil.example",
    "/%5Cevil.example", " //evil.example", "/ /evil.example", "",
]
SAME_SITE = ["/keys", "/dashboard?tab=usage", "/models#top"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("web-attacks")) as running:
        yield running


def next_field(html: str) -> str:
    match = re.search(r'name="next" value="([^"]*)"', html)
    assert match, html[:500]
    return match.group(1).replace("&amp;", "&").replace("&#39;", "'")


@pytest.mark.stack
async def test_login_never_redirects_off_site(stack):
    async with aiohttp.ClientSession() as http:
        reply = await http.post(f"{stack.base_url}/api/auth/register", json={
            "username": "redirected", "email": "redirected@example.com", "password": PASSWORD})
        assert reply.status == 201, await reply.text()

        for target in OFF_SITE + SAME_SITE:
            page = await http.get(f"{stack.base_url}/login?next={quote(target, safe='')}")
            assert page.status == 200
            assert next_field(await page.text()) == (target if target in SAME_SITE else "/dashboard"), target

        for target in OFF_SITE[:6] + SAME_SITE[:1]:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:  # a new tab
                form = await (await browser.get(f"{stack.base_url}/login")).text()
                csrf = re.search(r'<input type="hidden" name="([^"]+)" value="([^"]+)">', form)
                assert csrf and csrf.group(1) != "next"
                reply = await browser.post(f"{stack.base_url}/login", allow_redirects=False, data={
                    csrf.group(1): csrf.group(2), "username_or_email": "redirected", "password": PASSWORD,
                    "next": target})
                assert reply.status == 303, await reply.text()
                assert reply.headers["Location"] == (target if target in SAME_SITE else "/dashboard"), target


@pytest.fixture
async def behind_proxy():
    async def whoami(request: web.Request) -> web.Response:
        return web.json_response({"addr": client_addr(request), "secure": is_secure(request)})

    app = web.Application()
    app[TRUST_PROXY] = True
    app.router.add_get("/", whoami)
    client = TestClient(TestServer(app))
    await client.start_server()
    yield client
    await client.close()


@pytest.mark.rpc
async def test_behind_the_proxy_only_its_own_forwarded_value_counts(behind_proxy):
    async def seen(**headers: str) -> dict:
        return await (await behind_proxy.get("/", headers=headers)).json()

    # The client wrote the left-most values; the proxy appended the right-most.
    assert (await seen(**{"X-Forwarded-For": "1.2.3.4, 203.0.113.7"}))["addr"] == "203.0.113.7"
    assert (await seen(**{"X-Forwarded-For": "10.9.9.9,198.51.100.2"}))["addr"] == "198.51.100.2"
    assert (await seen(**{"X-Forwarded-For": "2001:db8::1"}))["addr"] == "2001:db8::1"
    # Not an address where the proxy writes: the socket's peer, never the client's text.
    assert (await seen(**{"X-Forwarded-For": "1.2.3.4, not-an-ip"}))["addr"] == "127.0.0.1"
    assert (await seen())["addr"] == "127.0.0.1"
    assert (await seen(**{"X-Forwarded-Proto": "https, http"}))["secure"] is False
    assert (await seen(**{"X-Forwarded-Proto": "http, https"}))["secure"] is True


@pytest.mark.unit
def test_a_link_planted_at_a_private_file_s_temporary_name_redirects_nothing(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    secret = tmp_path / "state" / "mesh.secret"
    secret.parent.mkdir()
    for name in ("mesh.secret.tmp", ".mesh.secret.tmp"):  # the names a naive writer would use
        os.symlink(victim, secret.parent / name)
    write_private_file(secret, b"s3cret\n")
    assert victim.read_text() == "untouched"
    assert secret.read_bytes() == b"s3cret\n" and not secret.is_symlink()
    assert secret.stat().st_mode & 0o777 == 0o600
    leftovers = {p.name for p in secret.parent.iterdir()} - {"mesh.secret", "mesh.secret.tmp", ".mesh.secret.tmp"}
    assert leftovers == set()
    assert Path(secret.parent / "mesh.secret.tmp").is_symlink()  # left alone, not followed


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
@pytest.mark.stack
async def test_a_cross_site_post_that_is_not_json_is_refused(stack, content_type):
    """What a page on another site can send without a CORS preflight: never acted on."""
    name = f"forged{content_type.split('/')[1][:5].replace('-', '')}"
    body = f'{{"username": "{name}", "email": "{name}@example.com", "password": "{PASSWORD}"}}'
    async with aiohttp.ClientSession() as http:
        reply = await http.post(f"{stack.base_url}/api/auth/register", data=body.encode(),
                                headers={"Content-Type": content_type, "Origin": "https://evil.example"})
        assert reply.status == 400
        error = (await reply.json())["error"]
        assert error["code"] == "DECODE_ERROR" and "application/json" in error["message"]
        # nothing was registered: the same account can still be made, as JSON
        made = await http.post(f"{stack.base_url}/api/auth/register", json={
            "username": name, "email": f"{name}@example.com", "password": PASSWORD})
        assert made.status == 201, await made.text()
