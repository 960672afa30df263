"""The fleet's shared state in Redis: every key in :mod:`.keys`, and the records kept there.

- :mod:`.keys`: the name of every Redis key the fleet uses (one home, so none collide);
- :mod:`.arrivals`: which snaps are in the bucket, and the waiters' wake-ups;
- :mod:`.ledger`: one record per visit, written by the router and the stages;
- :mod:`.metrics`: counters and latency histograms aggregated across processes.

The catch-up records live in :mod:`prompt_tasks.daytime.catchup` (their keys here).
"""
