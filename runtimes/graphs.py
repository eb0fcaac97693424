"""A decoder graph in onnxruntime: opened (:func:`open_session`), checked against its manifest
entry (:func:`check_graph`), and the kernel facts the session's exactness depends on
(:func:`attention_boundaries`, :func:`matmul_row_multiple`); a draft's reduced-vocabulary ids."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgellm.errors import BundleError
from edgellm.runtimes.providers import ProviderChoice

if TYPE_CHECKING:
    from edgellm.runtimes.session import KVLayout


def open_session(model_path: Path, provider: ProviderChoice, threads: int | None, profile_prefix: str | None = None):
    """An ``InferenceSession`` on ``provider`` with explicit threads; returns it and its load seconds.

    Its workers spin while a pass runs and sleep as soon as it returns
    (``session.force_spinning_stop``): a pass is ~200 short kernels, and workers woken for each
    one cost a plain step ~15 %; the draft and target sessions alternate on the same cores, and
    an idle session's workers never spin against the busy one's (spinning between passes did
    that: a speculative round ~40 % slower). ``benchmarks/thread_pools.py`` measures this policy
    against no spinning and against onnxruntime's process-wide pool.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if profile_prefix:
        so.enable_profiling, so.profile_file_prefix = True, profile_prefix
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    t0 = time.perf_counter()
    try:
        if provider.devices:  # a plugin EP: its devices go into the session options
            so.add_provider_for_devices(list(provider.devices), provider.device_options)
            session = ort.InferenceSession(str(model_path), so)
        else:
            session = ort.InferenceSession(str(model_path), so, providers=provider.providers,
                                           provider_options=provider.options)
    except (RuntimeError, ValueError, OSError) as e:  # onnxruntime's Fail / InvalidGraph / NoSuchFile
        raise BundleError(f"{model_path}: onnxruntime cannot load this graph ({type(e).__name__}: "
                          f"{str(e)[:300]})") from None
    return session, time.perf_counter() - t0


_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}


def read_token_ids(path: Path, vocab_size: int) -> np.ndarray:
    """The token ids of a draft's logits columns (little-endian int32, ascending, unique) -> int64 ``(n,)``.

    Raises:
        BundleError: the file is not such a list of ids below ``vocab_size``.
    """
    raw = Path(path).read_bytes()
    ids = np.frombuffer(raw[: len(raw) // 4 * 4], "<i4").astype(np.int64)
    if len(raw) % 4 or not len(ids) or ids[0] < 0 or ids[-1] >= vocab_size or (np.diff(ids) <= 0).any():
        raise BundleError(f"{path}: expected ascending unique int32 token ids in [0, {vocab_size}); "
                          "the file is damaged or from another export")
    return ids


def expand_logits(logits: np.ndarray, token_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Logits over a vocabulary subset as logits over the whole vocabulary, ``-inf`` elsewhere.

    Args:
        logits: float32 ``(n, len(token_ids))``; column j is token ``token_ids[j]``.
        token_ids: int64 ``(k,)``.

    Returns:
        float32 ``(n, vocab_size)``: softmax gives the other tokens probability zero, argmax never picks them.
    """
    full = np.full((logits.shape[0], vocab_size), -np.inf, np.float32)
    full[:, token_ids] = logits
    return full


def check_graph(session, layout: KVLayout, cache_length: int, path: Path,
                fixed: dict[str, list[int]] | None = None, logits_width: int | None = None) -> None:
    """Refuse a graph whose inputs and outputs disagree with the manifest, before any buffer is made.

    Checks the cache inputs (one key and one value per layer, no more; their kv heads, length and
    head size; their dtype), the logits width and, for static graphs, the ``fixed`` last
    dimensions of other inputs (``{"cos": [head_dim // 2], ...}``).

    Raises:
        BundleError: naming the graph, the input and both values.
    """
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    io, problems = layout.io, []
    for key, name in io.items():
        if not isinstance(name, str):
            continue
        names = [name % i for i in range(layout.num_layers)] if "%d" in name else [name]
        absent = [n for n in names if n not in inputs and n not in outputs]
        if absent:
            problems.append(f"io.{key}={name!r}, but the graph has no {absent[0]!r}")
    if problems:  # names first: the checks below read them
        raise BundleError(f"{path}: the graph does not match the manifest: " + "; ".join(problems))
    for kind in ("past_key", "past_value"):
        names = [io[kind] % i for i in range(layout.num_layers)]
        missing = [n for n in names if n not in inputs]
        if missing or io[kind] % layout.num_layers in inputs:
            problems.append(f"num_layers={layout.num_layers} but the graph's {io[kind]} inputs do not number that")
            continue
        for n in names:
            want = [layout.num_kv_heads, cache_length, layout.head_dim]
            got = inputs[n].shape[1:]
            if len(got) != 3 or any(isinstance(g, int) and g != w for g, w in zip(got, want)):
                problems.append(f"{n} has shape {inputs[n].shape}, the manifest implies [batch, {', '.join(map(str, want))}]")
                break
            if inputs[n].type != _ORT_TYPES.get(layout.dtype):
                problems.append(f"{n} is {inputs[n].type}, the manifest says {layout.dtype}")
                break
    lora_inputs = {n for n in inputs if n.startswith("lora.")}
    wanted = {f"lora.{t}.{k}" for t in (layout.lora or {}).get("sites", {}) for k in "ab"}
    if lora_inputs != wanted:
        extra, absent = sorted(lora_inputs - wanted), sorted(wanted - lora_inputs)
        problems.append(f"LoRA inputs: the graph has {extra[:2]} the manifest does not name" if extra else
                        f"the manifest names LoRA input {absent[0]!r}, the graph has none")
    logits = outputs.get(io["logits"])
    if logits is None:
        problems.append(f"no output {io['logits']!r}")
    elif isinstance(logits.shape[-1], int) and logits.shape[-1] != (logits_width or layout.vocab_size):
        problems.append(f"logits are {logits.shape[-1]} wide, the manifest says "
                        + (f"draft_vocab.size={logits_width}" if logits_width else f"vocab_size={layout.vocab_size}"))
    for name, tail in (fixed or {}).items():
        shape = inputs[name].shape if name in inputs else None
        if shape is None or [d for d in shape[-len(tail):]] != tail:
            problems.append(f"input {name} has shape {shape}, the manifest implies [..., {', '.join(map(str, tail))}]")
    if problems:
        raise BundleError(f"{path}: the graph does not match the manifest: " + "; ".join(problems)
                          + " (the manifest was edited, or the bundle mixes files of two exports)")


def attention_boundaries(head_dim: int, provider: ProviderChoice | None = None) -> tuple[int, ...]:
    """Cache lengths across which onnxruntime's CPU attention sums ``q . k`` in another order.

    GroupQueryAttention on the CPU computes a pass's scores as one SGEMM of the pass's rows by
    all its keys, and MLAS's SGEMM sums the ``head_dim`` products in slices of ``StrideK``: 128,
    doubled (with ``StrideN`` halved from 128, down to 16) while the key count ``N <= StrideN / 2``.
    Up to ``head_dim`` 128 one slice always covers the head: a row's scores do not depend on the
    pass. Beyond (Gemma's 256), a row attended in a pass of at most 64 keys is summed in one slice
    and in a longer pass in two, so its last bits differ (bit-identical passes are what keeps
    speculative output equal to target output). The returned lengths are where the slicing
    changes; the session never lets one pass hold rows on both sides of one (tested).

    Args:
        head_dim: width of one attention head.
        provider: the session's provider; other providers have other kernels (none returned).
    """
    if provider is not None and provider.name != "cpu":
        return ()
    bounds, stride_n, stride_k = [], 128, 128
    while stride_k < head_dim and stride_n > 16:
        stride_n, stride_k = stride_n // 2, stride_k * 2
        bounds.append(stride_n)
    return tuple(sorted(bounds))


def matmul_row_multiple(quantization: dict) -> int:
    """Rows a target pass is padded to a multiple of, for its ``MatMulNBits`` kernels' sake.

    onnxruntime's int8-activation kernel (accuracy level 4) computes rows in pairs when blocks hold
    64 or more weights, and the odd row of a pass with another kernel, whose last bits differ (at
    block 32 every row count agrees; tested in ``tests/export/test_families.py``). With an even
    number of rows in every pass, each row gets the pair kernel whatever pass it is in.
    """
    block = quantization.get("block_size") or 0
    return 2 if block >= 64 and quantization.get("accuracy_level", 4) == 4 else 1
