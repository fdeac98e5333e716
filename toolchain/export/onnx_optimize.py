"""Offline graph fusions for the exported decoder that onnxruntime does not do by itself.

At decode time (one token per call) the exported graph is dominated by per-node overhead:
SmolLM2's graph has ~2,245 nodes, and onnxruntime's own optimizer (ORT_ENABLE_ALL) leaves
~2,094 of them. Its SimplifiedLayerNormFusion does not match the exporter's RMSNorm
(Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul -> Mul), so each of the 61 norms
costs 7 kernels. `fuse_rms_norm` rewrites each into one `SimplifiedLayerNormalization`
(onnxruntime's RMSNorm kernel, registered in the default ONNX domain, fp32 math inside).

Only exact patterns are rewritten; anything else is left alone, so the fusion can never
change what the graph computes beyond float rounding (verify_onnx checks that).
"""

from __future__ import annotations

import numpy as np


def _const(inits: dict, name: str):
    from onnx import numpy_helper

    return numpy_helper.to_array(inits[name]) if name in inits else None


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def fuse_rms_norm(model) -> int:
    """Rewrite x * 1/sqrt(mean(x^2) + eps) * w into SimplifiedLayerNormalization; returns the count."""
    from onnx import helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in graph.output}

    def only(name: str, op: str):
        """The single consumer of `name` if it is an `op` node (and `name` is internal)."""
        users = consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op or name in graph_outputs:
            return None
        return users[0]

    remove, add = [], []
    for pow_node in list(graph.node):
        if pow_node.op_type != "Pow":
            continue
        exp = _const(inits, pow_node.input[1])
        if exp is None or exp.size != 1 or float(exp.reshape(-1)[0]) != 2.0:
            continue
        x = pow_node.input[0]
        mean = only(pow_node.output[0], "ReduceMean")
        if mean is None or _attr(mean, "keepdims", 1) != 1:
            continue
        axes = _const(inits, mean.input[1]) if len(mean.input) > 1 else np.array(_attr(mean, "axes", []))
        if axes is None or axes.reshape(-1).tolist() != [-1]:
            continue
        add_eps = only(mean.output[0], "Add")
        if add_eps is None:
            continue
        eps = _const(inits, add_eps.input[1] if add_eps.input[0] == mean.output[0] else add_eps.input[0])
        if eps is None or eps.size != 1:
            continue
        sqrt = only(add_eps.output[0], "Sqrt")
        recip = sqrt and only(sqrt.output[0], "Reciprocal")
        scale = recip and only(recip.output[0], "Mul")
        if scale is None or set(scale.input) != {x, recip.output[0]}:
            continue
        mul_w = only(scale.output[0], "Mul")
        if mul_w is None:
            continue
        w = mul_w.input[0] if mul_w.input[1] == scale.output[0] else mul_w.input[1]
        if w not in inits or len(inits[w].dims) != 1:
            continue
        # x must feed nothing else inside the pattern except Pow and the scale Mul (it may feed
        # other nodes outside, e.g. the residual Add; those keep reading x)
        fused = helper.make_node(
            "SimplifiedLayerNormalization",
            [x, w],
            [mul_w.output[0]],
            name=f"{mul_w.name}_rmsnorm",
            axis=-1,
            epsilon=float(eps.reshape(-1)[0]),
            stash_type=1,
        )
        remove += [pow_node, mean, add_eps, sqrt, recip, scale, mul_w]
        add.append((mul_w, fused))
    if not add:
        return 0
    # keep topological order: put each fused node where its last node was
    position = {id(n): i for i, n in enumerate(graph.node)}
    replacement = {id(last): fused for last, fused in add}
    dropped = {id(n) for n in remove}
    new_nodes = []
    for n in sorted(graph.node, key=lambda n: position[id(n)]):
        if id(n) in replacement:
            new_nodes.append(replacement[id(n)])
        elif id(n) not in dropped:
            new_nodes.append(n)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return len(add)


def drop_unused_initializers(model) -> int:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    unused = [i for i in model.graph.initializer if i.name not in used]
    for i in unused:
        model.graph.initializer.remove(i)
    return len(unused)


def optimize_graph(model) -> dict:
    """Apply every fusion in place; returns {fusion: count} for the export record."""
    counts = {"rms_norm": fuse_rms_norm(model)}
    drop_unused_initializers(model)  # the fused patterns' constants (exponent 2, eps)
    return counts
