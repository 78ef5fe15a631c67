"""How a classifier router's class logits are read off its encoder: one function for every caller.

A folder written by `main.py train` is a Hugging Face BERT sequence-classification checkpoint. Its
`config.json` says which read-out its `classifier` layer was trained on:
- `"lemoe_pooling": "mean"` (`main.py train --fast`): the mean of the last layer's token vectors,
  L2-normalised, into `classifier`. The encoder is the frozen base, whose own training
  (sentence-transformers) made that mean its sentence vector; its `[CLS]` vector classifies
  CLINC150 about 3 points worse (93% against 96% held-out accuracy, measured on training rows).
- anything else: the stock read-out, `classifier(dropout(pooler([CLS])))`, which transformers'
  `BertForSequenceClassification.forward` computes.
The int8 ONNX export, the torch runtime of `DecisionRouter` and training's held-out scoring all
call `classification_logits`, so a mean-pooled model never reaches a stock read-out unnoticed.
(transformers itself ignores the key: such a folder loaded by hand with a stock pipeline reads
`[CLS]` and gives wrong classes.)

torch is imported by the callers; nothing here runs at import time.
"""

from __future__ import annotations

from typing import Any

POOLING_KEY = "lemoe_pooling"
MEAN_POOLING = "mean"


def uses_mean_pooling(model: Any) -> bool:
    """True for a model whose classifier reads the normalised mean token vector."""
    return getattr(model.config, POOLING_KEY, None) == MEAN_POOLING


def extended_attention_mask(attention_mask: Any, dtype: Any) -> Any:
    """The (batch, 1, 1, tokens) additive mask that BERT layers take: 0 to attend, very negative not to."""
    import torch

    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def logits_from_hidden(model: Any, hidden: Any, attention_mask: Any) -> Any:
    """Class logits from the last layer's token vectors (batch, tokens, hidden)."""
    import torch

    if uses_mean_pooling(model):
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return model.classifier(torch.nn.functional.normalize(mean, dim=-1))
    return model.classifier(model.dropout(model.bert.pooler(hidden)))


def run_layers(model: Any, hidden: Any, attention_mask: Any, first: int, stop: int) -> Any:
    """Encoder layers `first` .. `stop - 1` applied to `hidden`, the output of layer `first - 1`."""
    mask = extended_attention_mask(attention_mask, hidden.dtype)
    for layer in model.bert.encoder.layer[first:stop]:
        hidden = layer(hidden, attention_mask=mask)
    return hidden


def classification_logits(model: Any, input_ids: Any, attention_mask: Any) -> Any:
    """Class logits for token ids, with the read-out the model was trained with."""
    if not uses_mean_pooling(model):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return logits_from_hidden(model, hidden, attention_mask)
