"""A fleet of hosts that share no disk: outputs reach the central repo only through the object store.

Each "host" runs in its own mount namespace (``unshare --mount``) with private, empty tmpfs
mounts over every other host's directories and over the servers' own data: a compute worker
cannot read another host's local repos, and the registry writer cannot read any. The central
repo is what a fleet runs: a PostgreSQL registry and a datastore on the S3 server (its
``butler.yaml`` in the bucket too). A night of three visits on four detectors runs ApPipe on two
compute hosts; one compute host is SIGKILLed in the middle of a pipeline run, its detector
queues move to the other host, and the redelivered run is redone there from scratch. Every
output must be registered exactly once in the central repo and be readable through it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import redis

from prompt_tasks.butler.export import is_exported
from prompt_tasks.fleet.controller import QueueController
from prompt_tasks.flow.router import announce, detector_queue
from prompt_tasks.instruments.simcam.config import SimConfig
from prompt_tasks.model.visit import NextVisit
from prompt_tasks.settings import Settings
from prompt_tasks.store import ledger
from prompt_tasks.store.keys import EXPORT_FAILED, fault_key
from tests.butlerkit import next_visit, put_raws, visit_spec
from tests.fleetkit import Fleet, node_alive, summary_of, wait_until
from tests.servers import missing, postgres_schema

pytestmark = pytest.mark.slow

HOSTS: dict[str, list[int]] = {"host-a": [0, 1], "host-b": [2, 3]}
DETECTORS = sorted(d for dets in HOSTS.values() for d in dets)
QUEUES = [detector_queue("SimCam", d) for d in DETECTORS]
#: The simulated camera of this fleet's night.
WORLD = SimConfig(n_detectors=len(DETECTORS), size=256)
#: The outputs of ApPipe checked in the central repo.
OUTPUTS = ("visit_image", "difference_image")


def isolated(masked: Sequence[Path]) -> Callable[[list[str]], list[str]]:
    """A command wrapper running ``argv`` in a new mount namespace with ``masked`` hidden."""
    mounts = " && ".join(f"mount -t tmpfs -o size=4m,mode=700 none '{path}'" for path in masked)

    def wrap(argv: list[str]) -> list[str]:
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                f'{mounts} && exec "$@"', "sh", *argv]

    return wrap


def _can_unshare() -> None:
    if shutil.which("unshare") is None:
        missing("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "--mount", "--", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        missing(f"cannot create a mount namespace (root needed): {probe.stderr.strip()}")


@pytest.fixture
def fleet_settings(servers: Settings, tmp_path: Path) -> Iterator[Settings]:
    """The fleet's shared settings: central repo on PostgreSQL + S3, APDB on PostgreSQL."""
    from prompt_tasks.instruments.simcam.central import init_central

    _can_unshare()
    with postgres_schema("fleet") as (url, schema):
        prefix = f"s3://{servers.central_bucket}/fleet-{uuid.uuid4().hex[:8]}"
        base = servers.model_copy(update={
            "state_dir": tmp_path / "operator",
            "central_repo": f"{prefix}/repo/",
            "apdb_config": f"{prefix}/apdb-config.yaml",  # every host reads the same APDB config
            "apdb_url": url,
            "export_max_age_s": 0.5, "ledger_ttl_s": 3600, "deadline_margin_s": 600.0,
            # a killed worker's task comes back within ~20 s: longer than any stage takes here
            "visibility_timeout": 20, "restore_interval_s": 1,
        })
        (tmp_path / "operator").mkdir()
        init_central(base, config=WORLD,
                     registry_db=url, registry_namespace=schema, apdb_namespace=f"{schema}_apdb")
        yield base


def host_settings(base: Settings, root: Path) -> Settings:
    """One host's settings: its own state directory and local repos."""
    root.mkdir(parents=True, exist_ok=True)
    return base.model_copy(update={"state_dir": root, "local_repo_root": root / "local"})


def test_hosts_share_no_disk_and_outputs_reach_the_central_repo_once(
        fleet_settings: Settings, servers: Settings, tmp_path: Path, rdb: redis.Redis) -> None:
    from lsst.daf.butler import Butler

    from prompt_tasks.celery import create_app

    roots = {name: tmp_path / name for name in (*HOSTS, "writer", "services")}
    # every host sees neither the other hosts' disks nor the servers' data directories
    hidden = {name: [r for other, r in roots.items() if other != name] + [servers.state_path] for name in roots}
    fleets = {name: Fleet(host_settings(fleet_settings, root), root) for name, root in roots.items()}
    for name, fleet in fleets.items():
        fleet.wrap = isolated(hidden[name])
    app = create_app(fleet_settings)
    ctl = None
    try:
        fleets["services"].role("wait")
        fleets["services"].dispatcher()
        fleets["writer"].role("summary")
        for i, name in enumerate(HOSTS):
            fleets[name].detector(i + 1, host=name)
        wait_until(lambda: node_alive(app, "wait@") and node_alive(app, "summary@")
                   and node_alive(app, "detector-", len(HOSTS)), 180, "workers up")
        ctl = QueueController(app, fleet_settings, queues=QUEUES).start()
        wait_until(lambda: len(ctl.assignment) == len(QUEUES) and len(set(ctl.assignment.values())) == 2,
                   120, "both hosts own detector queues")

        # a minute apart: a simulated visit's exposure id counts the seconds of the day by tens
        specs = [visit_spec(time.time() + 60 * i, snaps=1) for i in range(3)]
        victim_queue = QUEUES[0]
        victim = ctl.assignment[victim_queue]
        rdb.set(fault_key("SimCam", specs[1].group, 0, "run"), "sleep:6", ex=900)  # a run to kill
        for spec in specs:
            announce(app, fleet_settings, NextVisit.model_validate(next_visit(spec)), detectors=DETECTORS)
            put_raws(fleet_settings, spec, DETECTORS, config=WORLD)
        wait_until(lambda: "run.start" in ledger.read_visit(rdb, "SimCam", specs[1].group).detectors[0].times,
                   300, "detector 0 of the second visit running its pipeline")
        host = victim.split("@")[1]
        fleets[host].kill(victim.split("@")[0])

        for spec in specs:
            summary = wait_until(lambda s=spec: summary_of(rdb, NextVisit.model_validate(next_visit(s))),
                                 420, f"summary of {spec.group}", step=0.5)
            assert summary["counts"]["ok"] == len(DETECTORS), {
                det: (d.get("outcome"), d.get("reason")) for det, d in summary["detectors"].items()}
        record = ledger.read_visit(rdb, "SimCam", specs[1].group)
        assert record is not None and record.detectors[0].workers["run"] != victim  # redone elsewhere
        wait_until(lambda: all(is_exported(rdb, "SimCam", s.group, d) for s in specs for d in DETECTORS),
                   240, "every detector-visit registered centrally")
        assert int(rdb.llen(EXPORT_FAILED)) == 0
    finally:
        if ctl is not None:
            ctl.stop()
        app.close()
        for fleet in fleets.values():  # each host's logs stay in its directory under tmp_path
            fleet.stop_all()

    central = Butler.from_config(fleet_settings.central_repo_uri)
    try:
        runs = list(central.collections.query("SimCam/prompt/*/ApPipe/*"))
        assert runs
        for spec in specs:
            for name in OUTPUTS:
                refs = central.query_datasets(name, collections=runs, find_first=False, explain=False,
                                              data_id={"instrument": "SimCam", "visit": spec.visit})
                assert sorted(r.dataId["detector"] for r in refs) == DETECTORS, (name, spec.group)
        image = central.get(refs[0])  # read back through the central datastore (the S3 server)
        assert image.data.shape == (256, 256)
        assert str(central.getURI(refs[0])).startswith("s3://")
    finally:
        central.close()
