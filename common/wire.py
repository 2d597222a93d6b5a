"""The one JSON rendering of the wire messages (eptwatch.v1), for the agent's CLI and the aggregator's API."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message


def message_to_dict(msg: Message) -> dict[str, Any]:
    """Proto field names, so the JSON and the .proto read the same; zeros printed, so only an `optional`
    field that was not measured is absent (unknown is not 0); 64-bit integers stay strings, as proto3
    JSON says (2**53 precision)."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
