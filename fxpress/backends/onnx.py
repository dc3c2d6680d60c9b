"""Export a compressed model to ONNX: each low-bit layer becomes DequantizeLinear + MatMul / Conv.

torch.onnx's dynamo exporter first writes each fxpress op as a placeholder node of the `fxpress`
domain (the packed words and scales stay initializers); `rewrite_lowbit_nodes` then replaces every
placeholder with standard ONNX: the signed codes as INT2 where they fit [-2, 1] (the file then
declares opset 25), INT4 where they fit [-8, 7] (opset 21), else INT8 (or INT16), a per-output-channel
DequantizeLinear, and the dense op. Float
weights that are exact in fp16 (all that fxpress keeps) are stored as fp16 with a Cast. The report
says what each layer became and how many bytes it takes in the file.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fxpress.backends.targets import as_module, first_tensor
from fxpress.errors import LoweringError
from fxpress.ir.graph import Inputs
from fxpress.kernels.ops import kernels_for, registered_kernels
from fxpress.kernels.packing import unpack_words
from fxpress.output import third_party_warnings_off

DOMAIN = "fxpress"
OPSET = 21      # DequantizeLinear with INT4 codes; the exporter writes this opset
OPSET_INT2 = 25  # DequantizeLinear with INT2 codes: the file is raised to it when a layer uses them
PROTOBUF_LIMIT = 1_800_000_000  # above this, weights go to `<file>.data` beside the .onnx


@dataclass
class OnnxLayer:
    """What one low-bit layer became in the ONNX file."""

    module: str
    kind: str
    width: int
    stored_as: str
    bytes: int


@dataclass
class OnnxReport:
    """The exported file, its size, and each low-bit layer's storage."""

    path: Path
    file_bytes: int
    opset: int
    layers: list[OnnxLayer] = field(default_factory=list)


def _placeholder_ops():
    """onnxscript ops for the two placeholder nodes (they need a schema to be built)."""
    import onnxscript
    from onnx.defs import OpSchema

    opset = onnxscript.values.Opset(DOMAIN, 1)
    param, kind = OpSchema.FormalParameter, OpSchema.AttrType
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]

    def op(name: str, attributes: list[tuple[str, Any]]):
        schema = OpSchema(name, DOMAIN, 1,
                          inputs=[param("x", "T"), param("packed", "tensor(int32)"), param("scale", "S"),
                                  param("bias", "T", param_option=OpSchema.FormalParameterOption.Optional)],
                          outputs=[param("y", "T")], type_constraints=[("T", floats, ""), ("S", floats, "")],
                          attributes=[OpSchema.Attribute(a, t) for a, t in attributes])
        return onnxscript.values.Op(opset, name, schema)

    linear = op("LowBitLinear", [("width", kind.INT), ("offset", kind.INT), ("in_features", kind.INT)])
    conv = op("LowBitConv2d", [("width", kind.INT), ("offset", kind.INT), ("weight_shape", kind.INTS),
                               ("strides", kind.INTS), ("pads", kind.INTS), ("dilations", kind.INTS),
                               ("group", kind.INT)])

    def translate_linear(x, packed, scale, bias, width, offset, in_features):
        return linear(x, packed, scale, bias, width=width, offset=offset, in_features=in_features)

    def translate_conv(x, packed, scale, bias, width, offset, weight_shape, stride, padding, dilation, groups):
        return conv(x, packed, scale, bias, width=width, offset=offset, weight_shape=weight_shape, strides=stride,
                    pads=padding, dilations=dilation, group=groups)

    table = {}
    for name in registered_kernels():  # a lowered model's kernels compute what the reference ops compute
        linear_op, conv_op = kernels_for(name)
        table.update({linear_op.default: translate_linear, conv_op.default: translate_conv})
    return table


def _quantized_initializer(name: str, codes: np.ndarray, int2: bool):
    """Return (TensorProto, type name) holding signed `codes` in the narrowest ONNX integer type."""
    import ml_dtypes
    from onnx import numpy_helper

    low, high = int(codes.min(initial=0)), int(codes.max(initial=0))
    types = [(ml_dtypes.int4, "INT4", -8, 7), (np.int8, "INT8", -128, 127), (np.int16, "INT16", -(2**15), 2**15 - 1)]
    if int2:
        types.insert(0, (ml_dtypes.int2, "INT2", -2, 1))
    for dtype, label, lo, hi in types:
        if lo <= low and high <= hi:
            return numpy_helper.from_array(codes.astype(dtype), name), label
    raise LoweringError(f"initializer {name!r}: codes in [{low}, {high}] fit no ONNX integer type")


def rewrite_lowbit_nodes(model, int2: bool = True) -> list[OnnxLayer]:
    """Replace every fxpress placeholder node of `model` (a ModelProto) by DequantizeLinear + MatMul/Conv.

    With `int2`, codes in [-2, 1] are stored as INT2 and the file's opset is raised to 25.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    dropped: set[str] = set()
    layers: list[OnnxLayer] = []
    nodes = []
    stored: dict[tuple[str, str], tuple[str, int]] = {}  # (packed, scale) -> initializer prefix, axis
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, packed_name, scale_name = node.input[:3]
        bias = node.input[3] if len(node.input) > 3 and node.input[3] else ""
        is_linear = node.op_type == "LowBitLinear"
        prefix, start = f"{node.name}_dq", len(nodes)
        shared = stored.get((packed_name, scale_name))   # a layer called again (an unrolled sampler's steps)
        if shared is None:
            if packed_name not in initializers or scale_name not in initializers:
                raise LoweringError(f"ONNX node {node.name!r}: packed weights or scales are not constants")
            packed = numpy_helper.to_array(initializers[packed_name]).copy()
            scale = numpy_helper.to_array(initializers[scale_name]).astype(np.float32)
            if scale.ndim != 1:
                raise LoweringError(f"ONNX node {node.name!r}: group-wise scales are not exported yet")
            cols = attrs["in_features"] if is_linear else int(np.prod(attrs["weight_shape"][1:]))
            codes = unpack_words(torch.from_numpy(packed), attrs["width"], cols).numpy().astype(np.int32)
            codes -= attrs["offset"]
            if is_linear:
                weight, axis = np.ascontiguousarray(codes.T), 1   # (K, N) for x @ W
            else:
                weight, axis = codes.reshape(attrs["weight_shape"]), 0
            quantized, label = _quantized_initializer(f"{prefix}_codes", weight, int2)
            zero = numpy_helper.from_array(np.zeros(scale.shape, dtype=numpy_helper.to_array(quantized).dtype),
                                           f"{prefix}_zero")
            graph.initializer.extend([quantized, numpy_helper.from_array(scale, f"{prefix}_scale"), zero])
            dropped.update({packed_name, scale_name})
            stored[(packed_name, scale_name)] = shared = (prefix, axis)
            layers.append(OnnxLayer(_module_path(node), "linear" if is_linear else "conv2d", attrs["width"], label,
                                    quantized.ByteSize() + scale.nbytes + zero.ByteSize()))
        source, axis = shared
        nodes.append(helper.make_node("DequantizeLinear", [f"{source}_codes", f"{source}_scale", f"{source}_zero"],
                                      [f"{prefix}_weight"], name=f"{prefix}", axis=axis))
        if is_linear:
            product = node.output[0] if not bias else f"{node.name}_matmul"
            nodes.append(helper.make_node("MatMul", [x, f"{prefix}_weight"], [product], name=f"{node.name}_matmul"))
            if bias:
                nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}_bias"))
        else:
            pads = list(attrs["pads"]) * 2
            nodes.append(helper.make_node("Conv", [x, f"{prefix}_weight", *([bias] if bias else [])],
                                          [node.output[0]], name=f"{node.name}_conv", strides=attrs["strides"],
                                          pads=pads, dilations=attrs["dilations"], group=attrs["group"]))
        scopes = [p for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"]
        for new in nodes[start:]:
            new.metadata_props.extend(scopes)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name not in dropped or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    others = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(others)
    if any(layer.stored_as == "INT2" for layer in layers):
        for entry in model.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = max(entry.version, OPSET_INT2)
        model.ir_version = max(model.ir_version, 11)
    return layers


def store_exact_fp16(model, min_elements: int = 1024) -> int:
    """Store each large float32 initializer whose values are all exact in fp16 as fp16 + a Cast node.

    fxpress rounds the weights it keeps to fp16 values (RoundToStorage), so this halves them in the
    file without changing a bit of the computation. Returns the bytes saved.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph, saved, casts, kept = model.graph, 0, [], []
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT and int(np.prod(tensor.dims)) >= min_elements:
            values = numpy_helper.to_array(tensor)
            half = values.astype(np.float16)
            if np.array_equal(half.astype(np.float32), values):
                kept.append(numpy_helper.from_array(half, f"{tensor.name}_fp16"))
                casts.append(helper.make_node("Cast", [f"{tensor.name}_fp16"], [tensor.name],
                                              name=f"{tensor.name}_cast", to=TensorProto.FLOAT))
                saved += values.nbytes - half.nbytes
                continue
        kept.append(tensor)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return saved


def _all_nodes(graph):
    """Every node of `graph` and of the subgraphs its nodes hold (If, Loop, Scan bodies)."""
    from onnx import AttributeProto

    for node in graph.node:
        yield node
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                yield from _all_nodes(sub)


def share_equal_initializers(model) -> int:
    """Keep one of each set of initializers equal in type, shape and values, and point every use at it.

    The exporter's optimizer folds what it can per use: a weight used in each step of an unrolled sampler
    (transposed for MatMul, say) becomes one folded constant per step. Returns the bytes saved.
    """
    import hashlib

    from onnx import numpy_helper

    graph = model.graph
    outside = {v.name for v in (*graph.input, *graph.output)}
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    kept, saved = [], 0
    for tensor in graph.initializer:
        values = numpy_helper.to_array(tensor)
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(values.tobytes()).hexdigest())
        if key in first and tensor.name not in outside:
            rename[tensor.name] = first[key]
            saved += values.nbytes
            continue
        first.setdefault(key, tensor.name)
        kept.append(tensor)
    if rename:
        for node in _all_nodes(graph):
            for i, name in enumerate(node.input):
                node.input[i] = rename.get(name, name)
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return saved


# the exporter's per-node stack traces, FX text and module class paths (name scopes stay: they name layers)
DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy",
                  "namespace")


NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def _drop_debug_metadata(model, names: bool = False) -> None:
    """Remove the exporter's per-node debug metadata (DEBUG_METADATA: a fifth of a small model's file), and
    with `names` the module path of every node too."""
    dropped = (*DEBUG_METADATA, NAME_SCOPES) if names else DEBUG_METADATA
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key not in dropped]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def _module_path(node) -> str:
    """The module path the exporter recorded for a node (its last name scope above the op), or the node name."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)
            if len(scopes) >= 2:
                return scopes[-2]
    return node.name


def _failed_node(exc: BaseException) -> fx.Node | None:
    """The FX node torch.onnx was translating when `exc` (or an exception it chains to) was raised."""
    seen = 0
    while exc is not None and seen < 16:
        tb = exc.__traceback__
        while tb is not None:
            node = tb.tb_frame.f_locals.get("node")
            if isinstance(node, fx.Node):
                return node
            tb = tb.tb_next
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _export_failure(exc: BaseException) -> str:
    """Return one line saying what torch.onnx could not convert: the op, its node and module path where known."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    op = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>", text)
    node = _failed_node(exc)
    if op is None and node is None:
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
        return f"{type(exc).__name__}: {first[:300]}"
    what = f"ONNX has no translation for op {op.group(1)}.{op.group(2)}" if op else "the conversion failed"
    if node is not None:
        stack = node.meta.get("nn_module_stack") or {}
        path = next((p for p, _ in reversed(list(stack.values())) if p), "<root>")
        what += f" at node {node.name!r} in module {path!r}"
    return what + "; rewrite that op, or keep the module out of the exported model"


def export_onnx(target: Any, example_inputs: Any, path: str | Path, model: Any = None,
                int2: bool = True, node_names: bool = True, fold: bool = False) -> OnnxReport:
    """Export a compressed model (artifact directory, Graph, CompressResult or module) to an ONNX file.

    `int2=False` keeps the file at opset 21 (INT4 at the narrowest), for runtimes without opset 25.
    `node_names=False` leaves out each node's module path (half the graph bytes of an unrolled sampler,
    whose steps repeat one network's nodes). `fold` precomputes what depends on no input
    (`ir.constant_fold`: an unrolled sampler's timestep embeddings).
    `example_inputs` are the forward's inputs (an object with .args/.kwargs, a dict of kwargs, or a
    tuple of args). The file (and `<file>.data` for models over protobuf's 2 GB) appears only once it
    has passed onnx.checker; nothing is left behind on failure.
    """
    import onnx

    module = as_module(target, model)
    inputs = Inputs.of(example_inputs)
    args, kwargs = inputs.args, inputs.kwargs
    if fold:
        from fxpress.ir.constant_fold import fold_module

        try:
            module = fold_module(module.eval(), inputs)[0]
        except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds; all mean "cannot capture"
            raise LoweringError(f"torch.export could not capture {type(module).__name__}: "
                                f"{_export_failure(exc)}") from exc
    was_training = module.training
    module.eval()
    try:
        with third_party_warnings_off():
            program = torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, opset_version=OPSET,
                                        custom_translation_table=_placeholder_ops(), verbose=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; all mean "cannot export"
        raise LoweringError(f"torch.onnx could not export {type(module).__name__}: {_export_failure(exc)}") from exc
    finally:
        module.train(was_training)
    proto = program.model_proto
    layers = rewrite_lowbit_nodes(proto, int2)
    share_equal_initializers(proto)
    store_exact_fp16(proto)
    _drop_debug_metadata(proto, names=not node_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = proto.ByteSize() > PROTOBUF_LIMIT
    data = path.with_name(path.name + ".data")
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        if external:   # weights in a side file; the .onnx stays under protobuf's 2 GB
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
        else:
            onnx.save_model(proto, tmp)
        onnx.checker.check_model(tmp)
        os.replace(tmp, path)
    except Exception:
        if external and data.exists():
            data.unlink()
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    size = path.stat().st_size + (data.stat().st_size if external else 0)
    return OnnxReport(path, size, opset, layers)


ORT_EXACT = {"session.qdq_matmulnbits_accuracy_level": "0"}


def compare_with_onnxruntime(module: nn.Module, example_inputs: Any, path: str | Path) -> dict[str, float]:
    """Run the ONNX file in ONNX Runtime and return its relative error against `module`'s first output.

    Two sessions: 'default' (ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits with int8
    activations) and 'exact' (session.qdq_matmulnbits_accuracy_level=0, full-precision activations).
    """
    import onnxruntime as ort

    inputs = Inputs.of(example_inputs)
    args, kwargs = inputs.args, inputs.kwargs
    with torch.no_grad():
        reference = module(*args, **kwargs)
    reference = first_tensor(reference).float().numpy()
    errors = {}
    for label, config in (("default", {}), ("exact", ORT_EXACT)):
        options = ort.SessionOptions()
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        values = [t.numpy() for t in args] + [kwargs[n].numpy() for n in names[len(args):]]
        out = session.run(None, dict(zip(names, values, strict=True)))[0]
        errors[label] = float(np.linalg.norm(out - reference) / max(np.linalg.norm(reference), 1e-12))
    return errors
