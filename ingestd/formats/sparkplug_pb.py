"""The Sparkplug B 3.0 payload as protobuf messages, decoded by `protobuf` (upb).

The wire format is the specification's (Eclipse Sparkplug 3.0, chapter 6.4:
`org.eclipse.tahu.protobuf.Payload`, proto2). It is declared here as data and
built into message classes when first used (`Payload`, a module attribute
made on first access: protobuf's runtime takes ~5 MB, which a daemon without
Sparkplug routes need not hold), so there is no generated code to keep in
step with the protobuf runtime and no protoc step. Only what ingestd reads
or writes is declared: a field not declared here is kept by protobuf as an
unknown field and ignored, so payloads carrying more decode the same.
"""

from __future__ import annotations

from typing import Any

PACKAGE = "org.eclipse.tahu.protobuf"

# Sparkplug data types (spec 6.4.16) by number.
DATATYPES = {
    0: "Unknown", 1: "Int8", 2: "Int16", 3: "Int32", 4: "Int64", 5: "UInt8", 6: "UInt16",
    7: "UInt32", 8: "UInt64", 9: "Float", 10: "Double", 11: "Boolean", 12: "String",
    13: "DateTime", 14: "Text", 15: "UUID", 16: "DataSet", 17: "Bytes", 18: "File",
    19: "Template", 20: "PropertySet", 21: "PropertySetList", 22: "Int8Array",
    23: "Int16Array", 24: "Int32Array", 25: "Int64Array", 26: "UInt8Array",
    27: "UInt16Array", 28: "UInt32Array", 29: "UInt64Array", 30: "FloatArray",
    31: "DoubleArray", 32: "BooleanArray", 33: "StringArray", 34: "DateTimeArray",
}  # fmt: skip
BY_NAME = {name: number for number, name in DATATYPES.items()}

_TYPES = {  # FieldDescriptorProto's names
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "float": "TYPE_FLOAT",
    "double": "TYPE_DOUBLE",
    "bool": "TYPE_BOOL",
    "string": "TYPE_STRING",
    "bytes": "TYPE_BYTES",
}

# message -> [(field, number, type or message, repeated, oneof "value")]
_VALUE = True
_SCHEMA: dict[str, list[tuple[str, int, str, bool, bool]]] = {
    "Payload": [
        ("timestamp", 1, "uint64", False, False),
        ("metrics", 2, ".Payload.Metric", True, False),
        ("seq", 3, "uint64", False, False),
        ("uuid", 4, "string", False, False),
        ("body", 5, "bytes", False, False),
    ],
    "Payload.PropertyValue": [
        ("type", 1, "uint32", False, False),
        ("is_null", 2, "bool", False, False),
        ("int_value", 3, "uint32", False, _VALUE),
        ("long_value", 4, "uint64", False, _VALUE),
        ("float_value", 5, "float", False, _VALUE),
        ("double_value", 6, "double", False, _VALUE),
        ("boolean_value", 7, "bool", False, _VALUE),
        ("string_value", 8, "string", False, _VALUE),
        ("propertyset_value", 9, ".Payload.PropertySet", False, _VALUE),
    ],
    "Payload.PropertySet": [
        ("keys", 1, "string", True, False),
        ("values", 2, ".Payload.PropertyValue", True, False),
    ],
    "Payload.DataSet": [
        ("num_of_columns", 1, "uint64", False, False),
        ("columns", 2, "string", True, False),
        ("types", 3, "uint32", True, False),
    ],
    "Payload.Template": [
        ("version", 1, "string", False, False),
        ("metrics", 2, ".Payload.Metric", True, False),
        ("template_ref", 4, "string", False, False),
        ("is_definition", 5, "bool", False, False),
    ],
    "Payload.Metric": [
        ("name", 1, "string", False, False),
        ("alias", 2, "uint64", False, False),
        ("timestamp", 3, "uint64", False, False),
        ("datatype", 4, "uint32", False, False),
        ("is_historical", 5, "bool", False, False),
        ("is_transient", 6, "bool", False, False),
        ("is_null", 7, "bool", False, False),
        ("properties", 9, ".Payload.PropertySet", False, False),
        ("int_value", 10, "uint32", False, _VALUE),
        ("long_value", 11, "uint64", False, _VALUE),
        ("float_value", 12, "float", False, _VALUE),
        ("double_value", 13, "double", False, _VALUE),
        ("boolean_value", 14, "bool", False, _VALUE),
        ("string_value", 15, "string", False, _VALUE),
        ("bytes_value", 16, "bytes", False, _VALUE),
        ("dataset_value", 17, ".Payload.DataSet", False, _VALUE),
        ("template_value", 18, ".Payload.Template", False, _VALUE),
    ],
}


def _build() -> Any:
    from google.protobuf import (  # noqa: PLC0415 - on first use (see above)
        descriptor_pb2,
        descriptor_pool,
        message_factory,
    )

    _F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="ingestd_sparkplug_b.proto", package=PACKAGE, syntax="proto2"
    )
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}
    for path in sorted(_SCHEMA, key=lambda p: p.count(".")):
        parent, _, name = path.rpartition(".")
        msg = (messages[parent].nested_type if parent else file.message_type).add(name=name)
        messages[path] = msg
        has_value = any(oneof for *_, oneof in _SCHEMA[path])
        if has_value:
            msg.oneof_decl.add(name="value")
        for field, number, kind, repeated, oneof in _SCHEMA[path]:
            f = msg.field.add(
                name=field,
                number=number,
                label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL,
            )
            if kind.startswith("."):
                f.type = _F.TYPE_MESSAGE
                f.type_name = f".{PACKAGE}{kind}"
            else:
                f.type = getattr(_F, _TYPES[kind])
            if oneof:
                f.oneof_index = 0
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Payload"))


_built: list[Any] = []


def payload_class() -> Any:
    """The Payload message class, made on the first call."""
    if not _built:
        _built.append(_build())
    return _built[0]


def __getattr__(name: str) -> Any:
    """`Payload`, made on first access (`from ... import Payload` works)."""
    if name == "Payload":
        return payload_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
