"""Attacks on how admins are made (issue 15, finding 1): each performed, each refused.

Admin used to follow `INFERSWARM_ADMIN_EMAILS`, at registration and on every
admin call, and addresses are never verified: whoever registered a listed
address first was admin. Now only the operator -- whoever holds the mesh
secret -- grants it, through the members-only `auth.grant_admin`:

* (a) registering an address that used to be an admin's confers nothing, and
  an auth configured with the old variable refuses to start;
* (b) an outsider's CURVE key (or a member node's own key) calling
  `auth.grant_admin` is `FORBIDDEN`;
* (c) a member grants admin and the user can set tiers at once; a revocation
  holds from the next call; both are audited;
* (d) `inferswarm admin grant` as a real CLI process against a real stack,
  with the local stack's secret (found through mesh.json), and a clear
  one-line refusal without it;
* (e) Unicode: the Kelvin sign, ligatures, fullwidth letters and invisible
  characters fold to one account -- a look-alike registration is `CONFLICT`,
  and every lookup (login, set_tier, grant) reaches the same account, also for
  accounts stored before names were folded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from shared.db import apply_migrations, create_pool
from shared.errors import Conflict, Forbidden, InvalidParams, NotFound
from shared.identity import MeshCredential, NodeIdentity
from shared.rpc import Connection
from services.auth.app import MIGRATIONS
from services.auth.passwords import Argon2Params, PasswordHasher
from services.auth.validation import fold
from auth_support import ADMIN_EMAIL, PASSWORD, Auth, outsider, start_auth
from stack import Cli, free_udp_port, read_ready, start_up, xdg_homes

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
#: Addresses that were, in some deployment or test, on the admin list.
FORMER_ADMIN_EMAILS = [ADMIN_EMAIL, "admin@example.com", "ops@example.org"]


async def login(connection: Connection, who: str) -> dict:
    return await connection.call("auth.login", {"username_or_email": who, "password": PASSWORD})


async def register(connection: Connection, username: str, email: str) -> dict:
    return await connection.call("auth.register", {"username": username, "email": email, "password": PASSWORD})


# -- (a) an address confers nothing --------------------------------------------------------------


@pytest.mark.db
async def test_registering_a_former_admin_address_confers_nothing(pg_dsn, tmp_path, db):
    async with AsyncExitStack() as stack:
        auth = await Auth(stack, await start_auth(stack, tmp_path, pg_dsn)).start()
        stranger = await auth.connect(outsider())
        await register(stranger, "victim", "victim@example.com")
        for i, email in enumerate(FORMER_ADMIN_EMAILS):
            user = await register(stranger, f"claimer{i}", email.upper() if i else email)
            assert user["is_admin"] is False
            session = await login(stranger, f"claimer{i}")
            assert session["user"]["is_admin"] is False
            token = session["token"]
            assert (await stranger.call("auth.me", {"token": token}))["is_admin"] is False
            for name, params in [
                ("auth.set_tier", {"token": token, "user": "victim", "tier": "unlimited"}),
                ("auth.set_tier", {"token": token, "user": f"claimer{i}", "tier": "unlimited"}),
                ("auth.set_active", {"token": token, "user": "victim", "active": False}),
                ("auth.list_users", {"token": token}),
            ]:
                with pytest.raises(Forbidden):
                    await stranger.call(name, params)
        # A parameter named is_admin is no way in either.
        with pytest.raises(InvalidParams):
            await stranger.call("auth.register", {"username": "sneaky", "email": "sneaky@example.com",
                                                  "password": PASSWORD, "is_admin": True})
        assert await db.fetchval("SELECT count(*) FROM users WHERE is_admin") == 0
        assert await db.fetchval("SELECT tier FROM users WHERE username = 'victim'") == "free"


@pytest.mark.rpc
def test_auth_refuses_to_start_with_the_retired_admin_list(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_")},
           "INFERSWARM_DATA_DIR": str(tmp_path), "INFERSWARM_ADMIN_EMAILS": "ops@example.org"}
    done = subprocess.run([sys.executable, "-m", "services.auth"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "INFERSWARM_ADMIN_EMAILS: no longer read" in done.stderr
    assert "inferswarm admin grant USER" in done.stderr
    assert not (tmp_path / "auth").exists()  # stopped before anything: no key, no database


# -- (b) outsiders cannot grant ------------------------------------------------------------------


@pytest.mark.db
async def test_an_outsider_key_cannot_grant_or_revoke_admin(pg_dsn, tmp_path, db):
    async with AsyncExitStack() as stack:
        auth = await Auth(stack, await start_auth(stack, tmp_path, pg_dsn)).start()
        assert not auth.calls.dispatcher.get("auth.grant_admin").spec.public
        assert not auth.calls.dispatcher.get("auth.revoke_admin").spec.public
        stranger = await auth.connect(outsider())
        await register(stranger, "mallory", "mallory@example.com")
        token = (await login(stranger, "mallory"))["token"]
        member_node = NodeIdentity.generate()  # a genuine node's own key is not the mesh client key
        other_mesh = MeshCredential(MeshCredential.new_secret())  # nor is another mesh's
        for keys in (outsider(), member_node.curve, other_mesh.client, auth.node.curve):
            caller = await auth.connect(keys)
            for params in ({"user": "mallory"}, {"user": "mallory", "reason": "trust me"}, {"user": 1}):
                with pytest.raises(Forbidden) as refused:
                    await caller.call("auth.grant_admin", params)
                assert "mesh members only" in refused.value.message
            with pytest.raises(Forbidden):
                await caller.call("auth.revoke_admin", {"user": "mallory"})
            # The caller can still do what it may: the refusal is per method.
            assert (await caller.call("auth.me", {"token": token}))["is_admin"] is False
        with pytest.raises(Forbidden):
            await stranger.call("auth.set_tier", {"token": token, "user": "mallory", "tier": "unlimited"})
        assert await db.fetchval("SELECT is_admin FROM users WHERE username = 'mallory'") is False
        assert await db.fetchval("SELECT count(*) FROM audit_log WHERE event LIKE 'admin%'") == 0


# -- (c) the operator grants and revokes ---------------------------------------------------------


@pytest.mark.db
async def test_a_member_grants_admin_and_a_revocation_holds_from_the_next_call(pg_dsn, tmp_path, db):
    async with AsyncExitStack() as stack:
        auth = await Auth(stack, await start_auth(stack, tmp_path, pg_dsn)).start()
        web = await auth.connect(outsider())
        operator = await auth.connect()  # the mesh client key
        await register(web, "target", "target@example.com")
        await register(web, "boss", "boss@example.com")  # the public hears no id: the login says it
        session = await login(web, "boss")  # logged in before the grant: the same token works
        token, boss = session["token"], session["user"]
        with pytest.raises(Forbidden):
            await web.call("auth.set_tier", {"token": token, "user": "target", "tier": "pro"})

        granted = await operator.call("auth.grant_admin", {"user": "boss@EXAMPLE.com", "reason": "on call"})
        assert granted["id"] == boss["id"] and granted["is_admin"] and granted["changed"]
        assert (await web.call("auth.set_tier", {"token": token, "user": "target", "tier": "pro"}))["tier"] == "pro"
        assert (await web.call("auth.me", {"token": token}))["is_admin"] is True
        assert [u["username"] for u in await web.call("auth.list_users", {"token": token})] == ["target", "boss"]
        again = await operator.call("auth.grant_admin", {"user": boss["id"]})
        assert again["is_admin"] and not again["changed"]

        revoked = await operator.call("auth.revoke_admin", {"user": "boss", "reason": "rotation"})
        assert revoked["is_admin"] is False and revoked["changed"]
        with pytest.raises(Forbidden):  # the very next call, same token, no waiting
            await web.call("auth.set_tier", {"token": token, "user": "target", "tier": "enterprise"})
        assert (await web.call("auth.me", {"token": token}))["is_admin"] is False
        assert not (await operator.call("auth.revoke_admin", {"user": "boss"}))["changed"]

        events = await db.fetch("SELECT event, user_id, actor_id, details FROM audit_log "
                                "WHERE event LIKE 'admin%' ORDER BY id")
        assert [(e["event"], e["user_id"], e["actor_id"]) for e in events] == [
            ("admin_granted", boss["id"], None), ("admin_revoked", boss["id"], None)]
        assert [json.loads(e["details"])["reason"] for e in events] == ["on call", "rotation"]

        with pytest.raises(NotFound):
            await operator.call("auth.grant_admin", {"user": "nobody"})
        for bad in ({"user": 0}, {"user": ""}, {"user": "boss", "reason": "line\nbreak"},
                    {"user": "boss", "reason": "x" * 101}, {"user": 1.5}, {}):
            with pytest.raises(InvalidParams):
                await operator.call("auth.grant_admin", bad)
        assert await db.fetchval("SELECT count(*) FROM users WHERE is_admin") == 0


# -- (d) `inferswarm admin grant` against a real stack -------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("admin-stack") / "data"
    port = free_udp_port()
    models = {"echo": {"backend": "echo", "slots": 2, "queue": 4}}
    proc = start_up(data_dir, port, "--workers", "1", env={
        "INFERSWARM_MODELS": json.dumps(models), "INFERSWARM_ARGON2_TIME_COST": "1",
        "INFERSWARM_ARGON2_MEMORY_KIB": "8", "INFERSWARM_ARGON2_PARALLELISM": "1"})
    try:
        read_ready(proc)
        yield data_dir, port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def operator_cli(data_dir: Path, *args: str, config_home: Path | None = None, **env: str):
    """`inferswarm admin ...` as the stack's user on its host: nothing but the XDG homes
    `up` wrote mesh.json into (no data dir, no bootstrap, no secret in the environment)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_")}
    homes = xdg_homes(data_dir)
    if config_home is not None:
        homes["XDG_CONFIG_HOME"] = str(config_home)
    return subprocess.run([sys.executable, "-m", "inferswarm.cli", "admin", *args], capture_output=True,
                          text=True, timeout=60, env={**base, **homes, **env})


@pytest.mark.timeout(240)
@pytest.mark.stack
def test_admin_grant_as_a_cli_process_with_the_local_stacks_secret(stack, tmp_path):
    data_dir, port = stack
    dave = Cli(data_dir, port, tmp_path / "dave")
    for name in ("dave", "erin"):
        done = dave("register", name, f"{name}@example.com", "--password-stdin", stdin=PASSWORD)
        assert done.returncode == 0, done.stderr
    assert dave("login", "dave", "--password-stdin", stdin=PASSWORD).returncode == 0
    refused = dave("admin", "set-tier", "erin", "pro")
    assert refused.returncode == 3 and "administrators only" in refused.stderr

    granted = operator_cli(data_dir, "grant", "dave", "--reason", "first admin")
    assert granted.returncode == 0, granted.stderr
    assert "dave (id " in granted.stdout and "dave@example.com) is now an administrator" in granted.stdout
    assert dave("admin", "set-tier", "erin", "pro").returncode == 0
    again = operator_cli(data_dir, "grant", "DAVE@example.com", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["changed"] is False

    revoked = operator_cli(data_dir, "revoke", "dave")
    assert revoked.returncode == 0 and "is no longer an administrator" in revoked.stdout
    refused = dave("admin", "set-tier", "erin", "free")
    assert refused.returncode == 3 and "administrators only" in refused.stderr


@pytest.mark.timeout(240)
@pytest.mark.stack
def test_admin_grant_without_the_secret_stops_with_one_clear_line(stack, tmp_path):
    data_dir, port = stack
    mesh = json.loads((Path(xdg_homes(data_dir)["XDG_CONFIG_HOME"]) / "inferswarm" / "mesh.json").read_text())
    user = Cli(data_dir, port, tmp_path / "frank")
    assert user("register", "frank", "frank@example.com", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert user("login", "frank", "--password-stdin", stdin=PASSWORD).returncode == 0

    # Another user of the machine (no mesh.json), who knows where the mesh is and its public id.
    elsewhere = operator_cli(data_dir, "grant", "frank", "--bootstrap", f"127.0.0.1:{port}",
                             config_home=tmp_path / "empty", INFERSWARM_MESH_ID=mesh["mesh_id"])
    # A mesh.json whose data directory holds no readable secret.
    (tmp_path / "other" / "inferswarm").mkdir(parents=True)
    (tmp_path / "other" / "inferswarm" / "mesh.json").write_text(json.dumps({**mesh, "data_dir": str(tmp_path)}))
    unreadable = operator_cli(data_dir, "grant", "frank", config_home=tmp_path / "other")
    # A data directory without the secret.
    no_secret = operator_cli(data_dir, "grant", "frank", "--data-dir", str(tmp_path / "nothing"))
    for refused, says in ((elsewhere, "there is none here"), (unreadable, f"cannot read {tmp_path}/mesh.secret"),
                          (no_secret, "cannot read")):
        assert refused.returncode == 3, refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("inferswarm: `inferswarm admin grant` needs the mesh secret")
        assert says in lines[0] and "Traceback" not in refused.stderr and refused.stdout == ""
    assert "INFERSWARM_MESH_SECRET" in elsewhere.stderr
    bad = operator_cli(data_dir, "grant", "frank", INFERSWARM_MESH_SECRET="not-hex")
    assert bad.returncode == 3 and bad.stderr.startswith("inferswarm: INFERSWARM_MESH_SECRET:")
    still = user("admin", "set-tier", "frank", "pro")
    assert still.returncode == 3 and "administrators only" in still.stderr


# -- (e) Unicode: look-alike names are one account -----------------------------------------------


@pytest.mark.unit
def test_fold_makes_compatibility_and_case_variants_one_name():
    assert fold("\u212aIM@Example.com") == fold("kim@example.com") == "kim@example.com"  # Kelvin sign
    assert fold("\ufb01ona@example.com") == "fiona@example.com"  # the "fi" ligature
    assert fold("\uff41dmin@example.com") == "admin@example.com"  # fullwidth a
    assert fold("ad\u200bmin@example.com") == fold("ad\u00admin@example.com") == "admin@example.com"
    assert fold("Stra\u00dfe@example.com") == "strasse@example.com"
    assert fold("\u0430dmin@example.com") != "admin@example.com"  # Cyrillic: another letter, kept apart


KIM_VARIANTS = ["\u212aim@example.com", "\u212aIM@EXAMPLE.COM", "\uff4bim@example.com", "k\u200bim@example.com",
                "KIM@example.com"]


@pytest.mark.db
async def test_look_alike_registrations_conflict_and_every_lookup_reaches_one_account(pg_dsn, tmp_path, db):
    async with AsyncExitStack() as stack:
        auth = await start_auth(stack, tmp_path, pg_dsn)
        kim = await auth("register", username="kim", email="kim@example.com", password=PASSWORD)
        for i, variant in enumerate(KIM_VARIANTS):
            with pytest.raises(Conflict):
                await auth("register", username=f"kim{i}", email=variant, password=PASSWORD)
        # The other way round: the look-alike first, the plain address is then taken.
        fiona = await auth("register", username="fiona", email="\ufb01ona@example.com", password=PASSWORD)
        with pytest.raises(Conflict):
            await auth("register", username="fiona2", email="fiona@example.com", password=PASSWORD)
        for bad_username in ("\u212aim", "\uff4bim2", "ki\u200bm"):  # usernames are ASCII
            with pytest.raises(InvalidParams):
                await auth("register", username=bad_username, email="x@example.com", password=PASSWORD)
        assert await db.fetchval("SELECT count(*) FROM users") == 2

        for variant in KIM_VARIANTS + ["kim", "KIM"]:
            assert (await auth("login", username_or_email=variant, password=PASSWORD))["user"]["id"] == kim["id"]
        assert (await auth("login", username_or_email="FIONA@example.com", password=PASSWORD))["user"]["id"] \
            == fiona["id"]

        granted = await auth("grant_admin", user="\u212aIM@example.com")
        assert granted["id"] == kim["id"] and granted["email"] == "kim@example.com"
        admin = (await auth("login", username_or_email="kim", password=PASSWORD))["token"]
        moved = await auth("set_tier", token=admin, user="FIONA@EXAMPLE.COM", tier="pro")
        assert moved["id"] == fiona["id"] and moved["tier"] == "pro"
        with pytest.raises(NotFound):  # a different letter is a different (unknown) account
            await auth("set_tier", token=admin, user="\u043aim@example.com", tier="pro")


@pytest.mark.db
async def test_accounts_stored_before_folding_are_folded_and_old_admins_withdrawn(pg_dsn, tmp_path, db):
    """A database at migration 0005, as the previous version left it: an admin made by the
    email list, and two addresses that `lower()` kept apart but that fold alike."""
    old = tmp_path / "migrations-0005"
    old.mkdir()
    for path in sorted(MIGRATIONS.glob("*.sql"))[:5]:
        shutil.copy(path, old / path.name)
    assert sorted(p.name for p in old.iterdir())[-1].startswith("0005_")
    pool = await create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        await apply_migrations(pool, old)
        hashed = await PasswordHasher(Argon2Params(1, 8, 1)).hash(PASSWORD)
        for username, email, is_admin in [("root", "root@example.org", True), ("fiona", "fiona@example.com", False),
                                          ("fiona2", "\ufb01ona@example.com", False),
                                          ("kelvin", "\u212aim@example.com", False)]:
            await pool.execute("INSERT INTO users (username, email, password_hash, is_admin) VALUES ($1, $2, $3, $4)",
                               username, email, hashed, is_admin)
    finally:
        await pool.close()

    async with AsyncExitStack() as stack:
        auth = await start_auth(stack, tmp_path, pg_dsn)
        ids = {r["username"]: r["id"] for r in await db.fetch("SELECT id, username FROM users")}
        assert await db.fetchval("SELECT count(*) FROM users WHERE is_admin") == 0
        withdrawn = await db.fetchrow("SELECT user_id, details FROM audit_log WHERE event = 'admin_revoked'")
        assert withdrawn["user_id"] == ids["root"] and "INFERSWARM_ADMIN_EMAILS" in withdrawn["details"]
        keys = {r["username"]: r["email_key"] for r in await db.fetch("SELECT username, email_key FROM users")}
        assert keys == {"root": "root@example.org", "fiona": "fiona@example.com", "fiona2": None,
                        "kelvin": "kim@example.com"}

        async def who(identifier: str) -> str:
            return (await auth("login", username_or_email=identifier, password=PASSWORD))["user"]["username"]

        assert await who("fiona@example.com") == "fiona"
        assert await who("\ufb01ona@example.com") == "fiona2"  # its exact name still reaches it
        assert await who("FIONA@example.com") == "fiona"  # a folded form: the older account
        assert await who("kim@example.com") == "kelvin"
        for taken in ("Fiona@Example.com", "\ufb01ONA@example.com", "kim@example.com"):
            with pytest.raises(Conflict):
                await auth("register", username="newcomer", email=taken, password=PASSWORD)
        with pytest.raises(Forbidden):  # the old admin must be granted again
            await auth("list_users", token=(await auth("login", username_or_email="root",
                                                       password=PASSWORD))["token"])
    # A second start has nothing more to fold, and changes nothing.
    async with AsyncExitStack() as stack:
        await start_auth(stack, tmp_path, pg_dsn)
        again = {r["username"]: r["email_key"] for r in await db.fetch("SELECT username, email_key FROM users")}
        assert again == keys
