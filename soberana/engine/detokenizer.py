"""Incremental detokenization that never emits a broken multi-byte character.

The offsets trick of TGI/vLLM: decode a short window of tokens before the new ones and the
window plus the new ones; the text between the two is what the new tokens add. While the
tail decodes to U+FFFD (an incomplete UTF-8 sequence), nothing is emitted yet.
"""

from __future__ import annotations

_INITIAL_WINDOW = 5  # tokens of prompt context, so the first word gets its leading space


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = list(prompt_token_ids[-_INITIAL_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the text they complete (possibly empty)."""
        self.tokens.extend(token_ids)
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset:self.read_offset],
                        skip_special_tokens=self.skip_special_tokens)
        full = decode(self.tokens[self.prefix_offset:],
                      skip_special_tokens=self.skip_special_tokens)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete character, or a token that adds no text
        new_text = full[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        return new_text
