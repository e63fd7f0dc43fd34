"""Building servicers from the generated stubs.

A service's ``server.py`` implements the RPCs that have landed as methods of a
servicer class. :func:`complete_servicer` fills in the rest of the RPCs the
contract declares: each checks the object references in its request (so malformed
keys are refused the same way everywhere) and then answers UNIMPLEMENTED naming the
issue that brings it — never the generated "Method not implemented!".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from services.common.errors import NotImplementedYet
from services.common.refs import validate_refs


def _planned_method(service: str, method: MethodDescriptor, issue: int) -> Callable[..., Any]:
    what = f"{service}.{method.name} is not built yet (it arrives with issue #{issue})"

    if method.client_streaming:

        def planned_stream_in(self: Any, requests: Iterator[Any], context: Any) -> Any:
            raise NotImplementedYet(what)

        return planned_stream_in

    def planned(self: Any, request: Any, context: Any) -> Any:
        validate_refs(request)
        raise NotImplementedYet(what)

    return planned


def complete_servicer(cls: type, service: ServiceDescriptor, issue: int) -> type:
    """Give ``cls`` every RPC of ``service`` it does not implement itself.

    Args:
        cls: A subclass of the generated ``XxxServiceServicer``.
        service: The service's descriptor from the generated ``*_pb2`` module.
        issue: The issue that brings the missing RPCs, named in their error.

    Returns:
        ``cls`` itself, completed (use as a class decorator argument).
    """
    for method in service.methods:
        if method.name not in cls.__dict__:
            setattr(cls, method.name, _planned_method(service.name, method, issue))
    return cls
