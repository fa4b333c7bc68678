"""The CLI over HTTP (`--base-url`): what it prints over the mesh, through the web service.

A real stack with the web service (tests/web_support.py), whose worker serves
"test-model": its answer is always `REPLY`, one token per word, honouring
`max_tokens` and `stop`. The real `inferswarm` command runs in subprocesses,
over HTTP knowing nothing but the URL (no mesh id, no bootstrap), and over the
mesh to compare: same output, same error line, same exit code. The free tier
here has a monthly budget of `TOKEN_BUDGET` tokens, to meet RATE_LIMITED.

`test_json_schema_answers_are_valid_json` runs the local smollm2 model (a stack
of its own, `inferswarm up` with its defaults).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stack import free_tcp_port, free_udp_port, read_ready, start_up
from waiting import wait_until_sync
from web_support import MODEL, PASSWORD, WebStack, web_stack

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]

REPLY = "The quick brown fox jumps over the lazy dog near the quiet river bank"
TOKEN_BUDGET = 3000
BAD_KEY = "isk_" + "x" * 43


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("cli-http"),
                   INFERSWARM_TIER_FREE_TOKENS_PER_MONTH=str(TOKEN_BUDGET)) as running:
        yield running


class User:
    """One person with the CLI: a config home of their own, the stack over HTTP or over the mesh."""

    def __init__(self, base_url: str, bootstrap: str, data_dir: Path, home: Path) -> None:
        self.base_url = base_url
        clean = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_")}
        self.env = {**clean, "XDG_CONFIG_HOME": str(home / "config"), "XDG_CACHE_HOME": str(home / "cache")}
        self.mesh_env = {**self.env, "INFERSWARM_BOOTSTRAP": bootstrap, "INFERSWARM_DATA_DIR": str(data_dir)}

    def http(self, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
        """`inferswarm ARGS --base-url URL`."""
        return _run([*args, "--base-url", self.base_url], {**self.env, **env}, stdin)

    def mesh(self, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
        return _run(list(args), {**self.mesh_env, **env}, stdin)

    def popen(self, *args: str, text: bool = True, stdin: int | None = None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "inferswarm.cli", *_model(list(args)), "--base-url",
                                 self.base_url],
                                stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text, env=self.env)


def _run(args: list[str], env: dict[str, str], stdin: str | None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferswarm.cli", *_model(args)], input=stdin,
                          capture_output=True, text=True, timeout=90, env=env)


def _model(args: list[str]) -> list[str]:
    """`infer` and `chat` ask for the test model unless told another (the CLI's default is smollm2)."""
    return [*args, "--model", MODEL] if args[0] in ("infer", "chat") and "--model" not in args else args


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    return result.stdout


def one_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The error line of a command that failed with exit code `code`."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("inferswarm: "), result.stderr
    return lines[0]


def new_user(stack: WebStack, home: Path, name: str, **env: str) -> User:
    """An account with a saved session and API key, made over HTTP (`env`: more of the CLI's environment)."""
    user = User(stack.base_url, stack.bootstrap, stack.data_dir, home)
    user.env.update(env)
    registered = json.loads(ok(user.http("register", name, f"{name}@example.com", "--password-stdin", "--json",
                                         stdin=PASSWORD)))
    assert registered["username"] == name
    assert ok(user.http("login", name, "--password-stdin", stdin=PASSWORD)) == f"logged in as {name}\n"
    assert json.loads(ok(user.http("keys", "create", "cli", "--json")))["api_key"].startswith("isk_")
    return user


def test_account_keys_models_quota_and_usage_over_http(stack, tmp_path):
    user = new_user(stack, tmp_path, "hal")
    listed = json.loads(ok(user.http("keys", "list", "--json")))
    assert [(k["name"], k["status"]) for k in listed] == [("cli", "active")]

    assert ok(user.http("models")) == ok(user.mesh("models"))
    assert [m["name"] for m in json.loads(ok(user.http("models", "--json")))["models"]] == [MODEL]

    quota = json.loads(ok(user.http("quota", "--json")))
    assert quota["tier"] == "free" and quota["rate_limit"]["tokens_per_month"]["limit"] == TOKEN_BUDGET
    assert ok(user.http("quota")).startswith("tier: free\ncounter")

    assert ok(user.http("infer", "Hi.", "--max-tokens", "3")) == "The quick brown \n"

    def counted() -> dict | None:  # gateways ship usage to auth in batches
        report = json.loads(ok(user.http("usage", "--json")))
        return report if report["totals"]["requests"] >= 1 else None

    report = wait_until_sync(counted, 30, interval=0.5, message="the request never reached the usage report")
    assert report["totals"]["tokens"] >= 3
    assert ok(user.http("usage")) == ok(user.mesh("usage"))

    saved = Path(user.env["XDG_CONFIG_HOME"]) / "inferswarm" / "credentials.json"
    session = saved.read_text()
    assert ok(user.http("logout", "--json")) == '{"logged_out": true, "session_ended": true}\n'
    assert not saved.exists()
    saved.write_text(session)  # the session ended on the server, not only here: its token is refused
    assert "session ended" in one_line(user.http("usage"), 3)


def test_infer_prints_what_the_mesh_path_prints(stack, tmp_path):
    user = new_user(stack, tmp_path, "ida")
    for args in (["infer", "Say something.", "--max-tokens", "4"],
                 ["infer", "Say something.", "--max-tokens", "4", "--no-stream"],
                 ["infer", "-", "--max-tokens", "30"]):
        over_http = ok(user.http(*args, stdin="Tell me."))
        assert over_http == ok(user.mesh(*args, stdin="Tell me.")), args
    assert over_http == REPLY + "\n"

    answer = json.loads(ok(user.http("infer", "Say something.", "--max-tokens", "5", "--json")))
    mesh_answer = json.loads(ok(user.mesh("infer", "Say something.", "--max-tokens", "5", "--json")))
    for name in ("text", "finish_reason", "usage"):
        assert answer[name] == mesh_answer[name], name
    assert answer["text"] == "The quick brown fox jumps " and answer["finish_reason"] == "length"
    assert answer["model"] == MODEL and answer["usage"]["completion_tokens"] == 5
    assert set(answer) == {"text", "model", "id", "finish_reason", "usage", "receipt"}, (answer, mesh_answer)
    assert answer["receipt"].startswith("isr-v1.") and mesh_answer["receipt"].startswith("isr-v1.")

    # The same through INFERSWARM_BASE_URL, with a key given by INFERSWARM_API_KEY only.
    key = json.loads(ok(user.http("keys", "create", "env", "--json")))["api_key"]
    bare = User(stack.base_url, stack.bootstrap, stack.data_dir, tmp_path / "bare")
    env_only = _run(["infer", "Hi.", "--max-tokens", "2"],
                    {**bare.env, "INFERSWARM_BASE_URL": stack.base_url + "/v1", "INFERSWARM_API_KEY": key}, None)
    assert ok(env_only) == "The quick \n"


def test_system_top_p_stop_and_seed_reach_the_model_on_both_paths(stack, tmp_path):
    user = new_user(stack, tmp_path, "jon")
    args = ["infer", "Go on.", "--system", "Be brief.", "--top-p", "0.5", "--stop", "lazy", "--stop", "river",
            "--seed", "7", "--temperature", "0"]
    sent = len(stack.model.requests)
    assert ok(user.http(*args)) == ok(user.mesh(*args)) == "The quick brown fox jumps over the \n"
    bodies = [body for path, body in stack.model.requests[sent:] if path.endswith("/chat/completions")]
    assert len(bodies) == 2
    for body in bodies:
        assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Go on."}]
        assert (body["top_p"], body["seed"], body["stop"], body["temperature"]) == (0.5, 7, ["lazy", "river"], 0)


def test_chat_over_http(stack, tmp_path):
    user = new_user(stack, tmp_path, "kim")
    args = ["chat", "--max-tokens", "3", "--system", "Be brief."]
    over_http = ok(user.http(*args, stdin="Hello!\nAgain?\n"))
    assert over_http == ok(user.mesh(*args, stdin="Hello!\nAgain?\n"))
    assert over_http == "you> The quick brown \nyou> The quick brown \nyou> \n"
    conversation = json.loads(ok(user.http(*args, "--json", stdin="Hello!\nAgain?\n")).splitlines()[-1])
    assert [(m["role"], m["content"]) for m in conversation["messages"]] == [
        ("user", "Hello!"), ("assistant", "The quick brown "), ("user", "Again?"), ("assistant", "The quick brown ")]


def test_tokens_are_printed_as_they_arrive(stack, tmp_path):
    user = new_user(stack, tmp_path, "mia")
    stack.model.token_delay = 0.1
    try:
        proc = user.popen("infer", "Count.", "--max-tokens", "8", text=False)
        first = proc.stdout.read(1)
        first_at = time.monotonic()
        rest = proc.stdout.read()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        stack.model.token_delay = 0.0
    assert first + rest == b"The quick brown fox jumps over the lazy \n"
    assert time.monotonic() - first_at > 0.3  # the other seven words came later, one by one


def test_ctrl_c_in_chat_stops_the_answer_at_the_model_server(stack, tmp_path):
    user = new_user(stack, tmp_path, "noa")
    stack.model.token_delay = 0.2
    try:
        before = stack.model.disconnects
        proc = user.popen("chat", "--max-tokens", "14", text=False, stdin=subprocess.PIPE)
        proc.stdin.write(b"Hello!\n")
        proc.stdin.flush()
        assert proc.stdout.read(len(b"you> The")) == b"you> The"  # the answer has begun
        proc.send_signal(signal.SIGINT)
        wait_until_sync(lambda: stack.model.disconnects > before, 10,
                        message="the model server never saw the generation stop")
        proc.stdin.close()
        rest = proc.stdout.read()
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        stack.model.token_delay = 0.0
    assert rest.endswith(b"\nyou> \n") and b"river" not in rest  # cut short, then the chat went on


def test_ten_calls_in_a_row_then_four_at_once(stack, tmp_path):
    user = new_user(stack, tmp_path, "lou")
    for number in range(10):
        assert ok(user.http("infer", f"Call {number}.", "--max-tokens", "2")) == "The quick \n"
    running = [user.popen("infer", f"Together {number}.", "--max-tokens", "3") for number in range(4)]
    for proc in running:
        out, err = proc.communicate(timeout=90)
        assert (proc.returncode, out, err) == (0, "The quick brown \n", "")
    quota = json.loads(ok(user.http("quota", "--json")))
    assert quota["rate_limit"]["requests_per_hour"]["used"] >= 14


def test_errors_are_the_mesh_path_lines_and_exit_codes(stack, tmp_path):
    user = new_user(stack, tmp_path, "max")
    cases = [  # (arguments, extra environment, exit code, a fragment of the line)
        (["infer", "Hi.", "--max-tokens", "2"], {"INFERSWARM_API_KEY": BAD_KEY}, 3, "unauthenticated"),
        (["quota"], {"INFERSWARM_API_KEY": BAD_KEY}, 3, "unauthenticated"),
        (["infer", "Hi.", "--model", "no-such-model"], {}, 5, f"available: {MODEL}"),
        (["infer", "Hi.", "--max-tokens", str(TOKEN_BUDGET + 1)], {}, 4, "tokens left this month, resets in"),
        (["keys", "revoke", "999999"], {}, 5, "not found"),
    ]
    for args, env, code, fragment in cases:
        over_http = one_line(user.http(*args, **env), code)
        assert over_http == one_line(user.mesh(*args, **env), code), args
        assert fragment in over_http, (args, over_http)
    # The web service checks sampling parameters itself, in its own words; the code is the same.
    assert "top_p" in one_line(user.http("infer", "Hi.", "--top-p", "7"), 9)
    assert "top_p" in one_line(user.mesh("infer", "Hi.", "--top-p", "7"), 9)

    # Only the HTTP path has these: models needs an API key there, and the server may be away.
    bare = User(stack.base_url, stack.bootstrap, stack.data_dir, tmp_path / "bare")
    assert "no API key" in one_line(bare.http("models"), 3)
    away = f"http://127.0.0.1:{free_tcp_port()}"
    line = one_line(_run(["models", "--base-url", away], user.env, None), 6)
    assert line == f"inferswarm: unavailable: cannot reach {away}: connection refused"
    assert "must be http" in one_line(_run(["quota", "--base-url", "ftp://example.com"], user.env, None), 9)
    # The mesh-only commands do not take --base-url at all (a usage error).
    assert _run(["status", "--base-url", stack.base_url], user.env, None).returncode == 2


def test_an_error_after_the_answer_began_ends_it_as_over_the_mesh(stack, tmp_path):
    user = new_user(stack, tmp_path, "oli")
    stack.model.error_after = 3  # the model server fails after three words
    try:
        over_http, over_mesh = user.http("infer", "Hi."), user.mesh("infer", "Hi.")
    finally:
        stack.model.heal()
    assert over_http.stdout == over_mesh.stdout
    assert over_http.stdout.startswith("The quick brown ")
    assert one_line(over_http, over_mesh.returncode) == one_line(over_mesh, over_mesh.returncode)


def test_a_bad_json_schema_file_stops_before_anything_is_sent(stack, tmp_path):
    user = new_user(stack, tmp_path, "ned")
    (tmp_path / "broken.json").write_text('{"type": "object",')
    (tmp_path / "list.json").write_text('["not", "a", "schema"]')
    away = f"http://127.0.0.1:{free_tcp_port()}"  # nothing listens: a call would be UNAVAILABLE
    for name, fragment in (("missing.json", "no such file"), ("broken.json", "not JSON"),
                           ("list.json", "is an object, not list")):
        schema = str(tmp_path / name)
        for result in (_run(["infer", "Hi.", "--json-schema", schema, "--base-url", away], user.env, None),
                       user.mesh("infer", "Hi.", "--json-schema", schema, INFERSWARM_BOOTSTRAP="127.0.0.1:1"),
                       user.http("chat", "--json-schema", schema, stdin="Hello!\n")):
            line = one_line(result, 9)
            assert line.startswith(f"inferswarm: invalid params: --json-schema {schema}: ") and fragment in line
            assert result.stdout == ""  # chat stopped before its first prompt


def certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own authority), and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inferswarm test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_with_the_servers_certificate_authority(tmp_path_factory, tmp_path):
    cert, key = certificate(tmp_path)
    with web_stack(tmp_path_factory.mktemp("cli-https"), INFERSWARM_WEB_TLS_CERT=str(cert),
                   INFERSWARM_WEB_TLS_KEY=str(key)) as running:
        running.base_url = running.base_url.replace("http://", "https://")
        user = new_user(running, tmp_path, "ora", INFERSWARM_CA_FILE=str(cert))
        assert ok(user.http("infer", "Hi.", "--max-tokens", "2")) == "The quick \n"
        without = {k: v for k, v in user.env.items() if k != "INFERSWARM_CA_FILE"}
        line = one_line(_run(["models", "--base-url", running.base_url], without, None), 6)
        assert line.startswith(f"inferswarm: unavailable: cannot reach {running.base_url}: TLS certificate not "
                               f"trusted"), line
        given = _run(["models", "--base-url", running.base_url, "--ca-file", str(cert)], without, None)
        assert MODEL in ok(given)


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}


def test_json_schema_answers_are_valid_json(tmp_path_factory, tmp_path):
    """Needs `response_format` in gateway.infer, the workers and the web's /v1 (issue 17)."""
    data_dir = tmp_path_factory.mktemp("smollm2") / "data"
    proc = start_up(data_dir, free_udp_port(), "--workers", "1")
    try:
        ready = read_ready(proc)
        running = WebStack(base_url=ready["dashboard"].rstrip("/"), data_dir=data_dir, bootstrap=ready["bootstrap"],
                           model=None, ready=ready)  # type: ignore[arg-type]
        user = new_user(running, tmp_path, "ona")
        schema = tmp_path / "a person.schema.json"
        schema.write_text(json.dumps(PERSON))
        args = ["infer", "Invent a person: a name and an age.", "--model", "smollm2", "--json-schema", str(schema),
                "--temperature", "0", "--max-tokens", "60"]
        for result in (user.mesh(*args), user.http(*args)):
            answer = json.loads(ok(result))
            assert set(answer) == {"name", "age"}
            assert isinstance(answer["name"], str) and type(answer["age"]) is int
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
