"""Server reflection that describes every service under the name clients call.

The OIP messages live in proto package ``cellserve.oip`` (see ``cellserve/oip/__init__.py``: in a
process that also imports ``tritonclient``, protobuf's default pool already holds ``inference.*``),
but Triton's clients call ``inference.GRPCInferenceService``. Reflection therefore answers from a
private descriptor pool: copies of the served services' files, plus one synthesized file per alias
that declares a service of the alias's name whose methods are the original's, over the original's
messages. ``grpcurl list`` shows the alias, ``grpcurl … inference.GRPCInferenceService/ServerLive``
resolves it, and message names (which never travel on the wire) stay ``cellserve.oip.*``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha import reflection

SERVICE_NAME = reflection.SERVICE_NAME


def _add_file(pool: descriptor_pool.DescriptorPool, file: FileDescriptor, added: set[str]) -> None:
    """Copy ``file`` and, first, everything it imports into ``pool`` (each once)."""
    if file.name in added:
        return
    for dependency in file.dependencies:
        _add_file(pool, dependency, added)
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    pool.Add(proto)
    added.add(file.name)


def _alias_file(alias: str, service: ServiceDescriptor) -> descriptor_pb2.FileDescriptorProto:
    """A file declaring service ``alias`` (full name) with ``service``'s methods and message types."""
    package, _, name = alias.rpartition(".")
    proto = descriptor_pb2.FileDescriptorProto(
        name=f"cellserve/reflection/{alias.replace('.', '/')}.proto",
        package=package,
        syntax="proto3",
        dependency=[service.file.name],
    )
    declared = proto.service.add(name=name)
    for method in service.methods:
        declared.method.add(
            name=method.name,
            input_type="." + method.input_type.full_name,
            output_type="." + method.output_type.full_name,
            client_streaming=method.client_streaming,
            server_streaming=method.server_streaming,
        )
    return proto


def reflection_pool(service_names: Iterable[str], aliases: Mapping[str, str]) -> descriptor_pool.DescriptorPool:
    """A pool describing ``service_names``; a name in ``aliases`` is described as the service it maps to."""
    default = descriptor_pool.Default()
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    for name in service_names:
        original = default.FindServiceByName(aliases.get(name, name))
        _add_file(pool, original.file, added)
        if name in aliases:
            pool.Add(_alias_file(name, original))
    return pool


def enable_reflection(server: grpc.aio.Server, service_names: list[str], aliases: Mapping[str, str]) -> None:
    """Serve ``grpc.reflection.v1alpha`` for ``service_names`` (plus reflection itself) on ``server``."""
    names = list(dict.fromkeys([*service_names, SERVICE_NAME]))
    reflection.enable_server_reflection(names, server, pool=reflection_pool(names, aliases))
