"""Running the fleet: roles, detector affinity, periodic jobs, broker transport, metrics.

- :mod:`.roles`: which processes run, on which queues, with which pool;
- :mod:`.affinity`: detector queues over workers (pure);
- :mod:`.controller`: keeps each detector queue consumed by one live compute worker;
- :mod:`.heartbeat`: every worker says in Redis that it lives and what it consumes;
- :mod:`.schedule`: the periodic jobs of ``celery beat``; :mod:`.operations`: their tasks;
- :mod:`.housekeeping`: local repos and caches, index expiry;
- :mod:`.gauges`: queue depths and live workers;
- :mod:`.prometheus`: the ``/metrics`` endpoint;
- :mod:`.brokers`: the Redis transport that survives a Redis restart.
"""
