"""LSTM word-level language model (e.g. Penn Treebank / WikiText-2)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_fedprune.errors import ModelError
from lightning_fedprune.models.registry import (
    DEFAULT_SEQ_LEN,
    check_positive_int,
    check_probability,
    register_model,
)

__all__ = ["LSTMLanguageModel", "lstm_lm"]


class LSTMLanguageModel(nn.Module):
    """``embedding -> dropout -> LSTM -> dropout -> classifier``.

    ``classifier`` is the decoder, a Linear from ``hidden_size`` to ``vocab_size`` (named like
    every other model's output layer so it is found uniformly). Each forward call starts the LSTM
    from a zero state: no hidden state is carried across batches.

    Args:
        vocab_size: Vocabulary size (number of output logits per position).
        embed_dim: Embedding width.
        hidden_size: LSTM hidden width.
        num_layers: Number of stacked LSTM layers.
        dropout: Dropout on the embeddings, between LSTM layers and on the LSTM output.
        tie_weights: Share the decoder weight with the embedding (needs
            ``embed_dim == hidden_size``).
        batch_first: Tokens are ``(B, T)`` if True, ``(T, B)`` otherwise.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        tie_weights: bool,
        batch_first: bool,
    ) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            embed_dim,
            hidden_size,
            num_layers=num_layers,
            dropout=dropout if num_layers > 1 else 0.0,
            batch_first=batch_first,
        )
        self.classifier = nn.Linear(hidden_size, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.classifier.weight, -0.1, 0.1)
        nn.init.zeros_(self.classifier.bias)
        if tie_weights:
            self.classifier.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, T, vocab_size)`` (``(T, B, vocab_size)`` if not ``batch_first``)."""
        out, _ = self.lstm(self.drop(self.embedding(tokens)))
        return self.classifier(self.drop(out))


def _lm_example(
    batch_size: int,
    *,
    generator: torch.Generator,
    vocab_size: int,
    batch_first: bool,
    seq_len: int = DEFAULT_SEQ_LEN,
    **_: Any,
) -> torch.Tensor:
    shape = (batch_size, seq_len) if batch_first else (seq_len, batch_size)
    return torch.randint(0, vocab_size, shape, generator=generator, dtype=torch.long)


@register_model(
    example_input=_lm_example, unprunable=("classifier", "embedding"), task="language_model"
)
def lstm_lm(
    vocab_size: int = 10000,
    embed_dim: int = 200,
    hidden_size: int = 200,
    num_layers: int = 2,
    dropout: float = 0.2,
    tie_weights: bool = False,
    batch_first: bool = True,
) -> LSTMLanguageModel:
    """2-layer LSTM language model (the "small" PTB setup of Zaremba et al. / PyTorch's
    word_language_model example). 4,653,200 parameters with the defaults.

    Example input: ``LongTensor`` token ids ``(B, 35)`` (``(35, B)`` if not ``batch_first``;
    change 35 with ``model_info(..., seq_len=)``). ``unprunable``: the decoder (``classifier``)
    and the ``embedding``.
    """
    check_positive_int("vocab_size", vocab_size, "lstm_lm")
    check_positive_int("embed_dim", embed_dim, "lstm_lm")
    check_positive_int("hidden_size", hidden_size, "lstm_lm")
    check_positive_int("num_layers", num_layers, "lstm_lm")
    dropout = check_probability("dropout", dropout, "lstm_lm")
    if tie_weights and embed_dim != hidden_size:
        raise ModelError(
            f"lstm_lm: tie_weights=True needs embed_dim == hidden_size, got {embed_dim} and "
            f"{hidden_size}; set them equal or use tie_weights=False."
        )
    return LSTMLanguageModel(
        vocab_size,
        embed_dim,
        hidden_size,
        num_layers,
        dropout,
        bool(tie_weights),
        bool(batch_first),
    )
