"""Batched target passes: several sequences in flight, one onnxruntime call verifies all their proposals."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import edgellm
from edgellm.bundle import read_manifest
from edgellm.runtimes.batched import BatchedGraph, Part, PassGate, run_each
from helpers import MIXED_REQUESTS, run_concurrently

REQUESTS = MIXED_REQUESTS


@pytest.fixture(scope="module")
def solo(tiny_bundle):
    llm = edgellm.load(tiny_bundle, threads=1)
    return [llm.generate(p, **kw).token_ids for p, kw in REQUESTS]


def test_the_export_writes_a_batch_graph(tiny_bundle):
    t = read_manifest(tiny_bundle).target
    assert t.batch_graph == "target/batch.onnx" and t.batch_slots == 4
    assert (tiny_bundle / t.batch_graph).stat().st_size < (tiny_bundle / t.graph).stat().st_size * 4  # nodes only


def test_every_sequence_gets_its_solo_output_in_batched_passes(tiny_bundle, solo):
    """Six requests on three slots: each joins when a slot frees, mid-way through the others."""
    llm = edgellm.load(tiny_bundle, threads=1, max_batch=3)
    assert isinstance(llm.gate.runner.__self__, BatchedGraph)
    assert llm.slots[0].target.session.session is None  # one copy of the weights: the batch graph's
    assert run_concurrently(llm, REQUESTS) == solo
    assert llm.gate.parts_run > llm.gate.passes  # passes really held several sequences


def test_a_lone_pass_through_the_batch_graph_equals_the_target_graph(tiny_bundle):
    """Prefill, one step, a verify pass and a rollback: the batch graph's rows equal the target's
    bit for bit (idle slots take part with a row of their own and change nothing)."""
    alone = edgellm.load(tiny_bundle, threads=1).target
    batched = edgellm.load(tiny_bundle, threads=1, max_batch=2).target
    ids = np.arange(5, 40)
    got = [[m.forward(ids[:20], 3), m.forward(ids[20:21], 1), m.forward(ids[21:26], 5)] for m in (alone, batched)]
    for x, y in zip(*got):
        np.testing.assert_array_equal(x, y)
    alone.rollback(22), batched.rollback(22)
    np.testing.assert_array_equal(alone.forward(ids[22:], 2), batched.forward(ids[22:], 2))
    np.testing.assert_array_equal(alone.session.cache_array(1, "value"), batched.session.cache_array(1, "value"))


def test_more_sequences_than_the_graph_holds_run_in_several_calls(tiny_bundle, solo, tmp_path):
    """add_batch_graph rewrites an existing bundle's batch graph (here for 2 slots); 4 sequences
    in flight then take two calls a pass, and still each gets its solo output."""
    from edgellm.export import add_batch_graph

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    add_batch_graph(copy, slots=2)
    assert read_manifest(copy).target.batch_slots == 2
    llm = edgellm.load(copy, threads=1, max_batch=4)
    assert run_concurrently(llm, REQUESTS) == solo


def test_without_a_batch_graph_the_passes_take_turns(tiny_bundle, solo):
    """What a bundle without a batch graph gets (an older export, a generic graph): the same gate,
    each pass run alone by its own session."""
    llm = edgellm.load(tiny_bundle, threads=1)
    llm.slots += [llm._fork_slot() for _ in range(2)]
    llm.gate = PassGate(run_each)
    for slot in llm.slots:
        slot.target.session.gate = llm.gate
    assert run_concurrently(llm, REQUESTS) == solo
    assert llm.gate.parts_run > llm.gate.passes


def test_an_error_in_a_pass_reaches_every_sequence_in_it():
    class Boom(Exception):
        pass

    def runner(parts):
        raise Boom("bad pass")

    gate = PassGate(runner)
    with pytest.raises(Boom):
        gate.submit(object(), np.zeros(2, np.int64), 1)
    assert gate.passes == 1


def test_parts_with_different_adapters_go_in_separate_calls():
    calls = []

    class Graph(BatchedGraph):
        def __init__(self):
            self.slots = 4

        def _run(self, parts):
            calls.append([p.session.adapter for p in parts])

    class S:
        def __init__(self, adapter):
            self.adapter = adapter

    Graph().run([Part(S(a), np.zeros(2, np.int64), 1) for a in (None, "x", None, "y", "x")])
    assert calls == [[None, None], ["x", "x"], ["y"]]  # grouped in order of first appearance


def test_the_gate_runs_a_pass_when_every_member_waits():
    """Three generations of 3, 1 and 2 passes: the first pass holds all three, the second the two
    left, the third the last one alone; none waits for a member that has left."""
    import threading

    sizes = []

    def runner(parts):
        sizes.append(len(parts))
        for p in parts:
            p.logits = p.token_ids * 10

    gate = PassGate(runner)
    start = threading.Barrier(3)
    got = {}

    def member(name, passes):
        with gate.member():
            start.wait()
            got[name] = [int(gate.submit(name, np.array([k]), 1).logits[0]) for k in range(passes)]

    threads = [threading.Thread(target=member, args=a) for a in (("a", 3), ("b", 1), ("c", 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert got == {"a": [0, 10, 20], "b": [0], "c": [0, 10]}
    assert sizes == [3, 2, 1]


def test_a_batch_graph_that_disagrees_with_the_manifest_is_refused(tiny_bundle, tmp_path):
    import json

    from edgellm.errors import BundleError
    from edgellm.export.adapters import write_manifest

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    doc = json.loads((copy / "manifest.json").read_text())
    doc["models"]["target"]["batch_slots"] = 5  # the graph holds 4
    write_manifest(copy, doc, [])
    with pytest.raises(BundleError, match=r"batch.onnx: the batch graph does not match the manifest \(no 'slot4.rows'\)"):
        edgellm.load(copy, threads=1, max_batch=2)
    assert edgellm.load(copy, threads=1).generate("hi", max_new_tokens=4).token_ids  # one slot: the target graph
