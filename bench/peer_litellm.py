"""Side by side with the LiteLLM proxy (issue 21): the same fake backend, the same wrk load.

    .venv/bin/python bench/peer_litellm.py [--seconds 10] [--rounds 2] [--connections 1,16,64] [--litellm 1.106]

About 6 minutes with the defaults, plus a minute or two to install LiteLLM the first time.

One fake OpenAI backend (tests/openai_server.py, the faithful test server, in a
process of its own) answers every chat completion at once with a short fixed
answer, whole or streamed; both sides are pointed at it:

- ours: `inferswarm up` (one gateway, one worker whose `openai` backend calls
  the fake), called at its web service's `/v1/chat/completions` with a real API
  key of a user on the unlimited tier (per-key auth, request and token limits
  that do not bind, accounting on) -- set up as bench/web.py does;
- theirs: the LiteLLM proxy, `litellm --config cfg.yaml --num_workers 2`,
  installed by this script into a throwaway venv outside the repository,
  `$XDG_CACHE_HOME/inferswarm-bench/litellm-<series>` (`~/.cache/...`), kept
  and reused for the same series (`--litellm 1.106`; the latest 1.x when that
  series is not on PyPI). Its logs at WARNING, as ours.

LiteLLM's auth here is its `master_key`, not virtual keys. Virtual keys need
its database, which it drives through Prisma, and Prisma downloads its query
and schema engines from its own host at first use, which this environment
cannot reach (only PyPI, Debian's and npm's registries are). So the proxy
checks every request's key against the master key (another key is refused),
and the rate limit is the deployment's `rpm` (1,000,000: it does not bind),
enforced by its `usage-based-routing-v2` strategy, which counts every request
against the limit (with `rpm: 2` a third request in the minute waits for the
next one). A master-key check is a comparison, cheaper than a virtual key's
lookup: if anything, this favours LiteLLM.

Load: wrk (Debian's `wrk`: `apt-get install wrk`), a Lua script for the POST
body and the figures, `--timeout 30s`; a streamed reply is timed to its last
byte. For each number of connections the sides take turns, never at once (the
idle side stays up, idle): ours, theirs, ours, theirs... for `rounds` rounds of
`seconds` each, plain then streamed, after a warm-up; each side's best round
(by requests/s) is kept. Requests/s counts 2xx answers only; any other answer
or socket error is reported as failures; a run in which a side answers
nothing stops the bench, which then keeps its temporary directory (both
sides' logs) and says where. Each run also prints the CPU it saw,
in cores: each side's processes (ours with its PostgreSQL), the backend, wrk,
and "others" -- the rest of the machine, which on a shared machine is the
figures' noise. The last line is JSON with `rps_64`, `p99_ms_64`,
`peer_rps_64`, `peer_p99_ms_64`, `rps_ratio_64` (ours / theirs),
`p99_ratio_64` (ours / theirs; the issue's target: rps ratio >= 10, p99 ratio
<= 0.2), their `stream_` equivalents, the same for every other number of
connections, `cpu_ms_per_request_N` / `peer_cpu_ms_per_request_N` (each
side's own CPU time per answered request: the figure least moved by a busy
machine), `others_cores_N` / `peer_others_cores_N` (the rest of the machine
during each side's best round), and `restarts` / `peer_restarts`: processes
of `up`'s tree / of LiteLLM's replaced during the runs (uvicorn's supervisor
replaces a worker that misses its health check, as happens on a busy machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from contextlib import ExitStack
from multiprocessing.connection import Connection
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/web.py: the stack and its key

from web import BODY, COMPLETION, MODEL, ROOT, STREAMED, free_port, start_stack, unlimited_key  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "inferswarm-bench"
MASTER_KEY = "sk-bench-master-key"
RPM_LIMIT = 1_000_000
WRK_THREADS = 2


# -- the fake backend ----------------------------------------------------------------------


def serve_backend(reply_to: Connection) -> None:
    """tests/openai_server.py answering `COMPLETION` at once, until terminated; its base URL to `reply_to`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it terminates us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)  # wrk drops its connections mid-request at the end
    sys.path.insert(0, str(ROOT / "tests"))
    from openai_server import OpenAIServer

    async def serve() -> None:
        server = OpenAIServer(models=(MODEL,), reply=COMPLETION)
        server.requests = deque(maxlen=16)  # type: ignore[assignment]  # it records every request: bounded here
        async with server:
            reply_to.send(server.base_url)
            await asyncio.Event().wait()

    asyncio.run(serve())


def start_backend(cleanup: ExitStack) -> tuple[str, int]:
    """The fake backend in a process of its own (stopped by `cleanup`); its base URL and PID."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    backend = context.Process(target=serve_backend, args=(theirs,), daemon=True)
    backend.start()
    cleanup.callback(lambda: (backend.terminate(), backend.join(10)))
    if not ours.poll(30):
        raise SystemExit("the fake OpenAI backend did not start")
    return ours.recv(), backend.pid  # type: ignore[return-value]


# -- LiteLLM: its venv, its config, its process ----------------------------------------------


def litellm_venv(series: str) -> tuple[Path, str]:
    """The venv with LiteLLM `series`.* (installed the first time) and the version in it."""
    venv = CACHE / f"litellm-{series}"
    version = installed_version(venv)
    if version is not None:
        print(f"LiteLLM {version} from {venv}", flush=True)
        return venv, version
    print(f"creating a throwaway venv for LiteLLM {series}.*: {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    log = CACHE / f"litellm-{series}.install.log"
    for spec in (f"litellm[proxy]=={series}.*", "litellm[proxy]>=1,<2"):
        print(f"pip install '{spec}' (a few minutes the first time; log: {log})", flush=True)
        done = subprocess.run([sys.executable, str(ROOT / "bin" / "pip_progress.py"), str(log), "--",
                               str(venv / "bin" / "pip"), "install", "-v", spec])
        if done.returncode == 0:
            break
        if spec.startswith(f"litellm[proxy]=={series}"):
            print(f"LiteLLM {series}.* could not be installed; trying the latest 1.x", flush=True)
    version = installed_version(venv)
    if version is None:
        raise SystemExit(f"LiteLLM could not be installed into {venv}: see {log}")
    print(f"LiteLLM {version} installed", flush=True)
    return venv, version


def installed_version(venv: Path) -> str | None:
    if not (venv / "bin" / "litellm").exists():
        return None
    found = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import importlib.metadata as m; print(m.version('litellm'))"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        return None
    return found.stdout.strip() or None


def litellm_config(backend_url: str) -> str:
    """The proxy's config (YAML is a superset of JSON): the fake as its one model, master-key
    auth, a deployment rpm limit enforced per request."""
    return json.dumps({
        "model_list": [{"model_name": MODEL, "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": backend_url, "api_key": "sk-upstream", "rpm": RPM_LIMIT}}],
        "router_settings": {"routing_strategy": "usage-based-routing-v2"},
        "general_settings": {"master_key": MASTER_KEY},
        "litellm_settings": {"telemetry": False},
    }, indent=2)


def start_litellm(venv: Path, workdir: Path, backend_url: str, port: int) -> subprocess.Popen:
    """The proxy with 2 workers, in a session of its own (its workers go with it): see `stop_group`."""
    config = workdir / "litellm.yaml"
    config.write_text(litellm_config(backend_url))
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(LITELLM_LOG="WARNING", LITELLM_LOCAL_MODEL_COST_MAP="True", PATH=f"{venv / 'bin'}:{env['PATH']}")
    log = workdir / "litellm.log"
    return subprocess.Popen([str(venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
                             "--port", str(port), "--num_workers", "2"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=workdir,
                            start_new_session=True)


async def until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    """Wait for `url` to answer 200 (LiteLLM takes 15-30 s to start); fail if `proc` exits first."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{url} exited ({proc.returncode}): see {log}")
            try:
                async with http.get(url) as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit(f"{url} did not answer in {timeout:.0f} s: see {log}")


def stop_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM to the process group `proc` leads (it was started in a session of its own), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


# -- checks and load -------------------------------------------------------------------------


async def check_answers(url: str, key: str) -> None:
    """One plain and one streamed request: the fake's answer comes back whole through `url`."""
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(url, json=BODY) as reply:
            body = await reply.json()
            if reply.status != 200 or body["choices"][0]["message"]["content"] != COMPLETION:
                raise SystemExit(f"{url}: unexpected answer {reply.status} {body}")
        async with http.post(url, json=STREAMED) as reply:
            text = await reply.text()
            pieces = [json.loads(line[6:]) for line in text.splitlines()
                      if line.startswith("data: {")]
            said = "".join((p["choices"][0]["delta"].get("content") or "") for p in pieces if p.get("choices"))
            if reply.status != 200 or said != COMPLETION or "data: [DONE]" not in text:
                raise SystemExit(f"{url}: unexpected stream {reply.status} {text[:500]}")


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('\\nRESULT {"requests": %%d, "duration_us": %%d, "status": %%d, "connect": %%d, '
    .. '"read": %%d, "write": %%d, "timeout": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def wrk(url: str, script: Path, connections: int, seconds: float) -> dict:
    """One wrk run: 2xx requests/s, p50 and p99 in ms (wrk's own histogram), failures."""
    threads = min(WRK_THREADS, connections)
    done = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s",
                           "--timeout", "30s", "-s", str(script), url], capture_output=True, text=True)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    raw = json.loads(line[len("RESULT "):])
    failures = raw["status"] + raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    answered = raw["requests"] - raw["status"]  # wrk counts non-2xx answers among its requests
    return {"rps": round(answered / (raw["duration_us"] / 1e6), 1), "p50_ms": raw["p50_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000, "requests": answered, "failures": failures}


class CpuMeter:
    """CPU time over one run, in cores: each side's process tree, the backend, wrk, and the rest of
    the machine (other work on a shared machine: the figures' noise). A process that exits during
    the run (a LiteLLM worker restarted by its supervisor) takes its time with it: undercounted."""

    def __init__(self, trees: dict[str, list[int]]) -> None:
        self.trees = trees  # name -> root PIDs

    def __enter__(self) -> CpuMeter:
        self.started = time.monotonic()
        self.before = self._sample()
        return self

    def __exit__(self, *exc_info: object) -> None:
        after, elapsed = self._sample(), time.monotonic() - self.started
        self.cores = {}
        for name, now in after.items():
            used = sum(seconds - self.before[name].get(pid, 0.0) for pid, seconds in now.items())
            self.cores[name] = round(used / elapsed, 2)
        self.cores["others"] = round(max(0.0, self.cores.pop("machine") - sum(self.cores.values())), 2)

    def _sample(self) -> dict[str, dict[int, float]]:
        """CPU seconds so far by PID, per name (pseudo-PID 0 for the machine and for wrk)."""
        busy = psutil.cpu_times()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the wrk runs, once reaped
        sample = {"machine": {0: sum(busy) - busy.idle - busy.iowait},
                  "wrk": {0: children.ru_utime + children.ru_stime}}
        for name, pids in self.trees.items():
            sample[name] = {pid: seconds for root in pids for pid, seconds in tree_cpu(root).items()}
        return sample


def tree_cpu(pid: int) -> dict[int, float]:
    """User + system seconds of `pid` and of each of its descendants alive now."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    used = {}
    for process in family:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        used[process.pid] = times.user + times.system
    return used


def wrk_script(directory: Path, name: str, body: dict, key: str) -> Path:
    path = directory / f"{name}.lua"
    path.write_text(WRK_SCRIPT % {"body": json.dumps(body), "key": key})
    return path


# -- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    """Set up both sides, measure, report; every process started here is stopped on the way out.

    Synchronous on purpose (asyncio only for the few HTTP set-up calls): Ctrl-C then interrupts
    a wrk run at once and unwinds through `measure_sides`' cleanup."""
    venv, version = litellm_venv(args.litellm)
    root = Path(tempfile.mkdtemp(prefix="bench-peer-litellm-"))  # removed unless something failed: its logs
    try:
        best, restarts = measure_sides(args, venv, version, root)
    except KeyboardInterrupt:
        shutil.rmtree(root, ignore_errors=True)
        raise
    except BaseException:
        print(f"logs kept in {root} (ours: data/logs/ and up.stderr; LiteLLM: litellm.log)", file=sys.stderr)
        raise
    shutil.rmtree(root, ignore_errors=True)
    report(best, restarts, args, version)


def measure_sides(args: argparse.Namespace, venv: Path, version: str, root: Path) -> tuple[dict, dict[str, int]]:
    """Both sides started, checked, warmed up and measured; every process started here stopped on return."""
    web_port, peer_port = free_port(), free_port()
    with ExitStack() as cleanup:
        backend_url, backend_pid = start_backend(cleanup)
        print(f"fake OpenAI backend at {backend_url}; starting our stack (inferswarm up: one gateway, one worker)",
              flush=True)
        data_dir = root / "data"
        stack = start_stack(data_dir, backend_url, web_port)
        cleanup.callback(lambda: (stack.send_signal(signal.SIGTERM), stack.wait(timeout=60)))
        print(f"starting the LiteLLM {version} proxy (2 workers)", flush=True)
        peer = start_litellm(venv, root, backend_url, peer_port)
        cleanup.callback(lambda: stop_group(peer))
        ours = f"http://127.0.0.1:{web_port}/v1/chat/completions"
        theirs = f"http://127.0.0.1:{peer_port}/v1/chat/completions"
        key = asyncio.run(unlimited_key(f"http://127.0.0.1:{web_port}", data_dir,
                                        stack.ready["bootstrap"]))  # type: ignore[attr-defined]
        asyncio.run(until_up(f"http://127.0.0.1:{peer_port}/health/liveliness", peer, root / "litellm.log"))
        asyncio.run(check_answers(ours, key))
        asyncio.run(check_answers(theirs, MASTER_KEY))
        targets = {"ours": (ours, key), "theirs": (theirs, MASTER_KEY)}
        scripts = {(side, kind): wrk_script(root, f"{side}-{kind}", body, targets[side][1])
                   for side in targets for kind, body in (("plain", BODY), ("stream", STREAMED))}
        print(f"warm-up, then wrk for {args.seconds:g} s a run, {args.rounds} rounds, the sides taking turns",
              flush=True)
        for (side, _), script in scripts.items():  # connections, caches, lazy imports
            wrk(targets[side][0], script, 16, 2)
        postmaster = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])  # not up's child
        meter = {"ours": [stack.pid, postmaster], "theirs": [peer.pid], "backend": [backend_pid]}
        return measure_all(targets, scripts, args, meter)


def measure_all(targets: dict, scripts: dict, args: argparse.Namespace,
                trees: dict[str, list[int]]) -> tuple[dict, dict[str, int]]:
    """{(side, kind, connections): best round}, the sides taking turns; and how many processes of
    each side were replaced meanwhile (`up` and the LiteLLM supervisor restart what dies or hangs)."""
    best: dict[tuple[str, str, int], dict] = {}
    roots = {"ours": trees["ours"][0], "theirs": trees["theirs"][0]}
    alive = {name: len(tree_cpu(pid)) for name, pid in roots.items()}
    seen = {name: set(tree_cpu(pid)) for name, pid in roots.items()}  # a process replaced is a new PID
    for connections in args.connections:
        for kind in ("plain", "stream"):
            for round_ in range(args.rounds):
                for side in targets:
                    got = one_run(side, kind, targets[side][0], scripts[side, kind], connections, args.seconds,
                                  trees)
                    print(f"{connections:>3} conns {kind:<6} round {round_ + 1} {side:<6}: {described(got)}",
                          flush=True)
                    for name, pid in roots.items():
                        seen[name] |= set(tree_cpu(pid))
                    if (side, kind, connections) not in best or got["rps"] > best[side, kind, connections]["rps"]:
                        best[side, kind, connections] = got
    return best, {name: len(seen[name]) - alive[name] for name in seen}


def one_run(side: str, kind: str, url: str, script: Path, connections: int, seconds: float,
            trees: dict[str, list[int]]) -> dict:
    """One wrk run with its CPU use: the side's own per answered request, and everyone's in cores."""
    with CpuMeter(trees) as cpu:
        got = wrk(url, script, connections, seconds)
    if got["requests"] == 0:  # wrk counts no error for a request still unanswered at the end
        raise SystemExit(f"{side} answered no request in {seconds:g} s ({kind}, {connections} connections)")
    got["cpu_cores"] = cpu.cores
    got["cpu_ms_per_request"] = round(cpu.cores[side] * seconds * 1000 / got["requests"], 2)
    return got


def described(got: dict) -> str:
    failures = f"  failures {got['failures']}" if got["failures"] else ""
    cores = " ".join(f"{name} {used:.2f}" for name, used in got["cpu_cores"].items())
    return (f"{got['rps']:>7.1f} req/s  p50 {got['p50_ms']:>7.1f} ms  p99 {got['p99_ms']:>7.1f} ms{failures}  | "
            f"{got['cpu_ms_per_request']:.1f} CPU ms/request | cores: {cores}")


def report(best: dict, restarts: dict[str, int], args: argparse.Namespace, version: str) -> None:
    print(f"\nbest rounds (LiteLLM {version}, 2 workers, master-key auth, deployment rpm limit); others' "
          "cores: what the rest of the machine used during our / their best round")
    print(f"{'conns':>5} {'kind':<6} | {'ours req/s':>10} {'p50 ms':>8} {'p99 ms':>8} | "
          f"{'LiteLLM req/s':>13} {'p50 ms':>8} {'p99 ms':>8} | {'rps x':>6} {'p99 x':>6} | others' cores")
    summary: dict = {"bench": "peer_litellm", "peer": f"litellm {version}", "peer_workers": 2,
                     "peer_auth": "master_key", "seconds": args.seconds, "rounds": args.rounds}
    for connections in args.connections:
        for kind, prefix in (("plain", ""), ("stream", "stream_")):
            ours, theirs = best["ours", kind, connections], best["theirs", kind, connections]
            rps_ratio = round(ours["rps"] / theirs["rps"], 2) if theirs["rps"] else None
            p99_ratio = round(ours["p99_ms"] / theirs["p99_ms"], 3) if theirs["p99_ms"] else None
            print(f"{connections:>5} {kind:<6} | {ours['rps']:>10.1f} {ours['p50_ms']:>8.2f} {ours['p99_ms']:>8.2f} | "
                  f"{theirs['rps']:>13.1f} {theirs['p50_ms']:>8.2f} {theirs['p99_ms']:>8.2f} | "
                  f"{rps_ratio or 0:>6.2f} {p99_ratio or 0:>6.3f} | "
                  f"{ours['cpu_cores']['others']:.2f} / {theirs['cpu_cores']['others']:.2f}")
            n = connections
            summary.update({f"{prefix}rps_{n}": ours["rps"], f"{prefix}p50_ms_{n}": ours["p50_ms"],
                            f"{prefix}p99_ms_{n}": ours["p99_ms"], f"{prefix}peer_rps_{n}": theirs["rps"],
                            f"{prefix}peer_p50_ms_{n}": theirs["p50_ms"], f"{prefix}peer_p99_ms_{n}": theirs["p99_ms"],
                            f"{prefix}rps_ratio_{n}": rps_ratio, f"{prefix}p99_ratio_{n}": p99_ratio,
                            f"{prefix}failures_{n}": ours["failures"] + theirs["failures"],
                            f"{prefix}cpu_ms_per_request_{n}": ours["cpu_ms_per_request"],
                            f"{prefix}peer_cpu_ms_per_request_{n}": theirs["cpu_ms_per_request"],
                            f"{prefix}others_cores_{n}": ours["cpu_cores"]["others"],
                            f"{prefix}peer_others_cores_{n}": theirs["cpu_cores"]["others"]})
    summary.update(restarts=restarts["ours"], peer_restarts=restarts["theirs"])
    print(f"processes replaced during the runs (new PIDs, looked for after every run): ours {restarts['ours']}, "
          f"LiteLLM {restarts['theirs']}")
    if 64 in args.connections:
        print(f"target (issue 21): rps_ratio_64 >= 10 (got {summary['rps_ratio_64']}), "
              f"p99_ratio_64 <= 0.2 (got {summary['p99_ratio_64']})")
    print(json.dumps(summary))


def interrupted(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", default="1,16,64", type=lambda s: [int(n) for n in s.split(",")])
    parser.add_argument("--litellm", default="1.106", help="the LiteLLM series to install (MAJOR.MINOR)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("this bench needs wrk: apt-get install wrk (Debian/Ubuntu)")
    signal.signal(signal.SIGTERM, interrupted)  # as Ctrl-C: unwinds through run()'s cleanup
    from shared.logging import configure_logging

    configure_logging("warning", "console", service="bench")
    try:
        run(args)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: stopped what it had started")


if __name__ == "__main__":
    main()
