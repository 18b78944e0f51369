"""Chunked cross-entropy equals the plain loss, value and gradients; masking and normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_loneforge.datamodules.batch import IGNORE_INDEX
from lightning_loneforge.model_zoo.loss import chunked_argmax, chunked_cross_entropy, shift_labels


def _inputs(tokens=37, dim=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    targets[torch.rand(tokens, generator=g) < 0.4] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_matches_plain_cross_entropy_and_gradients(chunk_size):
    hidden, weight, targets = _inputs()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, count = chunked_cross_entropy(h1, w1, targets, chunk_size=chunk_size)
    (loss * 3.0).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain = F.cross_entropy(h2 @ w2.t(), targets, ignore_index=IGNORE_INDEX)
    (plain * 3.0).backward()
    assert count == int((targets != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


def test_frozen_weight_gets_no_gradient_and_empty_labels_give_zero():
    hidden, weight, targets = _inputs()
    h = hidden.clone().requires_grad_()
    loss, _ = chunked_cross_entropy(h, weight, targets, chunk_size=8)
    loss.backward()
    assert h.grad is not None and weight.grad is None
    empty, count = chunked_cross_entropy(h, weight, torch.full_like(targets, IGNORE_INDEX))
    assert count == 0 and float(empty) == 0.0


def test_out_of_vocab_label_is_a_clear_error():
    hidden, weight, targets = _inputs()
    targets[0] = 50
    with pytest.raises(ValueError, match="outside the vocabulary"):
        chunked_cross_entropy(hidden, weight, targets)


def test_shift_labels_never_crosses_samples():
    labels = torch.tensor([IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7, 8])
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    assert shift_labels(labels, cu).tolist() == [5, 6, IGNORE_INDEX, 7, 8, IGNORE_INDEX]


def test_chunked_argmax():
    hidden, weight, _ = _inputs()
    assert torch.equal(chunked_argmax(hidden, weight, chunk_size=7), (hidden @ weight.t()).argmax(-1))
