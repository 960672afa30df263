"""Object-key schemes: DMTN-219, Rubin's LSSTCam keys with sidecars, and plugging in others."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prompt_tasks.errors import InvalidEvent
from prompt_tasks.model.objectkeys import (
    DEFAULT_SCHEME,
    Dmtn219Scheme,
    KeyScheme,
    LsstCamScheme,
    NeedsSidecar,
    SnapKey,
    format_key,
    parse_key,
    register_scheme,
    registered_schemes,
    resolve,
    scheme_for,
)

GROUP = "2026-11-24T01:00:00.000"


def test_dmtn219_round_trip() -> None:
    key = format_key("SimCam", 4, GROUP, 1, "raw.fits")
    assert key == f"SimCam/4/{GROUP}/1/raw.fits"
    assert parse_key(key) == SnapKey("SimCam", 4, GROUP, 1, "raw.fits")


@given(
    detector=st.integers(0, 10_000),
    snap=st.integers(0, 99),
    group=st.text(st.characters(blacklist_characters="/", blacklist_categories=("Cs",)), min_size=1),
    filename=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1).filter(lambda s: not s.startswith("/")),
)
def test_dmtn219_round_trip_any_group(detector: int, snap: int, group: str, filename: str) -> None:
    key = Dmtn219Scheme().format("SimCam", detector, group, snap, filename)
    assert Dmtn219Scheme().parse(key) == SnapKey("SimCam", detector, group, snap, filename)


@pytest.mark.parametrize(
    "key",
    ["SimCam", "SimCam/4", "SimCam/4/g/0", "SimCam/x/g/0/raw.fits", "SimCam/4/g/-1/raw.fits",
     "SimCam//g/0/raw.fits", "SimCam/4/g/0/", "/4/g/0/raw.fits"],
)
def test_dmtn219_rejects_keys_outside_the_scheme(key: str) -> None:
    with pytest.raises(InvalidEvent):
        parse_key(key)


def test_default_and_registered_schemes() -> None:
    assert scheme_for("SimCam") is DEFAULT_SCHEME
    assert isinstance(scheme_for("LSSTCam"), LsstCamScheme)

    class Flat(KeyScheme):
        name = "flat"

        def parse(self, key: str, sidecar: Mapping[str, Any] | None = None) -> SnapKey:
            instrument, group, rest = key.split("/", 2)
            detector, snap = rest.removesuffix(".fits").split("-")
            return SnapKey(instrument, int(detector), group, int(snap), rest)

        def format(self, instrument: str, detector: int, group: str, snap: int,
                   filename: str = "raw.fits", **extra: Any) -> str:
            return f"{instrument}/{group}/{detector}-{snap}.fits"

        def listing_prefix(self, instrument: str, group: str, detector: int) -> str:
            return f"{instrument}/{group}/"

    register_scheme("FlatCam", Flat())
    try:
        key = format_key("FlatCam", 3, "g1", 2)
        assert key == "FlatCam/g1/3-2.fits"
        assert parse_key(key) == SnapKey("FlatCam", 3, "g1", 2, "3-2.fits")
        assert "FlatCam" in registered_schemes()
    finally:
        from prompt_tasks.model import objectkeys as keys

        keys._SCHEMES.pop("FlatCam")


def test_lsstcam_keys_need_their_sidecar() -> None:
    scheme = LsstCamScheme()
    key = "LSSTCam/20261123/MC_O_20261123_000042/MC_O_20261123_000042_R22_S11.fits"
    with pytest.raises(NeedsSidecar) as caught:
        parse_key(key)
    sidecar = "LSSTCam/20261123/MC_O_20261123_000042/MC_O_20261123_000042_R22_S11.json"
    assert caught.value.sidecar == sidecar
    assert scheme.sidecar_key(key) == sidecar
    assert scheme.sidecar_of(sidecar) == key
    assert scheme.sidecar_of(key) is None
    snap = parse_key(key, {"GROUPID": GROUP, "CURINDEX": 2, "IMGTYPE": "OBJECT"})
    assert snap == SnapKey("LSSTCam", 94, GROUP, 1, "MC_O_20261123_000042_R22_S11.fits")


def test_lsstcam_detectors_and_format() -> None:
    scheme = LsstCamScheme()
    header = {"GROUPID": GROUP}
    for detector in (0, 94, 188, 189, 204):
        key = format_key("LSSTCam", detector, GROUP, 0)
        assert key.startswith("LSSTCam/20261123/")
        assert scheme.parse(key, header).detector == detector
    assert scheme.listing_prefix("LSSTCam", GROUP, 5) == "LSSTCam/20261123/"
    assert format_key("LSSTCam", 0, GROUP, 0).endswith("_R01_S00.fits")


@pytest.mark.parametrize(
    "key",
    ["LSSTCam/2026/x/x_R22_S11.fits", "LSSTCam/20261123/a/b_R22_S11.fits",
     "LSSTCam/20261123/a/a_R00_S11.fits", "LSSTCam/20261123/a/a_R22_S11.txt"],
)
def test_lsstcam_rejects_other_keys(key: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_key(key, {"GROUPID": GROUP})
    assert not isinstance(caught.value, NeedsSidecar)


def test_lsstcam_sidecar_without_group_is_invalid() -> None:
    key = format_key("LSSTCam", 3, GROUP, 0)
    with pytest.raises(InvalidEvent):
        parse_key(key, {"CURINDEX": 1})


def test_resolve_reads_the_sidecar_only_when_needed() -> None:
    reads: list[str] = []

    def reader(key: str) -> Mapping[str, Any] | None:
        reads.append(key)
        return {"GROUPID": GROUP} if key.endswith(".json") else None

    assert resolve(f"SimCam/1/{GROUP}/0/raw.fits", reader) == (SnapKey("SimCam", 1, GROUP, 0, "raw.fits"), None)
    assert reads == []
    key = format_key("LSSTCam", 7, GROUP, 0)
    snap, sidecar = resolve(key, reader)
    assert (snap.group, snap.detector) == (GROUP, 7) and sidecar == {"GROUPID": GROUP}
    with pytest.raises(NeedsSidecar):
        resolve(key, lambda key: None)
