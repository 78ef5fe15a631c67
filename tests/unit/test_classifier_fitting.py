"""Fitting on cached frozen-layer states: the split forward pass, freezing, batching, early stopping."""

from __future__ import annotations

import random
from itertools import pairwise
from typing import Any

import pytest
import torch

from modules.classifier_fitting import (
    bucketed_batches,
    fit_top_layers,
    freeze_below,
    frozen_states,
    learning_rate_factor,
    top_logits,
)
from modules.classifier_training import load_base, packaged_base_model, router_token_ids
from modules.progress import ProgressBar

TEXTS = ["hello", "move money from my savings account to checking before Friday", "book a flight to Rome",
         "what's the weather", "a much longer question about a rental car, its insurance and the deposit"]
QUIET = ProgressBar("test", 1, enabled=False)


@pytest.fixture(scope="module")
def base() -> tuple[Any, Any]:
    torch.manual_seed(0)
    return load_base(str(packaged_base_model()), ["a", "b", "c"])


@pytest.mark.parametrize("frozen_layers", [0, 4, 6])
def test_cached_states_then_the_top_layers_give_the_models_own_logits(base: tuple[Any, Any],
                                                                      frozen_layers: int) -> None:
    tokenizer, model = base
    model.eval()
    ids = router_token_ids(tokenizer, TEXTS, 64)
    states = frozen_states(model, ids, frozen_layers, tokenizer.pad_token_id, QUIET)
    assert [len(s) for s in states] == [len(row) for row in ids]
    with torch.no_grad():
        split = top_logits(model, states, frozen_layers)
        whole = model(**tokenizer.pad({"input_ids": ids}, return_tensors="pt")).logits
    # float16 states: close, not equal.
    assert torch.allclose(split, whole, atol=1e-3)


def test_freezing_leaves_only_the_top_layers_and_the_head_trainable() -> None:
    _, model = load_base(str(packaged_base_model()), ["a", "b"])
    assert freeze_below(model, 2) == 4
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    groups = ("bert.encoder.layer.4.", "bert.encoder.layer.5.", "bert.pooler.", "classifier.")
    assert all(name.startswith(groups) for name in trainable)
    assert all(any(name.startswith(group) for name in trainable) for group in groups)
    assert not any(p.requires_grad for p in model.bert.embeddings.parameters())
    assert freeze_below(model, 0) == 6
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]
    with pytest.raises(ValueError, match="between 0 and 6"):
        freeze_below(model, 7)


def test_batches_hold_rows_of_similar_length_in_random_order() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(3, 40) for _ in range(1000)]
    batches = bucketed_batches(lengths, 32, random.Random(1))
    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert max(spreads) <= 2
    firsts = [min(lengths[i] for i in b) for b in batches]
    assert firsts != sorted(firsts)
    assert bucketed_batches(lengths, 32, random.Random(1)) == batches


def test_training_stops_once_the_held_out_loss_rises_and_keeps_the_best_epoch() -> None:
    torch.manual_seed(0)
    tokenizer, model = load_base(str(packaged_base_model()), ["bank", "flight", "pasta"])
    freeze_below(model, 1)
    texts = [f"{word} number {i}" for word in ("bank", "flight", "pasta") for i in range(8)]
    targets = [i // 8 for i in range(len(texts))]
    states = frozen_states(model, router_token_ids(tokenizer, texts, 64), 5, tokenizer.pad_token_id, QUIET)
    # Held-out rows labelled against what training teaches: their loss grows as training learns.
    contrary = [(t + 1) % 3 for t in targets]
    report = fit_top_layers(model, states, targets, [1.0, 1.0, 1.0], (states, contrary), frozen_layers=5,
                            epochs=6, batch_size=8, learning_rate=1e-3, seed=0, progress=False)
    assert report.epochs_run < 6
    assert report.best_epoch == report.epochs_run - 1
    assert report.held_out_loss is not None
    with torch.no_grad():
        kept = torch.nn.functional.cross_entropy(top_logits(model.eval(), states, 5), torch.tensor(contrary))
    assert float(kept) == pytest.approx(report.held_out_loss, rel=1e-4)


def test_the_learning_rate_warms_up_then_decays_to_zero() -> None:
    factors = [learning_rate_factor(step, 100, 10) for step in range(101)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in pairwise(factors[9:]))
    assert factors[100] == 0.0
