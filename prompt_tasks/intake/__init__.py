"""The intake: where next_visit events come in.

- :mod:`~prompt_tasks.intake.http`: the HTTP API (``POST /next-visit``, visit ledgers, aborts);
- :mod:`~prompt_tasks.intake.stream`: the consumer of Rubin's per-detector fan-out streams;
- :mod:`~prompt_tasks.intake.service`: the process running both and the queue controller;
- :mod:`~prompt_tasks.intake.errors`: the error table (error class → HTTP status and code);
- :mod:`~prompt_tasks.intake.client`: the client the CLI sends events with.

Importing this package imports none of them.
"""

__all__: list[str] = []
