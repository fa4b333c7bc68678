"""The ceiling of continuous batching on this CPU: llama.cpp alone, no inferswarm code.

    .venv/bin/python bench/batch_ceiling.py [--rounds 5] [--steps 64] [--threads 1,2] [--settings base,flash]

Loads the SmolLM2 GGUF the local backend serves with llama-cpp-python's
low-level API (`llama_model_load_from_file`, `llama_init_from_model`,
`llama_batch`, `llama_decode`), prefills one short prompt per sequence, then
times `--steps` decode steps of 1 sequence (a batch of 1 token) against as
many of `--seqs` sequences (a batch of 4 tokens, one per sequence), greedy
sampling as cheaply as it gets (one argmax over the logits rows with numpy).
Rounds alternate 1 and 4, each round starting again from the prompts (their KV
cells past the prompt removed), after one warm-up round; best and median of
the rounds are reported. `ratio` is 4-sequence tokens/s over 1-sequence
tokens/s: if a decode of 4 tokens costs about 4x one, batching cannot give 2x.
The rows go in increasing, consecutive sequence ids: with a KV stream per
sequence llama.cpp evaluates any other order in one graph per run of them
(4 in decreasing order: ~40 ms a step against ~25 here).

Settings (each at every thread count), context as backends/batched.py makes it
unless said: `base` (n_ctx 2048 per sequence, `n_seq_max` 4, `kv_unified` off,
n_batch = n_ubatch = 512, flash attention off, K/V f16); `single` (the
1-sequence figure on a context of its own, as the unbatched backend has it:
n_ctx 2048, `n_seq_max` 1 -- its 4-sequence figure is not run);
`flash` (flash attention on); `unified` (`kv_unified` on); `ubatch8`
(n_batch = n_ubatch = 8); `ctx512` (n_ctx 512 per sequence); `kvq8`
(K/V cache q8_0, flash attention on). The last line is JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llama_cpp  # noqa: E402
import llama_cpp._logger  # noqa: E402,F401 - installs the log callback that set_verbose quiets

from services.inference.backends.local import default_gguf  # noqa: E402 - only to find the file

llama_cpp._logger.set_verbose(False)

PROMPTS = ["Write a long story about a lighthouse keeper.", "Tell me about the sea and its whales.",
           "Explain how a sailing boat moves against the wind.", "Describe a fisherman's day at dawn."]
N_CTX = 2048
SETTINGS: dict[str, dict[str, Any]] = {
    "base": {},
    "single": {"n_seq_max": 1},
    "flash": {"flash_attn_type": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED},
    "unified": {"kv_unified": True},
    "ubatch8": {"n_batch": 8, "n_ubatch": 8},
    "ctx512": {"n_ctx_seq": 512},
    "kvq8": {"flash_attn_type": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
             "type_k": llama_cpp.GGML_TYPE_Q8_0, "type_v": llama_cpp.GGML_TYPE_Q8_0},
}


class Bench:
    """One context of `seqs` sequences, each holding its prompt."""

    def __init__(self, model: ctypes.c_void_p, seqs: int, threads: int, setting: dict[str, Any]) -> None:
        setting = dict(setting)
        self.seqs = setting.pop("n_seq_max", seqs)
        n_ctx_seq = setting.pop("n_ctx_seq", N_CTX)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = n_ctx_seq * self.seqs, self.seqs, False
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # Llama(flash_attn=False)
        for key, value in setting.items():
            setattr(params, key, value)
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError(f"llama_init_from_model failed for {setting}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.batch = llama_cpp.llama_batch_init(max(64, self.seqs), 0, 1)
        self.prompt_len, self.first = [], []
        for seq in range(self.seqs):
            tokens = tokenize(vocab, PROMPTS[seq % len(PROMPTS)])
            for start in range(0, len(tokens), params.n_batch):  # in chunks of n_batch
                chunk = tokens[start:start + params.n_batch]
                self.fill([(t, start + i, seq, start + i == len(tokens) - 1) for i, t in enumerate(chunk)])
                self.decode()
            self.prompt_len.append(len(tokens))
            self.first.append(int(np.argmax(self.logits(1)[0])))

    def fill(self, rows: list[tuple[int, int, int, bool]]) -> None:
        batch = self.batch
        batch.n_tokens = len(rows)
        for i, (token, pos, seq, logits) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq

    def decode(self) -> None:
        code = llama_cpp.llama_decode(self.ctx, self.batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def logits(self, rows: int) -> np.ndarray:
        """The last decode's logits, one row per output token (a view, no copy)."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(rows, self.n_vocab))

    def run(self, n: int, steps: int) -> tuple[float, float, float]:
        """`steps` greedy decode steps of sequences 0..n-1: seconds in all, in `llama_decode`, and
        of this process's CPU (all its threads: the figure other load on the machine moves least)."""
        for seq in range(n):
            llama_cpp.llama_memory_seq_rm(self.memory, seq, self.prompt_len[seq], -1)
        last, pos = list(self.first[:n]), list(self.prompt_len[:n])
        in_decode = 0.0
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.fill([(last[s], pos[s], s, True) for s in range(n)])
            t = time.perf_counter()
            self.decode()
            in_decode += time.perf_counter() - t
            last = self.logits(n).argmax(axis=1).tolist()
            pos = [p + 1 for p in pos]
        return time.perf_counter() - started, in_decode, time.process_time() - cpu

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


def tokenize(vocab: ctypes.c_void_p, text: str) -> list[int]:
    raw = text.encode()
    out = (llama_cpp.llama_token * (len(raw) + 8))()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), out, len(out), True, True)
    return list(out[:n])


def measure(model: ctypes.c_void_p, name: str, threads: int, seqs: int, steps: int, rounds: int) -> dict[str, Any]:
    bench = Bench(model, seqs, threads, SETTINGS[name])
    try:
        sizes = [1] if bench.seqs == 1 else [1, bench.seqs]
        for n in sizes:  # warm-up
            bench.run(n, steps)
        times: dict[int, list[tuple[float, float, float]]] = {n: [] for n in sizes}
        for _ in range(rounds):
            for n in sizes:
                times[n].append(bench.run(n, steps))
    finally:
        bench.close()
    result: dict[str, Any] = {"setting": name, "threads": threads}
    for n in sizes:
        rates = [n * steps / total for total, _, _ in times[n]]
        result[f"tps{n}"] = round(max(rates), 1)
        result[f"tps{n}_median"] = round(statistics.median(rates), 1)
        result[f"tps{n}_min"] = round(min(rates), 1)
        result[f"step{n}_ms"] = round(min(total for total, _, _ in times[n]) / steps * 1000, 2)
        result[f"decode{n}_ms"] = round(min(d for _, d, _ in times[n]) / steps * 1000, 2)
        result[f"cpu{n}_ms"] = round(min(c for _, _, c in times[n]) / steps * 1000, 2)
    if len(sizes) == 2:
        n = sizes[1]
        result["ratio"] = round(result[f"tps{n}"] / result["tps1"], 3)
        result["ratio_median"] = round(result[f"tps{n}_median"] / result["tps1_median"], 3)
        # per round, 1 and 4 measured back to back: the spread of the ratio
        pairs = [(n * steps / t4) / (steps / t1) for (t1, _, _), (t4, _, _) in zip(times[1], times[n])]
        result["ratio_rounds"] = [round(r, 2) for r in pairs]
        # tokens per CPU second, 4 over 1: what batching saves in work, whatever else runs
        result["cpu_ratio"] = round(n * result["cpu1_ms"] / result[f"cpu{n}_ms"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--seqs", type=int, default=4)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--settings", default="base,single,flash,unified,ubatch8,ctx512,kvq8")
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    llama_cpp.llama_backend_init()
    path = args.model or default_gguf()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise SystemExit(f"cannot load {path}")
    results = []
    print(f"{path.name}, {args.seqs} sequences, {args.steps} steps, {args.rounds} rounds (best / median)")
    print(f"{'setting':>8} {'thr':>3} | {'tok/s 1':>13} {'step ms':>7} | {'tok/s 4':>13} {'step ms':>7} | "
          f"{'ratio':>5} {'median':>6} | {'cpu ms 1':>8} {'cpu ms 4':>8} {'cpu ratio':>9} | per round")
    try:
        for name in args.settings.split(","):
            for threads in (int(t) for t in args.threads.split(",")):
                r = measure(model, name, threads, args.seqs, args.steps, args.rounds)
                results.append(r)
                n = args.seqs
                four = (f"{r[f'tps{n}']:>6.1f} {r[f'tps{n}_median']:>6.1f} {r[f'step{n}_ms']:>7.2f}"
                        if f"tps{n}" in r else f"{'-':>13} {'-':>7}")
                ratio = (f"{r['ratio']:>5.2f} {r['ratio_median']:>6.2f} | {r['cpu1_ms']:>8.2f} "
                         f"{r[f'cpu{n}_ms']:>8.2f} {r['cpu_ratio']:>9.2f} | {r['ratio_rounds']}"
                         if "ratio" in r else f"{'-':>5} {'-':>6} | {r['cpu1_ms']:>8.2f} {'-':>8} {'-':>9} |")
                print(f"{name:>8} {threads:>3} | {r['tps1']:>6.1f} {r['tps1_median']:>6.1f} {r['step1_ms']:>7.2f} | "
                      f"{four} | {ratio}", flush=True)
    finally:
        llama_cpp.llama_model_free(model)
    print(json.dumps({"model": path.name, "seqs": args.seqs, "steps": args.steps, "rounds": args.rounds,
                      "results": results}))


if __name__ == "__main__":
    main()
