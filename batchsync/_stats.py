"""Stats: a frozen snapshot of a Batcher's counters."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["Stats", "stats_by_name"]


@dataclass(frozen=True)
class Stats:
    """Counters of one Batcher since it was made (or since a fork, in the child).

    ``loads`` counts keys asked for; ``cache_hits`` those answered from the cache;
    ``deduplicated`` those that joined a key already queued or in flight; ``batches`` the
    batch-function calls; ``keys`` the keys sent in them; ``failed_batches`` the calls that
    raised or broke the contract; ``largest_batch`` the largest call; ``coalesced_keys`` the
    keys sent in a call together with at least one other key; ``queued`` and ``in_flight``
    are the keys waiting and being computed at the moment of the snapshot.
    """

    loads: int = 0
    cache_hits: int = 0
    deduplicated: int = 0
    batches: int = 0
    keys: int = 0
    failed_batches: int = 0
    largest_batch: int = 0
    coalesced_keys: int = 0
    queued: int = 0
    in_flight: int = 0

    @property
    def mean_batch_size(self) -> float:
        """Keys sent per batch call (0.0 before the first call)."""
        return self.keys / self.batches if self.batches else 0.0

    @property
    def coalescing_rate(self) -> float:
        """The share of sent keys that rode in a call with at least one other key."""
        return self.coalesced_keys / self.keys if self.keys else 0.0


def stats_by_name() -> dict[str, Stats]:
    """Return a snapshot of the Stats of every live Batcher, by Batcher name.

    For an app that exports its own metrics: one entry per name, the counters of
    Batchers that share a name summed (``largest_batch`` is the largest of theirs).
    Closed Batchers that are still referenced are included; collected ones are not.
    """
    from ._lifecycle import live_cores

    out: dict[str, Stats] = {}
    for core in live_cores():
        snap = core.stats()
        seen = out.get(core.name)
        if seen is not None:
            summed = {f.name: getattr(seen, f.name) + getattr(snap, f.name) for f in fields(Stats)}
            summed["largest_batch"] = max(seen.largest_batch, snap.largest_batch)
            snap = Stats(**summed)
        out[core.name] = snap
    return out
