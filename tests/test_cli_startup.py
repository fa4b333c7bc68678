"""What a command-line call costs before it does anything: scripts call the CLI
in loops, so it imports only what a client needs (a fresh interpreter each)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.rpc

_PROBE = """
import json, sys
import inferswarm.cli
print(json.dumps(sorted(m for m in ("jwt", "cryptography", "asyncpg", "argon2", "aiohttp", "llama_cpp", "pgserver")
                        if m in sys.modules)))
"""


def test_the_cli_imports_no_server_side_library():
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == []
