"""A word-level tokenizer over the shapes grammar's closed vocabulary (a `transformers` fast tokenizer).

The shapes teacher pairs it with a CLIP text encoder exactly as Stable Diffusion pairs CLIP's BPE tokenizer with
one; a 40-word vocabulary keeps the shipped checkpoint small. Saved and loaded with the usual
`save_pretrained` / `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from prefalign.shapes.grammar import vocabulary

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


def shapes_tokenizer(max_length: int = 24) -> PreTrainedTokenizerFast:
    """Lower-cased whitespace/punctuation split, `[BOS] words [EOS]`, padded with `[PAD]` to `max_length`."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *vocabulary()))}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=max_length,
    )
