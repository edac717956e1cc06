"""PartialMode and Envelope have one definition, which the scheduler and the
gateway both use, and which covers every value of the API's enums."""

from __future__ import annotations

from conveyor.v1 import common_pb2, conveyor_pb2

from conveyor_common.types import Envelope, PartialMode
from scheduler import servicer
from scheduler.gateway_client import tool_from_pb
from tool_gateway.servicer import spec_to_pb
from tool_gateway.tools import base


def test_the_gateway_uses_the_shared_partial_mode():
    assert base.PartialMode is PartialMode


def test_every_api_partial_mode_has_a_member_and_round_trips():
    for name in common_pb2.PartialMode.keys():
        if name == "PARTIAL_MODE_UNSPECIFIED":
            continue
        mode = PartialMode[name.removeprefix("PARTIAL_MODE_")]
        spec = base.ToolSpec(name="t", description="", parameters={}, partial_mode=mode)
        assert tool_from_pb(spec_to_pb(spec)).partial_mode is mode


def test_an_unknown_partial_mode_from_a_newer_gateway_runs_whole():
    spec = common_pb2.ToolSpec(name="t", partial_mode=99)
    assert tool_from_pb(spec).partial_mode is PartialMode.WHOLE


def test_every_api_envelope_maps_to_a_member():
    values = [v for k, v in conveyor_pb2.Envelope.items() if k != "ENVELOPE_UNSPECIFIED"]
    assert sorted(servicer._ENVELOPES) == sorted(values)
    assert set(servicer._ENVELOPES.values()) == set(Envelope)


def test_members_format_as_their_bare_value():
    assert f"PARTIAL_MODE_{PartialMode.LINES}" == "PARTIAL_MODE_LINES"
    assert f"{Envelope.TAG}" == "tag"
