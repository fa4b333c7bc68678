"""Run `pip install -v ...`, show only its progress, keep the whole log.

    python bin/pip_progress.py LOG -- pip install -v ...

`make install` runs pip through this so the first install (llama-cpp-python
compiles for minutes) is not silent, yet not thousands of compiler lines:

- pip's own top-level lines pass through (Collecting, Building wheels,
  Successfully installed, errors);
- a wheel build is announced when it starts and when it ends, with its time;
- the compile's progress lines (`[ 42%] Building ...` from make, `[57/120] ...`
  from ninja) become `  llama-cpp-python build: 45% (1m 50s)`, one per 5 %.

Every line goes to LOG. If the command fails, the last lines of LOG are
printed to diagnose it. The exit status is the command's.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import deque
from typing import Callable, Iterable, TextIO

#: pip's top-level lines worth showing (pip indents everything else under -v).
TOP_LEVEL = ("Collecting ", "Obtaining ", "Building wheels for ", "Successfully built",
             "Installing collected packages", "Successfully installed", "Failed to build", "ERROR", "error")
WHEEL_BUILD = re.compile(r"^\s*Building wheel for (\S+) \(.*\): (started|finished with status '(\w+)')")
MAKE_PROGRESS = re.compile(r"^\s*\[\s*(\d+)%\]")
NINJA_PROGRESS = re.compile(r"^\s*\[(\d+)/(\d+)\]")
#: Progress is shown each time it advances by this many percent.
STEP = 5
TAIL = 60


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def percent(line: str) -> int | None:
    """The build progress a make or ninja status line reports, if it is one."""
    if match := MAKE_PROGRESS.match(line):
        return int(match[1])
    if match := NINJA_PROGRESS.match(line):
        return int(match[1]) * 100 // max(int(match[2]), 1)
    return None


def summarize(lines: Iterable[str], out: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
    """Write the lines of a verbose pip run worth showing to `out`."""
    package, started, shown = "build", clock(), -STEP
    for line in lines:
        line = line.rstrip("\n")
        if match := WHEEL_BUILD.match(line):
            package = match[1]
            if match[2] == "started":
                started, shown = clock(), -STEP
                print(f"  Building wheel for {package} ...", file=out, flush=True)
            else:
                print(f"  Building wheel for {package}: {match[3]} ({duration(clock() - started)})",
                      file=out, flush=True)
        elif (value := percent(line)) is not None:
            if value >= shown + STEP or (value == 100 and shown < 100):
                shown = value
                print(f"  {package} build: {value}% ({duration(clock() - started)})", file=out, flush=True)
        elif line.startswith(TOP_LEVEL):
            print(line, file=out, flush=True)


def run(log_path: str, command: list[str]) -> int:
    """Run `command`, its output to `log_path` and, summarized, to stdout."""
    tail: deque[str] = deque(maxlen=TAIL)
    with open(log_path, "w") as log, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        assert proc.stdout is not None

        def lines() -> Iterable[str]:
            for line in proc.stdout:
                log.write(line)
                tail.append(line)
                yield line

        summarize(lines(), sys.stdout)
    if proc.returncode != 0:
        print(f"--- last {len(tail)} lines of {log_path} (exit status {proc.returncode}) ---")
        print("".join(tail), end="")
        print(f"--- the whole output is in {log_path} ---", flush=True)
    return proc.returncode


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python bin/pip_progress.py LOG -- COMMAND...", file=sys.stderr)
        return 2
    return run(argv[0], argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
