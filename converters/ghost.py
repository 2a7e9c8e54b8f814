"""Ghost attack graphs: a face model with random feature-map dropout, for model augmentation at attack time.

Usage::

    python -m uncnn_rt.converters.ghost OUT_DIR [--models NAME ...] [--rate P] [--every K]

An attack on one fixed surrogate fits that surrogate's quirks; thinning its feature maps afresh at
every step makes one model act as many (DFANet, Zhong & Deng, "Towards Transferable Adversarial
Attack against Deep Face Recognition", 2020; Li et al.'s ghost networks, 2020). The ghost of an attack
graph is the same graph with every ``every``-th activation map (Relu, PRelu, Clip, LeakyRelu outputs of
``[N, C, H, W]``) multiplied by a keep mask of rate ``1 - P``, scaled by ``1 / (1 - P)``, and its gradient
built again by :mod:`uncnn_rt.converters.grad`. The graph keeps the contract's inputs, outputs and
metadata and stays plain ONNX.

The masks are drawn inside the graph from the image itself: each image's mean (quantised by a
``Floor``, through which no gradient flows) seeds a hash of the channel, row and column. So the same
image always gets the same masks (a cloak stays deterministic for its seed) while each step of an
attack, whose image differs, sees another thinned model; and the gradient is exact for the masks drawn
(the mask is a constant of the step). A victim uses its ghost for gradients only: every check and the
verdict come from the plain graph (:class:`uncnn_rt.runtime.attacks.Victim`, ``ghost``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from uncnn_rt.converters.grad.driver import differentiate
from uncnn_rt.runtime import contract as C
from uncnn_rt.runtime.errors import InputError, ModelError

ACTIVATIONS = frozenset({"Relu", "PRelu", "Clip", "LeakyRelu"})
GRAD_PREFIX = "grad/"
"""Names of the nodes :func:`~uncnn_rt.converters.grad.driver.differentiate` adds."""
SEED_QUANTUM = 16.0
"""The image mean is quantised to 1/SEED_QUANTUM grey levels before it seeds the masks: coarse
enough that float32 rounding of the mean (about 1e-3 levels) seldom moves it, fine enough that the
steps of an attack, which move a crop's mean by tenths of a level, draw new masks."""


def forward_part(model: onnx.ModelProto) -> onnx.ModelProto:
    """An attack graph without its gradient: inputs ``image`` and ``reference``, outputs ``features`` and
    ``objective``, only the initializers those use."""
    g = model.graph
    nodes = [n for n in g.node if not n.name.startswith(GRAD_PREFIX)]
    used = {i for n in nodes for i in n.input}
    outputs = [o for o in g.output if o.name in (C.OUTPUT_FEATURES, C.OUTPUT_OBJECTIVE)]
    if len(outputs) != 2:
        raise ModelError(f"{g.name}: not an attack graph (outputs {[o.name for o in g.output]})")
    forward = helper.make_model(
        helper.make_graph(
            nodes, g.name, list(g.input), outputs, [i for i in g.initializer if i.name in used]
        ),
        opset_imports=list(model.opset_import),
    )
    forward.ir_version = model.ir_version
    return forward


def _map_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    inferred = shape_inference.infer_shapes(model)
    return {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in inferred.graph.value_info
    }


def ghost_graph(model: onnx.ModelProto, *, rate: float = 0.05, every: int = 3) -> tuple[onnx.ModelProto, int]:
    """The ghost of attack graph ``model`` and the number of activation maps it thins.

    Raises:
        InputError: ``rate`` outside ``[0, 0.5]`` or ``every`` < 1.
        ModelError: ``model`` is not an attack graph, or it has no activation map to thin.
    """
    if not 0.0 <= rate <= 0.5:
        raise InputError(f"the dropout rate must be in [0, 0.5], got {rate}")
    if every < 1:
        raise InputError(f"every must be >= 1, got {every}")
    forward = forward_part(model)
    shapes = _map_shapes(forward)
    g = forward.graph
    inits: list[TensorProto] = []

    def const(name: str, value: np.ndarray | float) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    # Each image's seed, [N, 1, 1, 1]: its mean quantised (Floor passes no gradient), spread by a sine.
    seed_nodes = [
        helper.make_node("ReduceMean", [C.INPUT_IMAGE], ["ghost/mean"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Mul", ["ghost/mean", const("ghost/quantum", SEED_QUANTUM)], ["ghost/scaled"]),
        helper.make_node("Floor", ["ghost/scaled"], ["ghost/level"]),
        helper.make_node("Sin", ["ghost/level"], ["ghost/sine"]),
        helper.make_node("Mul", ["ghost/sine", const("ghost/spread", 1000.0)], ["ghost/seed"]),
    ]
    body: list[onnx.NodeProto] = []
    maps = thinned = 0
    rng = np.random.default_rng(0)  # the hash's fixed coefficients: part of the graph, not of a run
    for node in g.node:
        body.append(node)
        if node.op_type not in ACTIVATIONS:
            continue
        out = node.output[0]
        shape = shapes.get(out)
        if shape is None or len(shape) != 4 or any(d is None for d in shape[1:]):
            continue
        maps += 1
        if maps % every:
            continue
        c, h, w = (int(d) for d in shape[1:] if d is not None)
        k = f"ghost/{thinned}"
        thinned += 1
        plain = f"{out}/plain"
        node.output[0] = plain
        # u = frac(sin(a_c + b_h + d_w + seed * t) * 43758.5453), about uniform on [0, 1).
        body += [
            helper.make_node("Mul", ["ghost/seed", const(f"{k}/t", 0.5 + rng.uniform())], [f"{k}/s"]),
            helper.make_node(
                "Add",
                [
                    const(f"{k}/a", rng.uniform(0, 100, (1, c, 1, 1))),
                    const(f"{k}/b", rng.uniform(0, 100, (1, 1, h, 1))),
                ],
                [f"{k}/ab"],
            ),
            helper.make_node(
                "Add", [f"{k}/ab", const(f"{k}/d", rng.uniform(0, 100, (1, 1, 1, w)))], [f"{k}/abd"]
            ),
            helper.make_node("Add", [f"{k}/abd", f"{k}/s"], [f"{k}/x"]),
            helper.make_node("Sin", [f"{k}/x"], [f"{k}/sin"]),
            helper.make_node("Mul", [f"{k}/sin", const(f"{k}/big", 43758.5453)], [f"{k}/y"]),
            helper.make_node("Floor", [f"{k}/y"], [f"{k}/floor"]),
            helper.make_node("Sub", [f"{k}/y", f"{k}/floor"], [f"{k}/u"]),
            helper.make_node("GreaterOrEqual", [f"{k}/u", const(f"{k}/rate", rate)], [f"{k}/keep"]),
            helper.make_node("Cast", [f"{k}/keep"], [f"{k}/kept"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{k}/kept", const(f"{k}/scale", 1.0 / (1.0 - rate))], [f"{k}/mask"]),
            helper.make_node("Mul", [plain, f"{k}/mask"], [out]),
        ]
    if thinned == 0:
        raise ModelError(f"{g.name}: no [N, C, H, W] activation map to thin")
    del g.node[:]
    g.node.extend(seed_nodes + body)
    g.initializer.extend(inits)
    ghost = differentiate(forward, wrt=C.INPUT_IMAGE, objective=C.OUTPUT_OBJECTIVE, grad_name=C.OUTPUT_GRAD)
    by_name = {o.name: o for o in ghost.graph.output}
    ordered = [by_name[C.OUTPUT_FEATURES], by_name[C.OUTPUT_OBJECTIVE], by_name[C.OUTPUT_GRAD]]
    del ghost.graph.output[:]
    ghost.graph.output.extend(ordered)
    ghost.metadata_props.extend(model.metadata_props)
    ghost.producer_name, ghost.producer_version = model.producer_name, model.producer_version
    onnx.checker.check_model(ghost, full_check=True)
    return ghost, thinned


def main(argv: Sequence[str] | None = None) -> int:
    from uncnn_rt.runtime import catalog

    parser = argparse.ArgumentParser(
        prog="python -m uncnn_rt.converters.ghost",
        description="Write ghost attack graphs (feature-map dropout) of shipped face recognizers.",
    )
    parser.add_argument("out", type=Path, help="folder for NAME.onnx (created)")
    parser.add_argument(
        "--models", nargs="*", default=None, help="shipped names (default: the default ensemble)"
    )
    parser.add_argument("--rate", type=float, default=0.05, help="dropout rate of each thinned map")
    parser.add_argument("--every", type=int, default=3, help="thin every K-th activation map")
    args = parser.parse_args(argv)
    entries = {e.name: e for e in catalog.load_manifest() if e.kind == "face"}
    names = args.models if args.models is not None else catalog.default_recognizer_names()
    unknown = [n for n in names if n not in entries]
    if unknown:
        print(f"error: not a shipped face recognizer: {', '.join(unknown)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        ghost, thinned = ghost_graph(onnx.load(str(entries[name].path)), rate=args.rate, every=args.every)
        onnx.save(ghost, str(args.out / f"{name}.onnx"))
        print(f"{name}: {thinned} activation maps thinned at rate {args.rate:g} -> {args.out / name}.onnx")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
