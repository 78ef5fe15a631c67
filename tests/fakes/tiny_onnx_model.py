"""Build a tiny ONNX text-generation model folder that onnxruntime-genai loads, at test time.

No model hub is reachable here, so the tests make their own model: a byte-level BPE tokenizer
(256 byte tokens and one end-of-text token), a chat template, and a one-layer decoder graph with
the inputs and outputs onnxruntime-genai expects of a "llama" decoder (input_ids,
attention_mask, past/present key-value cache, logits).

The weights are chosen rather than random so that answers are predictable: the next token
depends only on the current one, and every chain of tokens runs into the sentence `ANSWER`
followed by end-of-text. Whatever the prompt, the model says "Hey now." and stops, which lets a
test check the streamed text, the token counts and the `num_predict` limit. The key/value cache
is real (it grows by one position per step) so the generation loop works as it does for a real
model.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ANSWER = "Hey now."
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 257  # 256 bytes + end-of-text
EOS_ID = 256
HEADS = 2
HEAD_SIZE = 4
HIDDEN = HEADS * HEAD_SIZE
CONTEXT_LENGTH = 512
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what byte-level BPE vocabularies use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _successors() -> np.ndarray:
    """next_token[t] for every token t: any token leads into ANSWER, whose last byte leads to EOS."""
    answer = list(ANSWER.encode("utf-8"))
    nxt = np.full(VOCAB_SIZE, answer[0], dtype=np.int64)
    for here, there in itertools.pairwise(answer):
        nxt[here] = there
    nxt[answer[-1]] = EOS_ID
    return nxt


def _graph() -> onnx.GraphProto:
    rng = np.random.default_rng(0)
    # logits = onehot(input) @ transition: a clear winner (10) over small noise.
    transition = rng.normal(0, 0.1, (VOCAB_SIZE, VOCAB_SIZE)).astype(np.float32)
    transition[np.arange(VOCAB_SIZE), _successors()] = 10.0
    kv_projection = rng.normal(0, 0.1, (VOCAB_SIZE, HIDDEN)).astype(np.float32)
    initializers = [
        numpy_helper.from_array(transition, "transition"),
        numpy_helper.from_array(kv_projection, "kv_projection"),
        numpy_helper.from_array(np.array([0, 0, HEADS, HEAD_SIZE], dtype=np.int64), "kv_shape"),
    ]
    nodes = [
        helper.make_node("Gather", ["transition", "input_ids"], ["logits"], axis=0),
        helper.make_node("Gather", ["kv_projection", "input_ids"], ["kv_flat"], axis=0),
        helper.make_node("Reshape", ["kv_flat", "kv_shape"], ["kv_heads"]),
        helper.make_node("Transpose", ["kv_heads"], ["kv_new"], perm=[0, 2, 1, 3]),
        helper.make_node("Concat", ["past_key_values.0.key", "kv_new"], ["present.0.key"], axis=2),
        helper.make_node("Concat", ["past_key_values.0.value", "kv_new"], ["present.0.value"], axis=2),
    ]
    kv_in = ["batch", HEADS, "past", HEAD_SIZE]
    kv_out = ["batch", HEADS, "total", HEAD_SIZE]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, kv_in),
        helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, kv_in),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB_SIZE]),
        helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, kv_out),
        helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, kv_out),
    ]
    return helper.make_graph(nodes, "tiny_decoder", inputs, outputs, initializers)


def _genai_config() -> dict[str, object]:
    return {
        "model": {
            "bos_token_id": EOS_ID,
            "context_length": CONTEXT_LENGTH,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": HEAD_SIZE,
                "hidden_size": HIDDEN,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": HEADS,
                "num_hidden_layers": 1,
                "num_key_value_heads": HEADS,
            },
            "eos_token_id": EOS_ID,
            "pad_token_id": EOS_ID,
            "type": "llama",
            "vocab_size": VOCAB_SIZE,
        },
        "search": {
            "do_sample": False,
            "max_length": CONTEXT_LENGTH,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _tokenizer() -> dict[str, object]:
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    vocab[EOS_TOKEN] = EOS_ID
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": EOS_ID, "content": EOS_TOKEN, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
        ],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def _tokenizer_config() -> dict[str, object]:
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "add_bos_token": False,
        "model_max_length": CONTEXT_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }


def build_tiny_onnx_model(folder: Path) -> Path:
    """Write the model folder (model.onnx, genai_config.json, tokenizer files) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    model = helper.make_model(_graph(), opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "genai_config.json").write_text(json.dumps(_genai_config(), indent=2), encoding="utf-8")
    (folder / "tokenizer.json").write_text(json.dumps(_tokenizer(), ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2), encoding="utf-8")
    return folder
