"""TensorFlow.js graph models (``model.json`` + weight shards) to ONNX, through tf2onnx's tfjs reader.

Two fix-ups are applied on the way, both inside this converter only:

* graph models written by older tfjs-converters lack the ``TArgs`` attribute of ``_FusedConv2D``, which
  newer TensorFlow declares (the other fused ops type their extra arguments by ``num_args`` alone);
  TensorFlow's shape inference, which tf2onnx runs per node, rejects such a NodeDef. ``TArgs`` is the
  dtype list of the fused extra arguments (bias, PReLU alpha, ...), all of the op's own ``T``, so it is
  rebuilt from ``num_args``.
* some graph models (human-models' ``mobilefacenet``) had a ``Relu`` fused into a depthwise
  convolution whose pre-activation output is also read by the negative branch of a PReLU
  (``relu(x) + alpha * (x - |x|) / 2``). After that fusion ``Abs`` and ``Sub`` see ``relu(x)``, the
  negative branch is always zero, and the embedding barely depends on the face. The ``Relu`` is split
  out again so that only the PReLU's positive branch reads it.
* tf2onnx 1.17 calls ``np.product``, which numpy 2 removed (an alias of ``np.prod``).
"""

from __future__ import annotations

import base64
import gc
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from uncnn_rt.converters import onnx_source
from uncnn_rt.runtime.errors import InputError, ModelError

OPS_NEEDING_TARGS = ("_FusedConv2D",)


def import_tf2onnx() -> ModuleType:
    """Import tf2onnx (and so tensorflow) lazily, with the numpy-2 shims it still needs."""
    import numpy as np

    if not hasattr(np, "product"):
        # setattr, not attribute assignment: linters' numpy-2 autofix would rewrite the alias away.
        setattr(np, "product", np.prod)  # noqa: B010
    try:
        import tf2onnx
        import tf2onnx.constants
        import tf2onnx.convert
        import tf2onnx.tf_loader
        import tf2onnx.tfjs_utils
    except ImportError as exc:
        raise ModelError(
            f"converting TensorFlow models needs the [convert] extra (tensorflow, tf2onnx): {exc}"
        ) from exc
    return tf2onnx


@contextmanager
def collect_between_passes(tf2onnx: ModuleType) -> Iterator[None]:
    """Run Python's cycle collector after each of tf2onnx's optimizer passes, while inside.

    Each pass rebuilds node protos and leaves the old graph objects in reference cycles, weights
    included, which the collector would free only much later: converting Keras' InceptionV3 (95 MB
    of weights) peaked at 5.5 GB this way, 2.5 GB once collected.
    """
    from tf2onnx.optimizer import optimizer_base

    base = optimizer_base.GraphOptimizerBase
    original = base.optimize

    def optimize(self: Any, graph: Any, iteration: int) -> Any:
        result = original(self, graph, iteration)
        gc.collect()
        return result

    # Objects that exist before the conversion (TensorFlow's and Keras' own, millions of them) are moved
    # out of the collector's sight, so that each collection scans only what the conversion made.
    gc.freeze()
    base.optimize = optimize
    try:
        yield
    finally:
        base.optimize = original
        gc.unfreeze()
        gc.collect()


def run_tf2onnx(tf2onnx: ModuleType, frozen_graph: Any, **kwargs: Any) -> onnx.ModelProto:
    """tf2onnx's common conversion step, with errors raised rather than skipped.

    tf2onnx's public entry points set ``continue_on_error`` (unconvertible ops stay in the graph) and
    deep-copy the whole graph before each optimizer pass so that a failing pass can be skipped; that
    copy is most of the conversion time for models with large weights. Here optimizers run in place;
    only if that fails is the conversion repeated the careful way, skipping failing passes.
    """
    import os

    key = tf2onnx.constants.ENV_TF2ONNX_CATCH_ERRORS
    previous = os.environ.get(key)
    os.environ[key] = "FALSE"
    try:
        with collect_between_passes(tf2onnx):
            try:
                proto, _ = tf2onnx.convert._convert_common(frozen_graph, **kwargs)
            except Exception:
                # tf2onnx 1.17 compares the variable's name, not its value, with "TRUE" (convert.py:197),
                # so any value turns catching off; only an unset variable gives the careful default.
                os.environ.pop(key, None)
                proto, _ = tf2onnx.convert._convert_common(frozen_graph, **kwargs)
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous
    return proto


def fill_fused_targs(topology: dict[str, Any]) -> int:
    """Add the missing ``TArgs`` of fused convolutions in a tfjs ``modelTopology``; return how many."""
    fixed = 0
    node_lists = [topology.get("node", [])]
    node_lists += [f.get("nodeDef", []) for f in topology.get("library", {}).get("function", [])]
    for nodes in node_lists:
        for node in nodes:
            attr = node.get("attr", {})
            if node.get("op") not in OPS_NEEDING_TARGS or "TArgs" in attr:
                continue
            dtype = attr.get("T", {}).get("type", "DT_FLOAT")
            num_args = int(attr.get("num_args", {}).get("i", "0"))
            attr["TArgs"] = {"list": {"type": [dtype] * num_args}}
            node["attr"] = attr
            fixed += 1
    return fixed


def unfuse_shared_relu(topology: dict[str, Any]) -> int:
    """Undo a ``Relu`` fused into a conv whose raw output an ``Abs`` also reads (a PReLU); return how many.

    ``Abs`` of a ReLU output is the identity, so an ``Abs`` consumer shows that the pre-activation value
    was meant. The fused op keeps only ``BiasAdd``; a new ``Relu`` node feeds the consumers other than
    the PReLU's negative branch (``Abs(x)`` and ``Sub(x, Abs(x))``).
    """
    nodes = topology.get("node", [])
    consumers: dict[str, list[dict[str, Any]]] = {}
    for node in nodes:
        for inp in node.get("input", []):
            consumers.setdefault(inp.split(":")[0], []).append(node)
    relu = base64.b64encode(b"Relu").decode()
    fixed = 0
    extra: list[dict[str, Any]] = []
    for node in nodes:
        fused = node.get("attr", {}).get("fused_ops", {}).get("list", {}).get("s", [])
        readers = consumers.get(node["name"], [])
        if not fused or fused[-1] != relu or not any(r["op"] == "Abs" for r in readers):
            continue
        abs_names = {r["name"] for r in readers if r["op"] == "Abs"}
        split_name = node["name"] + "/unfused_relu"
        for reader in readers:
            negative_branch = reader["op"] == "Abs" or (
                reader["op"] == "Sub" and any(i.split(":")[0] in abs_names for i in reader["input"])
            )
            if not negative_branch:
                reader["input"] = [split_name if i == node["name"] else i for i in reader["input"]]
        node["attr"]["fused_ops"]["list"]["s"] = fused[:-1]
        dtype = node["attr"].get("T", {"type": "DT_FLOAT"})
        extra.append({"name": split_name, "op": "Relu", "input": [node["name"]], "attr": {"T": dtype}})
        fixed += 1
    # tf2onnx reads nodes in file order and needs producers first: put each Relu right after its conv.
    if extra:
        after = {e["input"][0]: e for e in extra}
        ordered: list[dict[str, Any]] = []
        for node in nodes:
            ordered.append(node)
            if node["name"] in after:
                ordered.append(after[node["name"]])
        topology["node"] = ordered
    return fixed


def read_graph_model(model_json: Path) -> dict[str, Any]:
    """Parse a tfjs ``model.json``; anything but a graph model is an :class:`InputError`."""
    if not model_json.is_file():
        raise InputError(f"{model_json}: no such TF.js model.json")
    try:
        model = json.loads(model_json.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{model_json}: not a TF.js model.json ({exc})") from exc
    if not isinstance(model, dict) or "modelTopology" not in model or "weightsManifest" not in model:
        raise InputError(f"{model_json}: expected a TF.js model.json with modelTopology and weightsManifest")
    topology = model["modelTopology"]
    fmt = model.get("format") or topology.get("format")
    if fmt == "layers-model" or "keras_version" in topology:
        raise InputError(
            f"{model_json}: this is a TF.js layers model; expected a graph model "
            "(convert it with tensorflowjs_converter --output_format tfjs_graph_model)"
        )
    return model


def convert(
    model_json: str | Path,
    *,
    outputs: list[str] | None = None,
    opset: int = onnx_source.TARGET_OPSET,
) -> onnx.ModelProto:
    """Convert a TF.js graph model to a forward ONNX model.

    ``outputs`` selects output tensors by their signature names (e.g. ``["global_pooling/Mean"]``);
    by default all signature outputs are kept. The batch dimension stays dynamic where the tfjs
    model declares it as ``-1``.
    """
    src = Path(model_json)
    model = read_graph_model(src)
    fill_fused_targs(model["modelTopology"])
    unfuse_shared_relu(model["modelTopology"])
    tf2onnx = import_tf2onnx()
    with tempfile.TemporaryDirectory(prefix="uncnn-tfjs-") as tmp:
        patched = Path(tmp) / src.name
        patched.write_text(json.dumps(model), encoding="utf-8")
        for group in model["weightsManifest"]:
            for shard in group["paths"]:
                shard_path = src.parent / shard
                if not shard_path.is_file():
                    raise InputError(f"{src}: weight shard {shard} is missing beside model.json")
                (Path(tmp) / shard).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shard_path, Path(tmp) / shard)
        try:
            proto = run_tf2onnx(
                tf2onnx, None, name=src.stem, opset=opset, tfjs_path=str(patched), output_names=outputs
            )
        except Exception as exc:  # tf2onnx raises ValueError/KeyError/AssertionError from deep inside
            raise ModelError(f"{src}: tf2onnx could not convert this TF.js graph model: {exc}") from exc
    if outputs is not None:
        proto = select_outputs(proto, outputs)
    return onnx_source.make_batch_dynamic(onnx_source.finalize(proto, name=src.stem, opset=opset))


def select_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Keep only the graph outputs named in ``names`` (matching with or without a ``:0`` suffix), in order."""
    by_name = {o.name: o for o in model.graph.output}
    by_name.update({o.name.removesuffix(":0"): o for o in model.graph.output})
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ModelError(
            f"outputs {missing} not found; the model has {sorted(o.name for o in model.graph.output)}"
        )
    keep = [by_name[n] for n in names]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    return prune_unused(model)


def prune_unused(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers that no graph output depends on."""
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(_node_inputs(node))
    kept.reverse()
    del model.graph.node[:]
    model.graph.node.extend(kept)
    inits = [t for t in model.graph.initializer if t.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return model


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    """Every tensor a node reads, including outer-scope names its subgraphs (If, Loop, Scan) capture."""
    names = set(node.input)
    for attr in node.attribute:
        graphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
        for graph in graphs:
            for inner in graph.node:
                names.update(_node_inputs(inner))
    return names


def tf_reference(model_json: str | Path, outputs: list[str]) -> Any:
    """Run a TF.js graph model in TensorFlow itself, as an independent check of the conversion.

    The nodes of ``model.json`` become a TensorFlow GraphDef (weights as ``Const`` nodes, with the same
    ``TArgs`` and ``Relu`` fix-ups as :func:`convert`, but no tf2onnx), executed in a TF1-style session.
    Returns ``run(x) -> list of arrays`` for the named outputs.
    """
    import numpy as np

    src = Path(model_json)
    model = read_graph_model(src)
    fill_fused_targs(model["modelTopology"])
    unfuse_shared_relu(model["modelTopology"])
    tf2onnx = import_tf2onnx()
    import tensorflow as tf
    from google.protobuf.json_format import ParseDict
    from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

    weights: dict[str, Any] = {}
    for group in model["weightsManifest"]:
        data = b"".join((src.parent / shard).read_bytes() for shard in group["paths"])
        offset = 0
        for spec in group["weights"]:
            name, array, size = tf2onnx.tfjs_utils.read_tfjs_weight(spec, data, offset)
            weights[name] = array
            offset += size
    graph_def = graph_pb2.GraphDef()
    placeholder = None
    for node in model["modelTopology"]["node"]:
        if node["op"] == "Const":
            dtype = tf.as_dtype(getattr(types_pb2, node["attr"]["dtype"]["type"]))
            const = node_def_pb2.NodeDef(name=node["name"], op="Const")
            const.attr["dtype"].type = dtype.as_datatype_enum
            const.attr["value"].tensor.CopyFrom(
                tf.make_tensor_proto(np.asarray(weights[node["name"]], dtype.as_numpy_dtype))
            )
            graph_def.node.append(const)
            continue
        node = json.loads(json.dumps(node))
        tf2onnx.tfjs_utils.fix_string_attr(node)
        if node["op"] == "FusedDepthwiseConv2dNative":  # tfjs's name for TensorFlow's fused depthwise op
            node["op"] = "_FusedDepthwiseConv2dNative"
            node["attr"].pop("explicit_paddings", None)
        if node["op"] == "Placeholder":
            placeholder = node["name"]
        graph_def.node.append(ParseDict(node, node_def_pb2.NodeDef()))
    if placeholder is None:
        raise ModelError(f"{src}: graph model has no Placeholder input")
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(graph_def, name="")
    fetches = [name if ":" in name else name + ":0" for name in outputs]

    def run(x: Any) -> list[Any]:
        with tf.compat.v1.Session(graph=graph) as sess:
            return list(sess.run(fetches, {placeholder + ":0": x}))

    return run
