"""Type variables and aliases shared by the batchsync modules."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal, TypedDict, TypeVar

K = TypeVar("K")
V = TypeVar("V")

#: What a batch function may return: a Mapping from key to value, or one item per key.
#: An exception instance as a value fails that key alone.
BatchResult = Mapping[Any, V | BaseException] | Sequence[V | BaseException]

#: The user's bulk function: takes the list of unique keys of one call.
BatchFn = Callable[[list[K]], BatchResult[V]]

#: Maps a key to the hashable identity used for de-duplication and caching.
KeyFn = Callable[[K], Hashable]

#: Called at load time in the caller's thread; keys of different partitions never share a call.
PartitionFn = Callable[[], Hashable]

CacheMode = bool | Literal["scope"]
MissingMode = Literal["none", "raise"]


class BatcherOptions(TypedDict, total=False):
    """The keyword options of Batcher, for decorators that pass them on (``batched``)."""

    window: float
    max_batch_size: int
    max_concurrency: int
    cache: CacheMode
    key_fn: Callable[[Any], Hashable] | None
    partition: Callable[[], Hashable] | None
    missing: MissingMode
    eager: bool
    inline: bool
    name: str | None
