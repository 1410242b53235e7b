"""The text side of small real pipelines built from config: a word-level tokenizer and a tiny CLIP text tower.

The toy world's base models, the tests' tiny pipelines and the benchmarks' random-init pipelines all build
their tokenizer and CLIP text encoder here, so each is saved with ``save_pretrained`` and loaded back through
the path a user's local weights take.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast

__all__ = ["clip_text_encoder", "word_tokenizer"]


def word_tokenizer(
    words: Sequence[str],
    *,
    max_length: int,
    wrap: bool = False,
    lowercase: bool = False,
    eos: str | None = None,
) -> PreTrainedTokenizerFast:
    """One id per word of ``words``, after [PAD] = 0 and [UNK] = 1.

    ``wrap``: [BOS] = 2 and [EOS] = 3 follow, and every text is encoded as [BOS] … [EOS] (CLIP's layout);
    ``eos``: an end-of-text token placed after [UNK] without wrapping (T5's ``</s>``, which UMT5 encoders
    expect to exist); ``lowercase``: normalise the text first.
    """
    specials = ["[PAD]", "[UNK]"] + (["[BOS]", "[EOS]"] if wrap else []) + ([eos] if eos else [])
    vocab = {token: i for i, token in enumerate([*specials, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    names = {"pad_token": "[PAD]", "unk_token": "[UNK]"}
    if wrap:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
        )
        names.update(bos_token="[BOS]", eos_token="[EOS]")
    elif eos:
        names["eos_token"] = eos
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=max_length, **names)


def clip_text_encoder(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int | None = None,
    projection_dim: int | None = None,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A randomly initialised CLIP text tower sized to ``tokenizer`` (vocabulary, length, special ids).

    ``intermediate``: the MLP width (default 2 × hidden); ``projection_dim``: add the pooled projection
    (SDXL's second encoder, SD3's two CLIP encoders)."""
    special = tokenizer.pad_token_id
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim or 512,
        pad_token_id=special,
        bos_token_id=special if tokenizer.bos_token_id is None else tokenizer.bos_token_id,
        eos_token_id=special if tokenizer.eos_token_id is None else tokenizer.eos_token_id,
    )
    return (CLIPTextModelWithProjection if projection_dim else CLIPTextModel)(config)
