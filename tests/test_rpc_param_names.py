"""Parameter names that are not strings (msgpack maps may carry bin keys)."""

from __future__ import annotations

import pytest

from shared.errors import InvalidParams
from shared.rpc import Dispatcher, method

pytestmark = pytest.mark.unit


class Open:
    name = "open"

    @method
    async def anything(self, **rest) -> int:
        return len(rest)

    @method
    async def fixed(self, a: int = 0) -> int:
        return a


@pytest.mark.parametrize("name", ["open.anything", "open.fixed"])
def test_bin_parameter_names_are_invalid_params(name):
    handler = Dispatcher(Open()).get(name)
    with pytest.raises(InvalidParams):
        handler.call({b"a": 1})


async def test_string_names_still_reach_kwargs():
    assert await Dispatcher(Open()).get("open.anything").call({"a": 1, "b": 2}) == 2
