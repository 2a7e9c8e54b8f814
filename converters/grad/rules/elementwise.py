"""Element-wise ops: arithmetic with broadcasting, and pointwise activations.

Each rule states the local derivative next to the forward definition. ``dy`` is the gradient of
the objective with respect to the node's output ``y``.
"""

from __future__ import annotations

import math

import onnx

from uncnn_rt.converters.grad.registry import GradContext, UnsupportedOpError, attributes, grad_rule

Grads = list[str | None]


def _binary(ctx: GradContext, node: onnx.NodeProto, da: str | None, db: str | None) -> Grads:
    """Un-broadcast each input's gradient to that input's shape; skip inputs that need none."""
    a, b = node.input[0], node.input[1]
    y = node.output[0]
    return [
        ctx.unbroadcast(da, like=y, to=a, node=node) if da is not None and ctx.needs_grad(a) else None,
        ctx.unbroadcast(db, like=y, to=b, node=node) if db is not None and ctx.needs_grad(b) else None,
    ]


@grad_rule("Add")
def add(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = a + b: dy/da = dy/db = 1
    return _binary(ctx, node, dys[0], dys[0])


@grad_rule("Sum")
def sum_(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = x_1 + ... + x_k: dy/dx_i = 1
    y, dy = node.output[0], _dy(dys)
    return [ctx.unbroadcast(dy, like=y, to=x, node=node) if ctx.needs_grad(x) else None for x in node.input]


@grad_rule("Sub")
def sub(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = a - b: dy/da = 1, dy/db = -1
    dy = _dy(dys)
    db = ctx.emit("Neg", [dy]) if ctx.needs_grad(node.input[1]) else None
    return _binary(ctx, node, dy, db)


@grad_rule("Mul")
def mul(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = a * b: dy/da = b, dy/db = a
    dy = _dy(dys)
    a, b = node.input
    da = ctx.emit("Mul", [dy, b]) if ctx.needs_grad(a) else None
    db = ctx.emit("Mul", [dy, a]) if ctx.needs_grad(b) else None
    return _binary(ctx, node, da, db)


@grad_rule("Div")
def div(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = a / b: dy/da = 1/b, dy/db = -y/b
    dy = _dy(dys)
    a, b = node.input
    y = node.output[0]
    da = ctx.emit("Div", [dy, b]) if ctx.needs_grad(a) else None
    db = None
    if ctx.needs_grad(b):
        db = ctx.emit("Neg", [ctx.emit("Div", [ctx.emit("Mul", [dy, y]), b])])
    return _binary(ctx, node, da, db)


@grad_rule("Neg")
def neg(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    return [ctx.emit("Neg", [_dy(dys)])]


@grad_rule("Abs")
def abs_(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # d|x|/dx = sign(x) (0 at 0, the subgradient torch and TF use)
    return [ctx.emit("Mul", [_dy(dys), ctx.emit("Sign", [node.input[0]])])]


@grad_rule("Sqrt")
def sqrt(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = sqrt(x): dy/dx = 1 / (2 y)
    y = node.output[0]
    two_y = ctx.emit("Mul", [y, ctx.const(2.0, like=y)])
    return [ctx.emit("Div", [_dy(dys), two_y])]


@grad_rule("Reciprocal")
def reciprocal(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = 1/x: dy/dx = -y^2
    y = node.output[0]
    return [ctx.emit("Neg", [ctx.emit("Mul", [_dy(dys), ctx.emit("Mul", [y, y])])])]


@grad_rule("Pow")
def pow_(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = x^p with constant p: dy/dx = p x^(p-1)
    x, p_name = node.input
    if ctx.needs_grad(p_name):
        raise UnsupportedOpError(
            node, "the exponent depends on the input; only constant exponents are supported"
        )
    p = ctx.require_value(p_name, node, "exponent")
    if p.size != 1:
        raise UnsupportedOpError(node, f"only scalar exponents are supported, got shape {p.shape}")
    exponent = float(p.reshape(()))
    if exponent == 1.0:
        return [_dy(dys), None]
    if exponent == 2.0:
        local = ctx.emit("Mul", [x, ctx.const(2.0, like=x)])
    else:
        local = ctx.emit(
            "Mul", [ctx.emit("Pow", [x, ctx.const(exponent - 1.0, like=x)]), ctx.const(exponent, like=x)]
        )
    return [ctx.emit("Mul", [_dy(dys), local]), None]


@grad_rule("Exp")
def exp(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = e^x: dy/dx = y
    return [ctx.emit("Mul", [_dy(dys), node.output[0]])]


@grad_rule("Log")
def log(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = ln x: dy/dx = 1/x
    return [ctx.emit("Div", [_dy(dys), node.input[0]])]


@grad_rule("Erf")
def erf(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = erf(x): dy/dx = 2/sqrt(pi) * exp(-x^2)
    x = node.input[0]
    neg_sq = ctx.emit("Neg", [ctx.emit("Mul", [x, x])])
    local = ctx.emit("Mul", [ctx.emit("Exp", [neg_sq]), ctx.const(2.0 / math.sqrt(math.pi), like=x)])
    return [ctx.emit("Mul", [_dy(dys), local])]


@grad_rule("Sigmoid")
def sigmoid(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = 1/(1+e^-x): dy/dx = y (1 - y)
    y = node.output[0]
    one_minus = ctx.emit("Sub", [ctx.const(1.0, like=y), y])
    return [ctx.emit("Mul", [_dy(dys), ctx.emit("Mul", [y, one_minus])])]


@grad_rule("Tanh")
def tanh(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = tanh x: dy/dx = 1 - y^2
    y = node.output[0]
    local = ctx.emit("Sub", [ctx.const(1.0, like=y), ctx.emit("Mul", [y, y])])
    return [ctx.emit("Mul", [_dy(dys), local])]


@grad_rule("Relu")
def relu(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = max(x, 0): dy/dx = [x > 0] = [y > 0]. Reading y leaves x to the Relu alone (a Conv can fuse it).
    mask = ctx.step(node.output[0], 0.0, above=True)
    return [ctx.emit("Mul", [_dy(dys), mask])]


@grad_rule("LeakyRelu")
def leaky_relu(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = x if x > 0 else alpha x: dy/dx = alpha + (1 - alpha) [x > 0]
    x = node.input[0]
    alpha = float(attributes(node).get("alpha", 0.01))
    mask = ctx.emit("Cast", [ctx.emit("Greater", [x, ctx.const(0.0, like=x)])], to=ctx.elem_type(x))
    local = ctx.emit(
        "Add", [ctx.emit("Mul", [mask, ctx.const(1.0 - alpha, like=x)]), ctx.const(alpha, like=x)]
    )
    return [ctx.emit("Mul", [_dy(dys), local])]


@grad_rule("HardSigmoid")
def hard_sigmoid(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = clip(alpha x + beta, 0, 1): dy/dx = alpha [0 < alpha x + beta < 1]
    x = node.input[0]
    attrs = attributes(node)
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    return [ctx.emit("Mul", [_dy(dys), _hard_window(ctx, x, alpha, beta, alpha)])]


@grad_rule("HardSwish")
def hard_swish(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = x clip(x/6 + 1/2, 0, 1): dy/dx = [x > 3] + [-3 < x < 3] (2x + 3) / 6
    x = node.input[0]
    inside = _hard_window(ctx, x, 1.0 / 6.0, 0.5, 1.0)
    slope = ctx.emit("Add", [ctx.emit("Mul", [x, ctx.const(1.0 / 3.0, like=x)]), ctx.const(0.5, like=x)])
    above = ctx.emit("Cast", [ctx.emit("Greater", [x, ctx.const(3.0, like=x)])], to=ctx.elem_type(x))
    local = ctx.emit("Add", [ctx.emit("Mul", [inside, slope]), above])
    return [ctx.emit("Mul", [_dy(dys), local])]


def _hard_window(ctx: GradContext, x: str, alpha: float, beta: float, scale: float) -> str:
    """``scale * [0 < alpha x + beta < 1]`` as a float tensor shaped like ``x``."""
    z = ctx.emit("Add", [ctx.emit("Mul", [x, ctx.const(alpha, like=x)]), ctx.const(beta, like=x)])
    inside = ctx.emit(
        "And",
        [ctx.emit("Greater", [z, ctx.const(0.0, like=x)]), ctx.emit("Less", [z, ctx.const(1.0, like=x)])],
    )
    mask = ctx.emit("Cast", [inside], to=ctx.elem_type(x))
    return mask if scale == 1.0 else ctx.emit("Mul", [mask, ctx.const(scale, like=x)])


@grad_rule("PRelu")
def prelu(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = x if x > 0 else slope x (slope broadcast, a weight: no gradient for it)
    x, slope = node.input
    if ctx.needs_grad(slope):
        raise UnsupportedOpError(node, "the slope depends on the input; only constant slopes are supported")
    # local = slope + [x > 0] (1 - slope), with 1 - slope folded at build time (Mul beats Where in ORT)
    one_minus = 1.0 - ctx.require_value(slope, node, "slope")
    mask = ctx.step(x, 0.0, above=True)
    local = ctx.emit("Add", [ctx.emit("Mul", [mask, ctx.const(one_minus, like=x)]), slope])
    return [ctx.emit("Mul", [_dy(dys), local]), None]


@grad_rule("Clip")
def clip(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = min(max(x, lo), hi): dy/dx = [lo < x < hi] (strict, as torch's hardtanh does at the bounds)
    x = node.input[0]
    bounds = [n if i < len(node.input) and n else "" for i, n in enumerate(node.input[1:3])]
    for name in bounds:
        if name and ctx.needs_grad(name):
            raise UnsupportedOpError(
                node, "clip bounds depend on the input; only constant bounds are supported"
            )
    # Read y, not x: for lo < hi, y > lo iff x > lo and y < hi iff x < hi, and x then feeds only the Clip,
    # which onnxruntime fuses into the Conv before it (and lo >= hi makes y = hi, both masks 0).
    y = node.output[0]
    present = [(name, above) for name, above in zip(bounds, (True, False), strict=False) if name]
    if not present:
        return [_dy(dys)]
    compares = [ctx.emit("Greater" if above else "Less", [y, name]) for name, above in present]
    inside = compares[0] if len(compares) == 1 else ctx.emit("And", compares)
    # Mul by a cast mask: several times faster than Where in onnxruntime.
    return [ctx.emit("Mul", [_dy(dys), ctx.emit("Cast", [inside], to=ctx.elem_type(x))]), None, None]


@grad_rule("Min", "Max")
def min_max(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = max(a, b, ...): the gradient flows to the input equal to y (ties: to the first one)
    y = node.output[0]
    dy = _dy(dys)
    wanted = [ctx.needs_grad(name) for name in node.input]
    if len(node.input) == 2 and sum(wanted) == 1:
        # One differentiable input against a constant (Relu6 is Min(Max(x, 0), 6)): a comparison mask,
        # the ties still going to the first input. 3 ops instead of 6, and Mul by a cast mask is several
        # times faster than Where in onnxruntime.
        first = wanted[0]
        x, c = node.input if first else node.input[::-1]
        if node.op_type == "Max":
            mask = ctx.emit("GreaterOrEqual" if first else "Greater", [x, c])
        else:
            mask = ctx.emit("LessOrEqual" if first else "Less", [x, c])
        grad = ctx.unbroadcast(
            ctx.emit("Mul", [dy, ctx.emit("Cast", [mask], to=ctx.elem_type(y))]), like=y, to=x, node=node
        )
        return [grad, None] if first else [None, grad]
    zero = ctx.const(0.0, like=y)
    taken: str | None = None
    grads: Grads = []
    for name in node.input:
        hit = ctx.emit("Equal", [name, y])
        if taken is not None:
            hit = ctx.emit("And", [hit, ctx.emit("Not", [taken])])
        taken = hit if taken is None else ctx.emit("Or", [taken, hit])
        if ctx.needs_grad(name):
            grads.append(ctx.unbroadcast(ctx.emit("Where", [hit, dy, zero]), like=y, to=name, node=node))
        else:
            grads.append(None)
    return grads


def _dy(dys: Grads) -> str:
    dy = dys[0]
    if dy is None:
        raise RuntimeError("driver called a rule with no gradient for its output")
    return dy
