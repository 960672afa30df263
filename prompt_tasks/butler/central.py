"""What the central repository says about the instruments: the cameras it was built with.

A simulated camera's focal plane is chosen when its central repository is built, so the
detectors an instrument has come from the repository's camera description (the plugin's
``read_camera``) rather than the plugin's defaults. The queue controller and the bucket-event
dispatcher both ask here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prompt_tasks.instruments import UnknownInstrument, load_plugin
from prompt_tasks.objstore import configure_s3

if TYPE_CHECKING:
    from prompt_tasks.settings import Settings

__all__ = ["central_cameras"]

log = logging.getLogger(__name__)


def central_cameras(settings: Settings, instruments: Iterable[str]) -> dict[str, Mapping[str, Any]]:
    """Instrument → the camera description the central repo holds, for those that have one.

    An absent or unreadable repository (logged), or an instrument whose plugin reads no
    camera, gives no entry.
    """
    readers = {}
    for name in instruments:
        try:
            plugin = load_plugin(name)
        except UnknownInstrument:
            continue
        if plugin.read_camera is not None:
            readers[name] = plugin.read_camera
    if not readers:
        return {}
    try:
        from lsst.daf.butler import Butler  # heavy: only when a camera is to be read
        from lsst.resources import ResourcePath

        configure_s3(settings)  # the repository (or its files) may be on the S3 server
        if not ResourcePath(settings.central_repo_uri, forceDirectory=True).join("butler.yaml").exists():
            return {}
        butler = Butler.from_config(settings.central_repo_uri)
        try:
            cameras = {name: read(butler) for name, read in readers.items()}
        finally:
            butler.close()
    except Exception:
        log.warning("could not read the central repo's camera", exc_info=True)
        return {}
    return {name: camera for name, camera in cameras.items() if camera is not None}
