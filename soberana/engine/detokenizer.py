"""Incremental detokenization that never emits a broken multi-byte character.

The offsets trick of TGI/vLLM: decode a short window of tokens before the new ones and the
window plus the new ones; the text between the two is what the new tokens add. While the
tail decodes to U+FFFD (an incomplete UTF-8 sequence), nothing is emitted yet.
"""

from __future__ import annotations

from typing import Any

_INITIAL_WINDOW = 5  # tokens of prompt context, so the first word gets its leading space
_MAX_CHAR_TOKENS = 4  # a character is at most 4 UTF-8 bytes, so at most 4 byte tokens


class TokenDecoder:
    """`decode(ids)` gives exactly `tokenizer.decode(ids, skip_special_tokens=...)`.

    A Hugging Face fast tokenizer's `decode` converts its argument, calls its Rust
    `tokenizers.Tokenizer`, then may clean up spaces. Where the tokenizer keeps transformers'
    own `decode`/`_decode`, we call the Rust object directly and apply the same clean-up
    (about 3x faster for the few-token windows of streaming). Any other tokenizer (a slow
    Python one, a class with its own decoding) goes through `tokenizer.decode`.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.backend = _stock_rust_backend(tokenizer)  # None: the slow path
        self.clean_up_spaces = self.backend is not None and _cleans_up_spaces(tokenizer)
        # Ids the Rust decode filters out before its decoder runs, wherever they stand:
        # special tokens when skipping them. Ids unknown to the vocabulary are found lazily.
        self.dropped_ids: frozenset[int] = frozenset()
        self.vocab_size = 0
        if self.backend is not None:
            self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
            if skip_special_tokens:
                self.dropped_ids = frozenset(
                    i for i, t in self.backend.get_added_tokens_decoder().items() if t.special
                )

    def decode(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, as `tokenizer.decode` gives it."""
        if self.backend is None:
            return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        text = self.backend.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.clean_up_tokenization(text) if self.clean_up_spaces else text

    def drops(self, token_id: int) -> bool:
        """True when `decode` ignores this id wherever it stands, so a window need not hold it."""
        if token_id in self.dropped_ids:
            return True
        # The Rust decode skips ids it has no token for (a model vocabulary larger than the
        # tokenizer's); the size test spares the lookup for ordinary ids.
        return (self.backend is not None and token_id >= self.vocab_size
                and self.backend.id_to_token(token_id) is None)  # fmt: skip


def _stock_rust_backend(tokenizer: Any) -> Any:
    """The tokenizer's Rust `tokenizers.Tokenizer` if its decode is transformers' own, else None."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:
        return None
    cls = type(tokenizer)
    if (
        not isinstance(tokenizer, PreTrainedTokenizerFast)
        or cls.decode is not PreTrainedTokenizerBase.decode
        or cls._decode is not PreTrainedTokenizerFast._decode
        or "decode" in vars(tokenizer)
        or "_decode" in vars(tokenizer)
    ):
        return None
    return tokenizer.backend_tokenizer


def _cleans_up_spaces(tokenizer: Any) -> bool:
    """Whether transformers' `_decode` applies `clean_up_tokenization` for this tokenizer."""
    if not tokenizer.clean_up_tokenization_spaces:
        return False
    # transformers 5 skips the clean-up for BPE models (it would strip real spaces before
    # punctuation) unless this flag forces it; transformers 4 has no such flag and cleans up.
    force_bpe = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
    if not hasattr(tokenizer, force_bpe):
        return True
    is_bpe = type(tokenizer.backend_tokenizer.model).__name__ == "BPE"
    return not is_bpe or bool(getattr(tokenizer, force_bpe))


class IncrementalDetokenizer:
    """Turns one sample's token ids, a few at a time, into the text they add."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool,
        decoder: TokenDecoder | None = None,
    ) -> None:
        self.decoder = decoder or TokenDecoder(tokenizer, skip_special_tokens)
        # The window holds no id the decode drops anyway (a skipped special token, an id
        # the vocabulary lacks): the text is the same without them, and a long run of them
        # would otherwise grow the window and make every later decode longer.
        context: list[int] = []
        for token_id in reversed(prompt_token_ids):
            if len(context) == _INITIAL_WINDOW + _MAX_CHAR_TOKENS - 1:
                break
            if not self.decoder.drops(token_id):
                context.append(token_id)
        context.reverse()
        # Start the window on a character: a window opening inside a character's byte tokens
        # decodes to U+FFFD there, and a byte-fallback decoder (Llama 2, Mistral) then turns
        # the whole byte run, generated characters included, into U+FFFD.
        start = max(0, len(context) - _INITIAL_WINDOW)
        while start > 0 and self.decoder.decode(context[start:]).startswith("\ufffd"):
            start -= 1
        self.tokens: list[int] = context[start:]
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self._prefix_text: str | None = None  # decode of tokens[prefix_offset:read_offset]

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the text they complete (possibly empty)."""
        decoder = self.decoder
        kept = [t for t in token_ids if not decoder.drops(t)]
        if not kept:
            return ""
        self.tokens.extend(kept)
        prefix = self._prefix_text
        if prefix is None:
            prefix = decoder.decode(self.tokens[self.prefix_offset:self.read_offset])
            self._prefix_text = prefix
        full = decoder.decode(self.tokens[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete character, or tokens that add no text in this context
        new_text = full[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        self._prefix_text = None
        return new_text
