"""Token counting and prompt text of an exact token length, with or without a tokenizer."""

from __future__ import annotations

import os
import random
from pathlib import Path

from soberana.bench.config import BenchConfigError

# Used when no tokenizer is available: short, common words are one token in most vocabularies,
# so "one word = one token" is a fair estimate (the server's `usage` stays exact regardless).
_FALLBACK_WORDS = """
time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government
number night point home water room mother area money story fact month lot right study book
eye job word business issue side kind head house service friend father power hour game line
end member law car city community name president team minute idea kid body information back
parent face others level office door health person art war history party result change
morning reason research girl guy moment air teacher force education foot boy age policy
process music market sense nation plan college interest death experience effect class
control care field development role effort rate heart drug show leader light voice wife
police mind price report decision son view relationship town road arm difference value
building action model season society tax director position player record paper space
ground form event official matter center couple site project activity star table need court
oil situation cost industry figure street image phone data picture practice piece land
""".split()

_MAX_ADJUST_STEPS = 64


class TokenCounter:
    """Counts tokens and writes random text of an exact token count.

    Text is made of whole words, each after a space, so appending it to a prefix never merges
    tokens across the seam in common tokenizers (byte-level BPE and SentencePiece).
    """

    def __init__(self, words: list[str], exact: bool, name: str) -> None:
        self.words = words  # the pool random text is drawn from
        self.exact = exact  # False: counts are estimates (no tokenizer)
        self.name = name  # the tokenizer's path, or "approximate"

    def count(self, text: str) -> int:
        """Tokens the server will count for `text` as a prompt (special tokens included)."""
        return len(text.split())

    def count_output(self, text: str) -> int:
        """Tokens in generated `text` (no special tokens)."""
        return len(text.split())

    def count_messages(self, messages: list[dict]) -> int:
        """Tokens of a chat prompt (the chat template when the tokenizer has one)."""
        return self.count(" ".join(str(m.get("content", "")) for m in messages))

    def make_text(
        self, rng: random.Random, total_tokens: int, prefix: str = "", *, as_prompt: bool = True
    ) -> str:
        """Random words, each after a space, such that `prefix + words` counts `total_tokens`.

        `as_prompt` counts special tokens (BOS) as the server does for a whole prompt; False
        counts a segment inside a conversation. Returns the words only. When the count cannot
        be met exactly (e.g. `total_tokens` is smaller than the prefix), returns the closest.
        """
        count = self.count if as_prompt else self.count_output
        words = [rng.choice(self.words) for _ in range(max(total_tokens - count(prefix), 0))]
        best, best_gap = "", None
        for _ in range(_MAX_ADJUST_STEPS):
            # A leading space makes the first word tokenize like the others (" word").
            text = " " + " ".join(words) if words else ""
            gap = count(prefix + text) - total_tokens
            if best_gap is None or abs(gap) < abs(best_gap):
                best, best_gap = text, gap
            if gap == 0 or (gap > 0 and not words):
                break
            if gap > 0:
                # A word can be several tokens, so remove at most what is over, at least one.
                del words[len(words) - min(max(gap // 2, 1), len(words)) :]
            else:
                words.extend(rng.choice(self.words) for _ in range(max(-gap // 2, 1)))
        return best


class HFTokenCounter(TokenCounter):
    """Exact counts with the model's own Hugging Face tokenizer."""

    def __init__(self, tokenizer, name: str) -> None:
        super().__init__(_single_token_words(tokenizer), exact=True, name=name)
        self.tokenizer = tokenizer

    def count(self, text: str) -> int:
        """Tokens the server will count for `text` as a prompt (special tokens included)."""
        return len(self.tokenizer(text)["input_ids"])

    def count_output(self, text: str) -> int:
        """Tokens in generated `text` (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_messages(self, messages: list[dict]) -> int:
        """Tokens of a chat prompt rendered with the tokenizer's chat template, when it has one."""
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True
            )
            # transformers 5 returns a BatchEncoding here, older versions a list of ids.
            return len(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return super().count_messages(messages)


def _single_token_words(tokenizer) -> list[str]:
    """Alphabetic vocabulary entries that stay one token when written as ` word`."""
    vocab_ids = sorted(tokenizer.get_vocab().values())
    special = set(tokenizer.all_special_ids)
    candidates = sorted(
        {
            text.strip().lower()
            for text in tokenizer.batch_decode([[i] for i in vocab_ids if i not in special])
            if text.strip().isascii() and text.strip().isalpha() and len(text.strip()) >= 2
        }
    )
    if candidates:
        encoded = tokenizer([" " + w for w in candidates], add_special_tokens=False)["input_ids"]
        single = [w for w, ids in zip(candidates, encoded, strict=True) if len(ids) == 1]
        # A tiny vocabulary may have few one-token words: longer words still give exact counts,
        # through more adjustment steps.
        if len(single) >= 32:
            return single
        if len(candidates) >= 32:
            return candidates
    return list(_FALLBACK_WORDS)


def _approximate(reason: str) -> tuple[TokenCounter, str]:
    return TokenCounter(list(_FALLBACK_WORDS), exact=False, name="approximate"), (
        f"{reason}; using approximate prompt lengths (1 word ~ 1 token). Pass --tokenizer DIR "
        "(a Hugging Face tokenizer directory) for exact lengths. Reported token counts still "
        "come from the server's usage when it sends one."
    )


def load_token_counter(
    tokenizer_dir: str | None, model: str | None, server_root: str | None = None
) -> tuple[TokenCounter, str | None]:
    """The tokenizer from `tokenizer_dir`, else from the first local directory among `model`
    and the server's `root` for it (vLLM and Soberana list one in /v1/models).

    Returns (counter, warning); the warning says why counts are approximate, if they are.
    """
    if tokenizer_dir:
        path = tokenizer_dir
    else:
        local = (p for p in (model, server_root) if isinstance(p, str) and os.path.isdir(p))
        path = next(local, None)
        if path is None:
            return _approximate(f"no tokenizer found (--model {model!r} is not a local directory)")
    try:
        # transformers is imported only here: it is slow to import and not every run needs it.
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        if tokenizer_dir:
            raise BenchConfigError(f"--tokenizer {path!r} could not be loaded: {exc}") from exc
        return _approximate(f"could not load a tokenizer from {path!r} ({exc})")
    return HFTokenCounter(tokenizer, name=str(Path(path))), None
