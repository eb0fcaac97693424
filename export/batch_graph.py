"""The target's batch graph: one pass over the rows of several sequences, each with its own cache.

onnxruntime's CPU GroupQueryAttention takes one sequence when a pass has more than one new token
and a past (``batch_size must be 1``), which is every verify pass. The batch graph is the target
graph rewritten so that everything but attention sees the rows of ``slots`` sequences as one
longer pass (its linear layers compute each row alike in any pass of two or more rows), while
each layer's attention runs once per slot, on that slot's rows and that slot's cache:

* per slot ``j``: ``slot{j}.rows`` (int64 ``(S_j,)``, which rows of the pass are its own),
  ``slot{j}.seqlens_k`` and ``slot{j}.total_sequence_length`` (as in the target graph), and its
  cache as ``slot{j}.<past name>`` / ``slot{j}.<present name>``, bound in place like the target's;
* ``logit_rows`` (int64 ``(n,)``): the rows whose logits the pass returns, instead of ``num_logits``.

Each layer's attention gathers every slot's query/key/value rows, runs one GroupQueryAttention
node per slot (the target's own node, attributes and rotary caches), and concatenates the
outputs in slot order. A slot with nothing to do this pass is given one row (row 0) and a scratch
cache; its output rows come last and are cut off. So a slot's attention is exactly its solo
pass's, and the graph reads the same weights file as the target graph (no second copy).
"""

from __future__ import annotations

from pathlib import Path

from edgellm.errors import ExportError
from edgellm.runtimes.batched import LOGIT_ROWS, slot_name

#: GroupQueryAttention's inputs: query, key, value, past_key, past_value, seqlens_k, total_sequence_length, ...
_Q, _K, _V, _PAST_K, _PAST_V, _SEQLENS, _TOTAL = range(7)


def batch_reason(model, io: dict) -> str | None:
    """Why ``model`` (an ``onnx.ModelProto`` of a target graph) cannot be rewritten, or ``None``."""
    g = model.graph
    uses = {name: [n for n in g.node if name in n.input] for name in (io["seqlens_k"], io["total_sequence_length"])}
    other = [n.op_type for ns in uses.values() for n in ns if n.op_type != "GroupQueryAttention"]
    if other:  # e.g. longrope picks its rotary tables by length: one length per pass
        return f"its sequence lengths also feed {sorted(set(other))} nodes, which would need one length per sequence"
    if not any(n.op_type == "GroupQueryAttention" for n in g.node):
        return "it has no GroupQueryAttention nodes"
    if any(len([i for i in n.input[9:] if i]) for n in g.node if n.op_type == "GroupQueryAttention"):
        return "its attention takes position ids or a bias"
    if _logits_slice(g, io["num_logits"]) is None:
        return "its num_logits input is not the usual Neg -> Slice on the sequence axis"
    return None


def _logits_slice(g, num_logits: str):
    """The ``Neg(num_logits)`` node and the Slice of the last rows it starts, or ``None``."""
    import onnx

    users = [n for n in g.node if num_logits in n.input]
    if len(users) != 1 or users[0].op_type != "Neg":
        return None
    neg = users[0]
    slices = [n for n in g.node if neg.output[0] in n.input]
    if len(slices) != 1 or slices[0].op_type != "Slice" or list(slices[0].input[1:2]) != [neg.output[0]]:
        return None
    axes = {i.name: i for i in g.initializer}.get(slices[0].input[3] if len(slices[0].input) > 3 else "")
    if axes is None or list(onnx.numpy_helper.to_array(axes)) not in ([1], [-2]):
        return None
    return neg, slices[0]


def write_batch_graph(graph: Path, out: Path, io: dict, slots: int) -> str | None:
    """Write the batch graph of ``graph`` (a target graph whose weights stay in its data file) to ``out``.

    Args:
        graph: the target's ``model.onnx`` (its external data file is read by ``out`` too, so
            ``out`` must be in the same folder).
        out: where to write the batch graph (a few hundred kB: nodes only).
        io: the target's manifest ``io`` names.
        slots: sequences one pass holds (2 or more).

    Returns:
        ``None`` when written; otherwise why this graph cannot be batched (nothing written).
    """
    import onnx

    if slots < 2:
        raise ExportError(f"batch slots={slots}; allowed: 2 or more")
    if graph.parent.resolve() != out.parent.resolve():
        raise ExportError(f"{out}: the batch graph must sit beside {graph.name}, whose weights file it reads")
    model = onnx.load(str(graph), load_external_data=False)
    reason = batch_reason(model, io)
    if reason is not None:
        return reason
    _rewrite(model.graph, io, slots)
    out.unlink(missing_ok=True)  # a new file: never write through a hard link to another bundle's
    onnx.save(model, str(out))
    return None


def _rewrite(g, io: dict, slots: int) -> None:
    """The rewrite described in the module docstring, in place on the ``onnx.GraphProto`` ``g``."""
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    seqlens, total, num_logits = io["seqlens_k"], io["total_sequence_length"], io["num_logits"]
    inputs = {i.name: i for i in g.input}
    outputs = {o.name: o for o in g.output}
    neg, logits_slice = _logits_slice(g, num_logits)
    cache_in = {n.input[k] for n in g.node if n.op_type == "GroupQueryAttention" for k in (_PAST_K, _PAST_V)}
    cache_out = {n.output[k] for n in g.node if n.op_type == "GroupQueryAttention" for k in (1, 2)}

    g.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "batch/zero"),
                          numpy_helper.from_array(np.array([1], np.int64), "batch/axis1")])
    head = [helper.make_node("Shape", [io["input_ids"]], ["batch/rows"], start=1, end=2)]  # (1,) = T
    nodes = []
    for n in g.node:
        if n is neg:
            continue
        if n is logits_slice:  # the rows asked for, not the last num_logits
            nodes.append(helper.make_node("Gather", [n.input[0], LOGIT_ROWS], [n.output[0]], axis=1,
                                          name=f"{n.name or n.output[0]}/batch"))
        elif n.op_type == "GroupQueryAttention":
            nodes.extend(_split_attention(n, slots, seqlens, total))
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(head + nodes)

    new_inputs = [i for i in g.input if i.name not in cache_in | {seqlens, total, num_logits}]
    for j in range(slots):
        new_inputs.append(helper.make_tensor_value_info(slot_name(j, "rows"), TensorProto.INT64, [f"rows_{j}"]))
        new_inputs.append(_renamed(inputs[seqlens], slot_name(j, seqlens)))
        new_inputs.append(_renamed(inputs[total], slot_name(j, total)))
        new_inputs.extend(_renamed(inputs[name], slot_name(j, name)) for name in sorted(cache_in))
    new_inputs.append(helper.make_tensor_value_info(LOGIT_ROWS, TensorProto.INT64, ["logit_rows"]))
    new_outputs = [o for o in g.output if o.name not in cache_out]
    new_outputs += [_renamed(outputs[name], slot_name(j, name)) for j in range(slots) for name in sorted(cache_out)]
    del g.input[:]
    g.input.extend(new_inputs)
    del g.output[:]
    g.output.extend(new_outputs)
    used = {i for n in g.node for i in n.input}
    unused = [i for i in g.initializer if i.name not in used]  # the Slice's bounds
    for i in unused:
        g.initializer.remove(i)
    kept = [v for v in g.value_info if v.name not in cache_out]
    del g.value_info[:]
    g.value_info.extend(kept)


def _split_attention(n, slots: int, seqlens: str, total: str) -> list:
    """One GroupQueryAttention node ``n`` as one node per slot over that slot's rows and cache;
    their outputs concatenated in slot order, cut to the pass's rows (idle slots' rows come last)."""
    from onnx import helper

    out, nodes, parts = n.output[0], [], []
    name = n.name or out  # node names must be unique; exported nodes may have none
    for j in range(slots):
        rows = slot_name(j, "rows")
        qkv = []
        for x in n.input[:3]:
            if x:
                nodes.append(helper.make_node("Gather", [x, rows], [f"{x}/slot{j}"], axis=1, name=f"{name}/{x}/slot{j}"))
            qkv.append(f"{x}/slot{j}" if x else "")
        ins = qkv + [slot_name(j, n.input[_PAST_K]), slot_name(j, n.input[_PAST_V]),
                     slot_name(j, seqlens), slot_name(j, total)] + list(n.input[_TOTAL + 1:])
        outs = [f"{out}/slot{j}", slot_name(j, n.output[1]), slot_name(j, n.output[2])]
        gqa = helper.make_node("GroupQueryAttention", ins, outs, name=f"{name}/slot{j}", domain=n.domain)
        gqa.attribute.extend(n.attribute)
        nodes.append(gqa)
        parts.append(outs[0])
    nodes.append(helper.make_node("Concat", parts, [f"{out}/slots"], axis=1, name=f"{name}/concat"))
    nodes.append(helper.make_node("Slice", [f"{out}/slots", "batch/zero", "batch/rows", "batch/axis1"], [out],
                                  name=f"{name}/cut"))
    return nodes


def _renamed(value_info, name: str):
    v = type(value_info)()
    v.CopyFrom(value_info)
    v.name = name
    return v
