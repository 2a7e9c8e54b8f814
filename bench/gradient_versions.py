"""One attack graph's gradient built three ways, for before/after timings in one run.

* ``REV``: the autodiff of another git revision (``git archive`` of its ``src``, ``runtime`` and
  ``converters`` into a temporary package, run in a subprocess), e.g. the commit before a refactor;
* this tree, as shipped: the rules' plain math and then the layout pass (``converters/grad/ort_layout.py``);
* this tree without the layout pass (``differentiate(..., ort_layout=False)``).

Each is differentiated from the same forward part of the attack graph (``image``, ``reference`` ->
``features``, ``objective``, cut out with ``onnx.utils.Extractor``), so the three differ in their
gradient nodes only. :func:`same_graph` says whether two graphs compute the same thing node for node
(tensor names and node order aside), so "the same graph as REV" rules out a timing difference by
construction, and the timings measure the noise.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnx.utils
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
INPUTS, OUTPUTS = ["image", "reference"], ["features", "objective"]

_DIFFERENTIATE = """
import sys
from pathlib import Path
import onnx
sys.path.insert(0, sys.argv[1])  # the revision's package, ahead of this tree's editable install
from uncnn_rt.converters.grad import differentiate
for path in sys.argv[2:]:
    model = differentiate(onnx.load(path), wrt="image", objective="objective", grad_name="grad")
    onnx.save(model, path)
"""


def forward_part(attack: onnx.ModelProto) -> onnx.ModelProto:
    """``image``, ``reference`` -> ``features``, ``objective`` of an attack graph."""
    return onnx.utils.Extractor(attack).extract_model(INPUTS, OUTPUTS)


def finish_like(model: onnx.ModelProto, attack: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with ``attack``'s output order (features, objective, grad), name and metadata."""
    by_name = {o.name: o for o in model.graph.output}
    ordered = [by_name[o.name] for o in attack.graph.output]
    del model.graph.output[:]
    model.graph.output.extend(ordered)
    model.graph.name = attack.graph.name
    del model.metadata_props[:]
    model.metadata_props.extend(attack.metadata_props)
    return model


def this_tree(attack: onnx.ModelProto, *, ort_layout: bool) -> onnx.ModelProto:
    """The gradient of ``attack``'s forward part, built by this tree's autodiff."""
    from uncnn_rt.converters.grad import differentiate

    model = differentiate(
        forward_part(attack), wrt="image", objective="objective", grad_name="grad", ort_layout=ort_layout
    )
    return finish_like(model, attack)


def at_revision(rev: str, attacks: list[onnx.ModelProto]) -> list[onnx.ModelProto]:
    """The gradients of ``attacks``' forward parts, built by the autodiff of git revision ``rev``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src", "runtime", "converters"],
        capture_output=True,
        check=True,
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        tree, package = Path(tmp) / "tree", Path(tmp) / "package"
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
        package.mkdir()
        (tree / "src" / "uncnn_rt").rename(package / "uncnn_rt")
        for sub in ("runtime", "converters"):
            (tree / sub).rename(package / "uncnn_rt" / sub)
        paths = []
        for i, attack in enumerate(attacks):
            paths.append(str(Path(tmp) / f"{i}.onnx"))
            onnx.save(forward_part(attack), paths[-1])
        subprocess.run([sys.executable, "-c", _DIFFERENTIATE, str(package), *paths], check=True)
        return [finish_like(onnx.load(p), a) for p, a in zip(paths, attacks, strict=True)]


def revision_name(rev: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def _signature(model: onnx.ModelProto) -> tuple[Counter[str], list[str]]:
    """Each node hashed with its op, attributes and the hashes of its inputs (initializers by value):
    equal multisets and outputs mean the same computation, names and order aside."""
    g = model.graph
    digest: dict[str, str] = {"": "absent"}
    for init in g.initializer:
        value = numpy_helper.to_array(init)
        digest[init.name] = hashlib.sha1(f"{value.dtype}{value.shape}".encode() + value.tobytes()).hexdigest()
    for vi in g.input:
        digest.setdefault(vi.name, "input:" + vi.name)
    nodes: Counter[str] = Counter()
    for node in g.node:
        attrs = sorted(a.SerializeToString().hex() for a in node.attribute)
        key = hashlib.sha1(repr((node.op_type, node.domain, attrs, [digest[i] for i in node.input])).encode())
        nodes[key.hexdigest()] += 1
        for k, out in enumerate(node.output):
            if out:
                digest[out] = f"{key.hexdigest()}:{k}"
    return nodes, [digest[o.name] for o in g.output]


def same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Whether ``a`` and ``b`` compute the same outputs with the same nodes."""
    return _signature(a) == _signature(b)
