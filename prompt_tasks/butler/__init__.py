"""The Butler work of a detector-visit, on the LSST middleware.

- :mod:`.stages`: the bodies of prepare_repo, ingest and run_pipeline;
- :mod:`.localrepo`: one local repository per detector on each worker, reused across visits;
- :mod:`.selection`: which pipelines a visit may run (pure);
- :mod:`.preload`: planning (pure) and filling a local repo from the central one;
- :mod:`.cache`: the bounded cache of preloaded datasets;
- :mod:`.ingest`: raws from the bucket into the local repo;
- :mod:`.execute`: the one wrapper of the middleware's in-process executor;
- :mod:`.export`: outputs written into the central datastore by the compute worker (raws named where they are);
- :mod:`.central`: what the central repository says about the instruments (their cameras);
- :mod:`.writer`: the registry writer: export messages registered in batches;
- :mod:`.apdb`: the Alert Production Database's configuration.
"""
