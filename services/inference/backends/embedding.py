"""What every embedding backend provides, and the value that crosses that boundary.

An embedder serves one configured embedding model: MiniLM run in this
process with onnxruntime (`minilm.py`), or a model on an Ollama or
OpenAI-compatible server (`embedding_http.py`). The service sees only this
interface, the twin of `base.Backend` for generation:

    await embedder.start()                          # load / first probe; may raise
    embedded = await embedder.embed(texts, dims)    # one vector per text, in order
    await embedder.probe()                          # cheap health check; raises when down
    await embedder.close()

A vector is carried as little-endian float32 bytes: exactly what OpenAI's
`encoding_format: "base64"` base64-encodes, 4 bytes a dimension, a quarter
of the size of a list of msgpack floats and readable with
`numpy.frombuffer(v, "<f4")` or `array("f")` on any little-endian host.

`embed` raises the typed errors of `base.py` (`Unavailable`, `NotFound`,
`InvalidParams`); a server's vector that is not a list of finite numbers, or
a batch whose vectors differ in length, is `Unavailable` (malformed data).
"""

from __future__ import annotations

import math
import struct
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.errors import Unavailable
from services.inference.backends.base import Engine

__all__ = ["Embedded", "Embedder", "pack_vector", "unpack_vector", "check_batch"]


@dataclass(frozen=True, slots=True)
class Embedded:
    """The vectors of one call, in the order of its texts, and what they cost."""

    #: One little-endian float32 vector per text (`pack_vector`).
    vectors: list[bytes]
    #: The tokens the model read (the server's count for the HTTP backends).
    prompt_tokens: int

    @property
    def dimensions(self) -> int:
        return len(self.vectors[0]) // 4 if self.vectors else 0


def pack_vector(values: Sequence[float]) -> bytes:
    """`values` as little-endian float32 bytes."""
    return struct.pack(f"<{len(values)}f", *values)


def unpack_vector(vector: bytes) -> tuple[float, ...]:
    """The floats of a packed vector (tests and callers without numpy)."""
    return struct.unpack(f"<{len(vector) // 4}f", vector)


def check_batch(vectors: list[Any], count: int, where: str) -> list[bytes]:
    """A server's vectors (lists of numbers) packed, or `Unavailable` when they
    are not `count` vectors of finite numbers, all of one length."""
    if len(vectors) != count:
        raise Unavailable(f"{where} sent malformed data: {len(vectors)} vectors for {count} inputs",
                          {"retry_safe": False})
    packed = []
    for index, vector in enumerate(vectors):
        if (not isinstance(vector, list) or not vector
                or not all(type(x) in (int, float) and math.isfinite(x) for x in vector)):
            raise Unavailable(f"{where} sent malformed data: vector {index} is not a list of numbers",
                              {"retry_safe": False})
        packed.append(pack_vector(vector))
    if len({len(v) for v in packed}) > 1:
        raise Unavailable(f"{where} sent malformed data: vectors of different lengths", {"retry_safe": False})
    return packed


class Embedder(Engine):
    """One embedding model behind one engine or server."""

    capabilities: tuple[str, ...] = ("embeddings",)

    @abstractmethod
    async def embed(self, texts: list[str], dimensions: int | None) -> Embedded:
        """One vector per text, in order; `dimensions` asks for shorter vectors
        where the model supports it (`InvalidParams` naming it where not)."""

    def check_dimensions(self, dimensions: int | None) -> None:
        """Refuse (`InvalidParams` naming `dimensions`) a length the model
        cannot make, before the request waits for a slot. The default lets
        the server decide."""
