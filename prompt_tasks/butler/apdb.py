"""The Alert Production Database the association task writes to: where its config file lives.

``central init`` (or an operator) writes the APDB's config file to ``settings.apdb_config``
(by default into the state directory; a fleet puts it where every host reads the same
file, e.g. on the S3 server, so every host configures its pipelines alike);
every pipeline whose tasks take ``apdb_config_url`` is configured with it
(:class:`prompt_tasks.butler.execute.PipelineCache`), and ``prepare`` opens it to warm the
connection before the snaps arrive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lsst.resources import ResourcePath

    from prompt_tasks.context import Context
    from prompt_tasks.settings import Settings

__all__ = ["APDB_CONFIG_NAME", "apdb_config_path", "open_apdb"]

#: File name of the APDB config in the state directory.
APDB_CONFIG_NAME = "apdb-config.yaml"


def apdb_config_path(settings: Settings) -> ResourcePath:
    """Where the APDB config file is (``Apdb.from_uri`` reads it): a file or an ``s3://`` object."""
    from lsst.resources import ResourcePath

    return ResourcePath(settings.apdb_config or settings.state_path / APDB_CONFIG_NAME, forceDirectory=False)


def open_apdb(ctx: Context) -> Any:
    """This process's APDB client (opened once, kept in the context)."""
    apdb = ctx.extras.get("apdb")
    if apdb is None:
        from lsst.dax.apdb import Apdb  # heavy: only processes that run pipelines pay for it

        apdb = Apdb.from_uri(str(apdb_config_path(ctx.settings)))
        ctx.extras["apdb"] = apdb
    return apdb
