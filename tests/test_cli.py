"""The CLI as a user meets it: `inferswarm up`, then client commands in a shell."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from stack import Cli, free_udp_port, read_ready, start_up

pytestmark = pytest.mark.stack

PASSWORD = "correct-horse-battery-9"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("stack") / "data"
    port = free_udp_port()
    # A small monthly token budget for the free tier, to meet RATE_LIMITED.
    proc = start_up(data_dir, port, "--workers", "1", env={"INFERSWARM_TIER_FREE_TOKENS_PER_MONTH": "400"})
    try:
        ready = read_ready(proc)
        yield data_dir, port, ready
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.fixture
def cli(stack, tmp_path):
    data_dir, port, _ = stack
    return Cli(data_dir, port, tmp_path / "config")


@pytest.mark.timeout(240)
def test_account_and_key_tour(cli, tmp_path):
    registered = cli("register", "carol", "carol@example.com", "--password-stdin", "--json", stdin=PASSWORD)
    assert registered.returncode == 0, registered.stderr
    assert json.loads(registered.stdout)["username"] == "carol"

    logged_in = cli("login", "carol", "--password-stdin", stdin=PASSWORD)
    assert logged_in.returncode == 0 and "logged in as carol" in logged_in.stdout
    saved = tmp_path / "config" / "inferswarm" / "credentials.json"
    assert saved.stat().st_mode & 0o777 == 0o600

    created = cli("keys", "create", "laptop", "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["api_key"].startswith("isk_")
    assert key["api_key"] not in cli("keys", "list").stdout  # shown once, never listed

    listed = json.loads(cli("keys", "list", "--json").stdout)
    assert [(k["name"], k["status"]) for k in listed] == [("laptop", "active")]
    revoked = cli("keys", "revoke", str(key["id"]))
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert json.loads(cli("keys", "list", "--json").stdout)[0]["status"] == "revoked"

    usage = cli("usage", "--json")
    assert usage.returncode == 0 and "days" in json.loads(usage.stdout)

    session = saved.read_text()
    logged_out = cli("logout", "--json")
    assert logged_out.returncode == 0 and json.loads(logged_out.stdout) == {"logged_out": True, "session_ended": True}
    assert not saved.exists()
    # The session ended on the mesh, not only here: its token is refused from now on.
    saved.write_text(session)
    refused = cli("keys", "list")
    assert refused.returncode != 0 and "session ended" in refused.stderr


@pytest.mark.timeout(240)
def test_keys_rotate_prints_the_new_key_once_and_when_the_old_one_stops(cli, stack, tmp_path):
    _, _, ready = stack
    assert cli("register", "rory", "rory@example.com", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert cli("login", "rory", "--password-stdin", stdin=PASSWORD).returncode == 0
    first = json.loads(cli("keys", "create", "deploy", "--json").stdout)
    saved = tmp_path / "config" / "inferswarm" / "credentials.json"

    rotated = cli("keys", "rotate", str(first["id"]), "--overlap", "90m")
    assert rotated.returncode == 0, rotated.stderr
    secret, *rest = rotated.stdout.splitlines()
    assert secret.startswith("isk_") and secret != first["api_key"]
    assert "shown once" in rotated.stdout and f"old key {first['id']}" in rotated.stdout
    assert "keeps working until" in rotated.stdout and "(in 90 min)" in rotated.stdout
    assert json.loads(saved.read_text())["api_key"] == secret  # saved, as `keys create` does
    listed = json.loads(cli("keys", "list", "--json").stdout)
    assert [(k["name"], k["status"], k["rotated_from"]) for k in listed] == [
        ("deploy", "active", None), ("deploy", "active", first["id"])]
    assert secret not in cli("keys", "list").stdout

    # Over the web service's HTTP API, the same; --overlap 0 stops the old key at once.
    again = cli("keys", "rotate", str(listed[1]["id"]), "--overlap", "0", "--json", "--base-url", ready["dashboard"].rstrip("/"))
    assert again.returncode == 0, again.stderr
    answer = json.loads(again.stdout)
    assert answer["rotated_from"] == listed[1]["id"] and answer["old_key"]["status"] == "expired"
    assert json.loads(saved.read_text())["api_key"] == answer["api_key"]

    for args, code, words in [(("--overlap", "soon"), 2, "expected a duration"),
                              (("--overlap", "31d"), 9, "overlap_seconds"),
                              ((), 8, "already rotated")]:
        refused = cli("keys", "rotate", str(first["id"]), *args)
        assert refused.returncode == code and words in refused.stderr, (args, refused.returncode, refused.stderr)
    gone = cli("keys", "rotate", str(listed[1]["id"]))
    assert gone.returncode != 0 and "expired key cannot be rotated" in gone.stderr


@pytest.mark.timeout(240)
def test_status_shows_every_service_to_an_admin_only(cli, stack):
    data_dir, _, _ = stack
    assert cli("register", "stan", "stan@example.com", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert cli("login", "stan", "--password-stdin", stdin=PASSWORD).returncode == 0
    refused = cli("status")
    assert refused.returncode == 3 and "administrators" in refused.stderr  # endpoints are not for everyone
    assert cli("admin", "grant", "stan", "--data-dir", str(data_dir)).returncode == 0  # the operator's doing
    # Gateways reuse a token's answer for up to a second; the first health round takes a couple.
    deadline = time.monotonic() + 20
    while True:
        result = cli("status", "--json")
        assert result.returncode == 0 or time.monotonic() < deadline, result.stderr
        services = set()
        if result.returncode == 0:
            report = json.loads(result.stdout)
            services = {i["service"] for i in report["instances"] if i["status"] == "ok"}
        if {"auth", "inference", "metrics"} <= services or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {"auth", "inference", "metrics"} <= services
    assert report["models"]["smollm2"]["workers"] == 1
    table = cli("status")
    assert table.returncode == 0 and "auth" in table.stdout and "smollm2" in table.stdout


@pytest.mark.timeout(240)
def test_requests_reach_prometheus_through_the_metrics_service(cli, stack):
    _, _, ready = stack
    assert cli("register", "erin", "erin@example.com", "--password-stdin", stdin=PASSWORD).returncode == 0
    wanted = 'inferswarm_requests_total{code="OK",method="auth.register",service="auth"}'
    assert wanted in scrape_until(ready["metrics"], [wanted])  # reporters push every second


@pytest.mark.timeout(240)
def test_error_paths_print_one_line_and_a_meaningful_exit_code(cli, stack, tmp_path):
    data_dir, port, _ = stack
    assert cli("register", "dave", "dave@example.com", "--password-stdin", stdin=PASSWORD).returncode == 0
    cases = [
        (("register", "dave", "dave@example.com", "--password-stdin"), PASSWORD, 8, "already registered"),
        (("login", "dave", "--password-stdin"), "not-the-password", 3, "unauthenticated"),
        (("register", "x", "not-an-email", "--password-stdin"), PASSWORD, 9, "invalid params"),
        (("keys", "list"), None, 3, "not logged in"),
        (("admin", "set-tier", "dave", "pro"), None, 3, "not logged in"),
    ]
    for args, stdin, code, fragment in cases:
        result = cli(*args, stdin=stdin)
        assert result.returncode == code, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0].lower(), (args, result.stderr)
        assert "Traceback" not in result.stderr

    # The DHT is joined only when the provider cache cannot answer: a fresh one here.
    unreachable = cli("models", "--bootstrap", f"127.0.0.1:{free_udp_port()}",
                      XDG_CACHE_HOME=str(tmp_path / "fresh-cache"))
    assert unreachable.returncode == 6
    assert "cannot reach the mesh" in unreachable.stderr


@pytest.mark.timeout(240)
def test_infer_streams_tokens_as_they_arrive_then_hits_the_token_budget(cli, stack):
    assert cli("register", "fay", "fay@example.com", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert cli("login", "fay", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert cli("keys", "create", "k").returncode == 0

    # Streamed: the first text is on stdout well before the command ends.
    proc = subprocess.Popen([sys.executable, "-m", "inferswarm.cli", "infer",
                             "Tell a long story about a lighthouse keeper.", "--max-tokens", "120",
                             "--temperature", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli.env)
    first = proc.stdout.read(1)
    first_at = time.monotonic()
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert first and len(rest) > 20
    assert time.monotonic() - first_at > 0.3  # more tokens kept coming after the first

    answer = json.loads(cli("infer", "Say hi.", "--max-tokens", "150", "--json").stdout)
    assert answer["text"] and answer["usage"]["completion_tokens"] <= 150
    assert answer["rate_limit"]["tokens_per_month"]["limit"] == 400

    # Budgets are reserved from max_tokens and settled to what was used: asking
    # for the whole budget once some of it was used is refused. (Reservations
    # that do not fit by one token are tested in test_gateway_quota.py: `quota`
    # reports what this gateway can vouch for, which is less than what is left
    # while an expired lease's unused units are on their way back.)
    remaining = json.loads(cli("quota", "--json").stdout)["rate_limit"]["tokens_per_month"]["remaining"]
    assert 0 < remaining < 400
    refused = cli("infer", "Say hi.", "--max-tokens", "400")
    assert refused.returncode == 4, refused.stderr
    line = refused.stderr.strip()
    assert line.startswith("inferswarm: rate limited: ") and "tokens left this month, resets in" in line

    unknown = cli("infer", "x", "--model", "no-such-model")
    assert unknown.returncode == 5 and "available: minilm, smollm2" in unknown.stderr

    models = json.loads(cli("models", "--json").stdout)["models"]
    assert [m["name"] for m in models] == ["minilm", "smollm2"]
    quota = json.loads(cli("quota", "--json").stdout)
    assert quota["tier"] == "free" and quota["rate_limit"]["requests_per_hour"]["limit"] == 100

    # The gateway's view reached Prometheus: tokens, time to first token, the refusal.
    wanted = ['inferswarm_tokens_total{direction="out",model="smollm2"}',
              'inferswarm_time_to_first_token_seconds_count{model="smollm2"}',
              'inferswarm_rate_limit_violations_total{tier="free"}']
    assert all(line in scrape_until(stack[2]["metrics"], wanted) for line in wanted)


def scrape_until(url: str, wanted: list[str], seconds: float = 15) -> str:
    """The metrics exposition, once it holds every wanted series (or the last one read)."""
    deadline, exposition = time.monotonic() + seconds, ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=5) as response:
            exposition = response.read().decode()
        if all(line in exposition for line in wanted):
            break
        time.sleep(0.5)
    return exposition


@pytest.mark.timeout(240)
def test_chat_answers_each_line_and_ends_at_end_of_input(cli):
    assert cli("register", "gil", "gil@example.com", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert cli("login", "gil", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert cli("keys", "create", "k").returncode == 0
    result = cli("chat", "--max-tokens", "12", "--temperature", "0", "--json",
                 stdin="Hello!\nWhat did I just say?\n")
    assert result.returncode == 0, result.stderr
    conversation = json.loads(result.stdout.splitlines()[-1])["messages"]
    assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
    assert all(m["content"] for m in conversation)
