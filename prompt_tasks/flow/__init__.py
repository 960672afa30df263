"""A visit's flow through Celery: route, chord, stages, waiting for snaps, bucket events.

- :mod:`.router`: one announced visit becomes a chord of detector chains and a deadline;
- :mod:`.tasks`: the registered tasks (prepare_repo, wait_for_snap, ingest, run_pipeline,
  summarize_visit, visit_deadline, export);
- :mod:`.stage`: the base task of every stage: statuses instead of exceptions, injected faults;
- :mod:`.policy`: time limits, retries and backoff of each stage (one table);
- :mod:`.retry`: what is transient, how long to wait, how many deliveries are too many;
- :mod:`.snap`: waiting for a detector's snaps;
- :mod:`.dispatcher`: bucket events in, arrivals indexed, waiters woken.
"""
