"""An index over an ``onnx.ModelProto`` that the analysis and the rewrite share.

The engine edits the protobuf in place instead of converting to another IR: weights stay where they are
(no second copy of the model), and only the initializers that change are re-encoded. The index gives

* ``producer[name]`` — the node writing a tensor, ``consumers[name]`` — the (node, input slot) pairs
  reading it, ``outputs`` / ``inputs`` — the graph's real interface (initializers listed as inputs, as IR 3
  models do, are constants, not inputs);
* constants: ``constant(name)`` returns an initializer's value as numpy (small ones are cached);
* ``shape(name)`` — the static shape after inference (a tuple of int, or ``None`` per unknown dim).

Memory: :func:`detach_weights` makes the working copy without the bytes of large weights (each is a
placeholder naming its source tensor in the input model, which is only read); new values are kept as
numpy arrays until :meth:`Graph.flush_updates`, and untouched weights are copied across once, at the end
(:func:`attach_weights`). Protobuf arenas never give back the memory of a field that is overwritten, so
this is what keeps a slim run near "input + output" bytes instead of several copies of the model.

:class:`WeightStore` writes changed weights back. An initializer read by several nodes (a shared mask, a
shared weight) is never edited for one reader behind another's back: a reader that needs a different
value gets its own copy under a fresh name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxslim.errors import OnnxSlimError
from onnxslim.graph import quantized

Shape = tuple  # tuple[int | None, ...]
_CACHE_LIMIT = 1 << 16  # elements; larger arrays are decoded on demand so the model is never held twice

_NP_DTYPE = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """Decode a TensorProto; raw little-endian data takes the fast path (one copy)."""
    dtype = _NP_DTYPE.get(tensor.data_type)
    if dtype is not None and tensor.HasField("raw_data") and tensor.data_location != onnx.TensorProto.EXTERNAL:
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def store_array(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    """Overwrite ``tensor``'s value in place (name kept), keeping its element type."""
    dtype = _NP_DTYPE.get(tensor.data_type)
    if dtype is None:
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
        return
    array = np.ascontiguousarray(array, dtype=dtype)
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "external_data"):
        tensor.ClearField(field)
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.dims[:]
    tensor.dims.extend(array.shape)
    tensor.raw_data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


@dataclasses.dataclass(frozen=True)
class Use:
    """One input slot of one node: ``node.input[slot]``."""

    node: onnx.NodeProto
    slot: int


class Graph:
    """Producers, consumers, constants and shapes of a model's main graph."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, Shape] | None = None,
                 sources: dict[str, onnx.TensorProto] | None = None, symbols: dict[str, tuple] | None = None):
        self.model = model
        self.graph = model.graph
        self.opset = opset_version(model)
        self.shapes: dict[str, Shape] = dict(shapes or {})
        self.symbols: dict[str, tuple] = dict(symbols or {})  # per dim: its symbol (dim_param) or None
        self.sources = sources if sources is not None else {}  # placeholder name -> tensor holding its data
        self.updates: dict[str, np.ndarray] = {}  # new values not yet written into the protos
        self._cache: dict[str, np.ndarray] = {}
        self.reindex()

    # -- indexing ---------------------------------------------------------------------------------
    def reindex(self) -> None:
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self.nodes: list[onnx.NodeProto] = list(self.graph.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[Use]] = {}
        for node in self.nodes:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for slot, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append(Use(node, slot))
        self.outputs: set[str] = {o.name for o in self.graph.output}
        self.inputs: list[onnx.ValueInfoProto] = [i for i in self.graph.input if i.name not in self.initializers]
        # names read inside control-flow bodies; their channels must be kept
        self.subgraph_reads: set[str] = set()
        for node in self.nodes:
            for attr in node.attribute:
                for body in _subgraphs(attr):
                    self.subgraph_reads.update(_outer_reads(body))
        self._cache = {k: v for k, v in self._cache.items() if k in self.initializers}
        # DequantizeLinear of initializers (QDQ weights) or of a QuantizeLinear of one (fake-quantized):
        # read as constants, written back in their form
        self.quantized: dict[str, onnx.NodeProto] = {}  # empty while built: constant() reads initializers
        self.quantized = {node.output[0]: node for node in self.nodes
                          if quantized.is_quantized_constant(node, self.initializers, self.producer, self.constant)}

    def uses(self, name: str) -> list[Use]:
        return self.consumers.get(name, [])

    def is_const(self, name: str) -> bool:
        return name in self.initializers or name in self.quantized

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a quantized constant (read-only), or None for a computed tensor
        or an absent input."""
        if name in self.quantized:
            q, scale, zero_point, axis = self.quantization(name)
            return quantized.dequantize(q, scale, zero_point, axis)
        if not name or name not in self.initializers:
            return None
        if name in self.updates:
            return self.updates[name]
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        source = self.sources.get(name)
        array = tensor_to_array(source if source is not None else self.initializers[name])
        if array.size <= _CACHE_LIMIT:
            self._cache[name] = array
        return array

    def quantization(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
        """(q, scale, zero point, axis or None per tensor) of the quantized constant ``name``."""
        node = self.quantized[name]
        quantizer = self.fake_quantizer(name)
        scale = self.constant(node.input[1])
        zero_point = self.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if quantizer is None:
            q = self.constant(node.input[0])
            return (q, *quantized.parameters(node, q, scale, zero_point))
        value = self.constant(quantizer.input[0])
        scale, zero_point, axis = quantized.parameters(node, value, scale, zero_point)
        return quantized.quantize(value, scale, zero_point, axis), scale, zero_point, axis

    def fake_quantizer(self, name: str) -> onnx.NodeProto | None:
        """The QuantizeLinear of the fake-quantized constant ``name`` (see :func:`quantized.fake_quantizer`)."""
        node = self.quantized.get(name)
        return None if node is None else quantized.fake_quantizer(node, self.initializers, self.producer, self.constant)

    def shape(self, name: str) -> Shape | None:
        if name in self.quantized:
            quantizer = self.fake_quantizer(name)
            return self.shape((quantizer or self.quantized[name]).input[0])
        if name in self.updates:
            return self.updates[name].shape
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        return self.shapes.get(name)

    def same_shape(self, a: str, b: str) -> bool:
        """True when tensors ``a`` and ``b`` surely have one shape at run time: every dim is the same
        number, or an unknown dim that shape inference gave the same symbol (the dynamic batch)."""
        shape_a, shape_b = self.shape(a), self.shape(b)
        if shape_a is None or shape_b is None or len(shape_a) != len(shape_b):
            return False
        symbols_a, symbols_b = self.symbols.get(a, ()), self.symbols.get(b, ())
        for axis, (dim_a, dim_b) in enumerate(zip(shape_a, shape_b)):
            if dim_a is None or dim_b is None:
                symbol = symbols_a[axis] if axis < len(symbols_a) else None
                if dim_a is not None or dim_b is not None or symbol is None:
                    return False
                if symbol != (symbols_b[axis] if axis < len(symbols_b) else None):
                    return False
            elif dim_a != dim_b:
                return False
        return True

    def update(self, name: str, value: np.ndarray) -> None:
        """Give initializer ``name`` a new value (written into the proto by :meth:`flush_updates`)."""
        self.updates[name] = value
        self._cache.pop(name, None)

    def flush_updates(self) -> None:
        """Write every pending new value into its TensorProto, one at a time."""
        for name in list(self.updates):
            value = self.updates.pop(name)
            if name in self.initializers:
                store_array(self.initializers[name], value)
            self.sources.pop(name, None)
        self._cache.clear()

    def node_name(self, node: onnx.NodeProto) -> str:
        return node.name or (node.output[0] if node.output else node.op_type)

    def fresh_name(self, base: str) -> str:
        taken = self.initializers.keys() | self.producer.keys() | {i.name for i in self.graph.input}
        if base not in taken:
            return base
        index = 1
        while f"{base}__{index}" in taken:
            index += 1
        return f"{base}__{index}"


class WeightStore:
    """Writes new values for node inputs that are initializers, splitting shared initializers on demand."""

    def __init__(self, index: Graph):
        self.index = index
        self._renamed: dict[tuple[str, object], str] = {}

    def read(self, node: onnx.NodeProto, slot: int) -> np.ndarray | None:
        return self.index.constant(node.input[slot]) if slot < len(node.input) else None

    def write(self, node: onnx.NodeProto, slot: int, value: np.ndarray, key: object = None) -> None:
        """Give ``node.input[slot]`` the value ``value``.

        ``key`` identifies a pure slicing of the original (e.g. the kept indices): readers that apply the
        same slicing to the same initializer share one new tensor instead of one copy each.
        """
        index = self.index
        name = node.input[slot]
        if name in index.quantized:
            self._write_quantized(node, slot, value, key)
            return
        tensor = index.initializers[name]
        readers = index.uses(name)
        cache_key = (name, key) if key is not None else None
        new_name = self._renamed.get(cache_key) if cache_key is not None else None
        # the last reader of a split initializer joins the copy its twins made (never a second copy)
        exclusive = len(readers) == 1 and name not in index.outputs and new_name is None
        if exclusive:
            index.update(name, value)
            return
        if new_name is None:
            new_name = index.fresh_name(name)
            new_tensor = index.graph.initializer.add()
            new_tensor.name = new_name
            new_tensor.data_type = tensor.data_type
            index.initializers[new_name] = new_tensor
            index.update(new_name, value)
            if cache_key is not None:
                self._renamed[cache_key] = new_name
        node.input[slot] = new_name
        index.consumers[name] = [u for u in readers if not (u.node is node and u.slot == slot)]
        index.consumers.setdefault(new_name, []).append(Use(node, slot))

    def _write_quantized(self, node: onnx.NodeProto, slot: int, value: np.ndarray, key: object) -> None:
        """A quantized constant read by this node alone takes a selection of its entries as new int8 data,
        scales and zero points (see :mod:`onnxslim.graph.quantized`); any other value, or a quantized
        constant that several nodes read, is given to this node dequantized (exact, as float)."""
        index = self.index
        name = node.input[slot]
        dequantizer = index.quantized[name]
        q, scale, zero_point, axis = index.quantization(name)
        found = quantized.requantize(np.asarray(value), q.dtype, scale, zero_point, axis)
        if found is None or len(index.uses(name)) != 1 or name in index.outputs:
            cache_key = (name, "float", key) if key is not None else None
            new_name = self._renamed.get(cache_key) if cache_key is not None else None
            if new_name is None:
                new_name = self.add(f"{name}_float", np.asarray(value, scale.dtype))
                if cache_key is not None:
                    self._renamed[cache_key] = new_name
            node.input[slot] = new_name
            index.consumers[name] = [u for u in index.uses(name) if not (u.node is node and u.slot == slot)]
            index.consumers.setdefault(new_name, []).append(Use(node, slot))
            return
        new_q, new_scale, new_zero_point = found
        sub_key = None if key is None else ("requantized", key)
        quantizer = index.fake_quantizer(name)
        if quantizer is None:
            self.write(dequantizer, 0, new_q, key=sub_key)
        else:  # the float input takes the selected values, which quantize back to new_q
            values = quantized.dequantize(new_q, new_scale, new_zero_point, axis)
            self.write(quantizer, 0, values.astype(index.constant(quantizer.input[0]).dtype), key=sub_key)
        if axis is not None:  # per-axis parameters follow the selected channels
            for reader in (quantizer, dequantizer) if quantizer is not None else (dequantizer,):
                self.write(reader, 1, new_scale.astype(scale.dtype), key=sub_key)
                if len(reader.input) > 2 and reader.input[2]:
                    self.write(reader, 2, new_zero_point.astype(zero_point.dtype), key=sub_key)

    def add(self, base: str, value: np.ndarray) -> str:
        """A new initializer (e.g. a bias that did not exist); returns its name."""
        name = self.index.fresh_name(base)
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.index.graph.initializer.append(tensor)
        self.index.initializers[name] = self.index.graph.initializer[-1]
        return name


def serialized_size(model: onnx.ModelProto) -> int:
    """The size of ``model`` serialised, without serialising it (upb's ByteSize() does serialise, which
    costs a copy of the weights). Exact for the usual raw-data tensors up to a few bytes of headers."""
    structure = onnx.ModelProto()
    _copy_fields(model, structure, skip={"graph"})
    _copy_fields(model.graph, structure.graph, skip={"initializer"})
    total = structure.ByteSize()
    for tensor in model.graph.initializer:
        count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
        dtype = _NP_DTYPE.get(tensor.data_type)
        data = count * (np.dtype(dtype).itemsize if dtype is not None else 4)
        header = len(tensor.name) + 2 * len(tensor.dims) * 5 + 16
        total += data + header
    return total


def detach_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A working copy of ``model`` whose large initializers are placeholders (name, type, dims only).

    Returns the copy and ``sources``: placeholder name -> the input's tensor that holds the data. The
    input model is only read.
    """
    working = onnx.ModelProto()
    _copy_fields(model, working, skip={"graph"})
    _copy_fields(model.graph, working.graph, skip={"initializer"})
    sources: dict[str, onnx.TensorProto] = {}
    for tensor in model.graph.initializer:
        target = working.graph.initializer.add()
        size = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
        if size <= _CACHE_LIMIT or tensor.data_location == onnx.TensorProto.EXTERNAL:
            target.CopyFrom(tensor)
            continue
        target.name, target.data_type = tensor.name, tensor.data_type
        target.dims.extend(tensor.dims)
        sources[tensor.name] = tensor
    return working, sources


def attach_weights(model: onnx.ModelProto, sources: dict[str, onnx.TensorProto]) -> None:
    """Fill the placeholders still in ``model`` with their data (after dead weights were dropped)."""
    for tensor in model.graph.initializer:
        source = sources.get(tensor.name)
        if source is not None:
            tensor.CopyFrom(source)


def _copy_fields(source, target, skip: set[str]) -> None:
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def opset_version(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise OnnxSlimError("model has no default-domain opset import")


def get_attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for index, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[index]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _subgraphs(attr: onnx.AttributeProto) -> Iterator[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        yield attr.g
    elif attr.type == onnx.AttributeProto.GRAPHS:
        yield from attr.graphs


def _outer_reads(body: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads without defining them (its implicit inputs), recursively."""
    defined = {i.name for i in body.input} | {t.name for t in body.initializer}
    reads: set[str] = set()
    for node in body.node:
        reads.update(n for n in node.input if n and n not in defined)
        for attr in node.attribute:
            for inner in _subgraphs(attr):
                reads.update(n for n in _outer_reads(inner) if n not in defined)
        defined.update(node.output)
    return reads


def iter_nodes_with_subgraphs(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for body in _subgraphs(attr):
                yield from iter_nodes_with_subgraphs(body)
