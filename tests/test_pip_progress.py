"""bin/pip_progress.py, which `make install` runs `pip install -v` through:
lines as pip and scikit-build-core print them (recorded from real runs)."""

from __future__ import annotations

import importlib.util
import io
import itertools
import subprocess
import sys
from pathlib import Path
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bin" / "pip_progress.py"
spec = importlib.util.spec_from_file_location("pip_progress", SCRIPT)
pip_progress = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pip_progress)

VERBOSE_PIP = """\
Using pip 26.3 from /work/main/.venv/lib/python3.11/site-packages/pip (python 3.11)
Obtaining file:///work/main
  Installing build dependencies: started
  Collecting setuptools>=77
Collecting pyzmq<28,>=27 (from inferswarm==0.1.0)
  Using cached pyzmq-27.1.0-cp311-cp311-manylinux_2_26_x86_64.whl.metadata (6.0 kB)
Collecting llama-cpp-python==0.3.36 (from inferswarm==0.1.0)
Requirement already satisfied: msgpack<2,>=1.1 in ./.venv/lib/python3.11/site-packages (from inferswarm==0.1.0) (1.1.2)
Building wheels for collected packages: inferswarm, llama-cpp-python
  Building editable for inferswarm (pyproject.toml): started
  Building editable for inferswarm (pyproject.toml): finished with status 'done'
  Building wheel for llama-cpp-python (pyproject.toml): started
  Running command Building wheel for llama-cpp-python (pyproject.toml)
  *** Building project with Ninja...
  [1/40] /usr/bin/cc -DGGML_BUILD -O3 -c vendor/llama.cpp/ggml/src/ggml.c
  [2/40] /usr/bin/c++ -O3 -c vendor/llama.cpp/ggml/src/ggml-cpu/ops.cpp
  [3/40] /usr/bin/c++ -O3 -c vendor/llama.cpp/src/llama.cpp
  [21/40] /usr/bin/c++ -O3 -c vendor/llama.cpp/src/llama-model.cpp
  [22/40] /usr/bin/c++ -O3 -c vendor/llama.cpp/src/llama-vocab.cpp
  [39/40] /usr/bin/c++ -O3 -c vendor/llama.cpp/common/arg.cpp
  [40/40] : && /usr/bin/c++ -shared -o vendor/llama.cpp/bin/libllama.so
  *** Making wheel...
  Building wheel for llama-cpp-python (pyproject.toml): finished with status 'done'
  Created wheel for llama-cpp-python: filename=llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl size=4251112
Successfully built inferswarm llama-cpp-python
Installing collected packages: pyzmq, llama-cpp-python, inferswarm
Successfully installed inferswarm-0.1.0 llama-cpp-python-0.3.36 pyzmq-27.1.0
"""

MAKE_BUILD = """\
  Building wheel for tiny-native (pyproject.toml): started
  [ 20%] Building C object CMakeFiles/tiny.dir/a.c.o
  /usr/bin/gcc -O3 -c /tmp/pp/proj/a.c
  [ 22%] Building C object CMakeFiles/tiny.dir/b.c.o
  [ 60%] Building C object CMakeFiles/tiny.dir/c.c.o
  [100%] Linking C shared library libtiny.so
  [100%] Built target tiny
  Building wheel for tiny-broken (pyproject.toml): finished with status 'error'
  ERROR: Failed building wheel for tiny-broken
Failed to build tiny-broken
error: failed-wheel-build-for-install
"""


def summary(text: str) -> list[str]:
    out = io.StringIO()
    pip_progress.summarize(text.splitlines(keepends=True), out, clock=itertools.count(0, 10).__next__)
    return out.getvalue().splitlines()


@pytest.mark.unit
def test_pip_top_level_lines_and_the_compile_progress_are_shown_shortened():
    assert summary(VERBOSE_PIP) == [
        "Obtaining file:///work/main",
        "Collecting pyzmq<28,>=27 (from inferswarm==0.1.0)",
        "Collecting llama-cpp-python==0.3.36 (from inferswarm==0.1.0)",
        "Building wheels for collected packages: inferswarm, llama-cpp-python",
        "  Building wheel for llama-cpp-python ...",
        "  llama-cpp-python build: 2% (10s)",
        "  llama-cpp-python build: 7% (20s)",
        "  llama-cpp-python build: 52% (30s)",
        "  llama-cpp-python build: 97% (40s)",
        "  llama-cpp-python build: 100% (50s)",
        "  Building wheel for llama-cpp-python: done (1m 00s)",
        "Successfully built inferswarm llama-cpp-python",
        "Installing collected packages: pyzmq, llama-cpp-python, inferswarm",
        "Successfully installed inferswarm-0.1.0 llama-cpp-python-0.3.36 pyzmq-27.1.0",
    ]


@pytest.mark.unit
def test_make_progress_is_shown_once_per_step_and_errors_pass_through():
    assert summary(MAKE_BUILD) == [
        "  Building wheel for tiny-native ...",
        "  tiny-native build: 20% (10s)",
        "  tiny-native build: 60% (20s)",
        "  tiny-native build: 100% (30s)",
        "  Building wheel for tiny-broken: error (40s)",
        "Failed to build tiny-broken",
        "error: failed-wheel-build-for-install",
    ]


def run(tmp_path: Path, text: str, status: int) -> subprocess.CompletedProcess:
    sample = tmp_path / "pip.out"
    sample.write_text(text)
    command = [sys.executable, "-c", f"import sys; sys.stdout.write(open({str(sample)!r}).read()); sys.exit({status})"]
    return subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "install.log"), "--", *command],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.rpc
def test_a_success_keeps_the_whole_log_and_exits_zero(tmp_path):
    result = run(tmp_path, VERBOSE_PIP, 0)
    assert result.returncode == 0
    assert "llama-cpp-python build: 100%" in result.stdout
    assert "/usr/bin/c++" not in result.stdout and "last" not in result.stdout
    assert (tmp_path / "install.log").read_text() == VERBOSE_PIP


@pytest.mark.rpc
def test_a_failure_shows_the_log_tail_and_keeps_the_exit_status(tmp_path):
    result = run(tmp_path, MAKE_BUILD, 3)
    assert result.returncode == 3
    shown = result.stdout.splitlines()
    tail = shown.index(f"--- last 11 lines of {tmp_path / 'install.log'} (exit status 3) ---")
    assert shown[tail + 1:-1] == MAKE_BUILD.splitlines()
    assert shown[-1] == f"--- the whole output is in {tmp_path / 'install.log'} ---"


@pytest.mark.rpc
def test_without_a_command_it_prints_its_usage(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "log")], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr
