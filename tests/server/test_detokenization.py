"""Detokenization in the API process: the fast decode is exact, streams add up, windows stay short.

The server detokenizes every generated token of every request; these check the pieces it
relies on against transformers' own `decode`, on the demo tokenizer (byte-level BPE) and on
tokenizers trained here with other decoders (SentencePiece-style Metaspace, Llama-2-style
byte fallback, WordPiece with clean-up of tokenization spaces).
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from soberana.engine.detokenizer import IncrementalDetokenizer, TokenDecoder
from soberana.engine.output_processor import OutputProcessor
from soberana.engine.outputs import EngineCoreOutput
from soberana.engine.sampling_params import SamplingParams
from soberana.models.loader import resolve_model_path
from soberana.models.tokenizer import load_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog, doesn't it? I'm sure it's fine!",
    "Café crème brûlée à la carte — naïve façade, coöperate.",
    "東京は日本の首都です。서울은 한국의 수도입니다. Ελλάδα και Αθήνα.",
    "مرحبا بالعالم 🙂 🚀 emoji: 👩‍💻 and ß, Æ, ø, ğ, ł.",
    "Numbers 12345, 3.14159 and code: def f(x): return x ** 2 # done.",
] * 20
SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|end|>"]


def _wrap(tok: Tokenizer, clean_up: bool) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<|user|>", "<|end|>"], clean_up_tokenization_spaces=clean_up,
    )  # fmt: skip


def metaspace_unigram() -> PreTrainedTokenizerFast:
    """SentencePiece-style: Unigram model, Metaspace pre-tokenizer and decoder."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=SPECIAL, unk_token="<unk>",
                                      show_progress=False)  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return _wrap(tok, clean_up=False)


def byte_fallback_bpe() -> PreTrainedTokenizerFast:
    """Llama-2-style: BPE over Metaspace pieces with <0xXX> byte tokens for unknown characters."""
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace()
    base.train_from_iterator(
        CORPUS[:3] * 5, trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIAL, show_progress=False)
    )
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])  # fmt: skip
    tok.add_special_tokens(SPECIAL)
    return _wrap(tok, clean_up=False)


def wordpiece_with_clean_up() -> PreTrainedTokenizerFast:
    """BERT-style WordPiece, whose decode cleans up spaces before punctuation."""
    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        CORPUS, trainers.WordPieceTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False)
    )
    return _wrap(tok, clean_up=True)


def byte_level_with_clean_up() -> PreTrainedTokenizerFast:
    """The demo tokenizer's kind (byte-level BPE), but asking for the space clean-up."""
    return _wrap(Tokenizer.from_str(load_tokenizer(resolve_model_path("demo"))._tokenizer.to_str()),
                 clean_up=True)  # fmt: skip


TOKENIZERS = {
    "demo-byte-level-bpe": lambda: load_tokenizer(resolve_model_path("demo")),
    "metaspace-unigram": metaspace_unigram,
    "byte-fallback-bpe": byte_fallback_bpe,
    "wordpiece-clean-up": wordpiece_with_clean_up,
    "byte-level-bpe-clean-up": byte_level_with_clean_up,
}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def _random_ids(
    tokenizer, rng: random.Random, length: int, beyond_vocab: int = 0, byte_tokens: bool = True
) -> list[int]:
    """At least `length` ids: mostly whole pieces of real text (multi-byte characters split
    across tokens), some specials, some random ids; `beyond_vocab` allows ids past the
    tokenizer's vocabulary, `byte_tokens` random <0xXX> tokens."""
    candidates = range(len(tokenizer) + beyond_vocab)
    if not byte_tokens:
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        candidates = [i for i, t in enumerate(tokens) if not t.startswith("<0x")]
    ids = []
    while len(ids) < length:
        roll = rng.random()
        if roll < 0.5:
            line = rng.choice(CORPUS)
            start = rng.randrange(len(line))
            ids += tokenizer.encode(line[start:start + 12], add_special_tokens=False)
        elif roll < 0.65:
            ids.append(rng.choice(tokenizer.all_special_ids))
        else:
            ids.append(rng.choice(candidates))
    return ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_fast_decode_gives_exactly_the_transformers_text(tokenizer, skip_special_tokens):
    decoder = TokenDecoder(tokenizer, skip_special_tokens)
    rng = random.Random(0)
    for _ in range(300):
        ids = _random_ids(tokenizer, rng, rng.randrange(1, 24), beyond_vocab=50)
        assert decoder.decode(ids) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), ids


def test_fast_decode_cleans_up_spaces_where_transformers_does():
    tok = wordpiece_with_clean_up()
    ids = tok.encode("it is fine , isn ' t it ? yes !", add_special_tokens=False)
    assert TokenDecoder(tok, True).decode(ids) == tok.decode(ids) == "it is fine, isn't it? yes!"


def test_a_tokenizer_with_its_own_decode_is_decoded_its_way():
    class ShoutingTokenizer(PreTrainedTokenizerFast):
        def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return super()._decode(token_ids, skip_special_tokens=skip_special_tokens).upper()

    demo = load_tokenizer(resolve_model_path("demo"))
    tok = ShoutingTokenizer(tokenizer_object=Tokenizer.from_str(demo._tokenizer.to_str()))
    ids = tok.encode("hello world", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert "".join(detok.add([i]) for i in ids) == "HELLO WORLD"


@pytest.mark.parametrize("name", ["demo-byte-level-bpe", "metaspace-unigram", "byte-fallback-bpe"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streamed_pieces_add_up_to_the_decoded_text(name, skip_special_tokens):
    tok = TOKENIZERS[name]()
    rng = random.Random(1)
    ascii_tail = tok.encode(" end", add_special_tokens=False)  # nothing left half-decoded
    for _ in range(100):
        prompt = tok.encode(rng.choice(CORPUS)[:30], add_special_tokens=False)
        # No random <0xXX> tokens: a run of them holding an invalid byte decodes to one U+FFFD
        # per byte, so where a window splits the run would change the text (as it always
        # has); runs from real text are valid UTF-8.
        generated = _random_ids(tok, rng, rng.randrange(1, 40), byte_tokens=False) + ascii_tail
        generated.insert(rng.randrange(len(generated)), len(tok) + 3)  # an id past the vocabulary
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens)
        pieces = []
        for start in range(0, len(generated), 3):  # a few tokens per step, like batched steps
            pieces.append(detok.add(generated[start:start + 3]))
        context = tok.decode(prompt, skip_special_tokens=skip_special_tokens)
        whole = tok.decode(prompt + generated, skip_special_tokens=skip_special_tokens)
        assert whole.startswith(context)
        assert "".join(pieces) == whole[len(context):], (prompt, generated)
        assert not any(p.endswith("\ufffd") for p in pieces if p)


def test_a_prompt_ending_in_byte_tokens_does_not_garble_the_first_characters():
    tok = byte_fallback_bpe()
    prompt = tok.encode("مرحبا بالعالم", add_special_tokens=False)  # byte tokens all along
    # Its last five tokens start inside a character: a window of them decodes to U+FFFD...
    assert tok.decode(prompt[-5:]).startswith("\ufffd")
    # ...and the generated characters continue the same run of byte tokens.
    generated = tok.encode("بالعالم", add_special_tokens=False)[1:]  # without "▁"
    assert all(t.startswith("<0x") for t in tok.convert_ids_to_tokens(generated))
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=True)
    assert "".join(detok.add([t]) for t in generated) == "بالعالم"


class _CountingBackend:
    """The Rust tokenizer, counting the token ids every decode is given."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.ids_decoded = 0

    def decode(self, ids, skip_special_tokens=False):
        self.ids_decoded += len(ids)
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("filler", ["skipped special tokens", "ids beyond the vocabulary"])
def test_tokens_without_text_do_not_grow_the_decode_window(filler):
    tok = load_tokenizer(resolve_model_path("demo"))
    counting = tok._tokenizer = _CountingBackend(tok._tokenizer)
    eos = tok.convert_tokens_to_ids("</s>")
    filler_id = eos if filler == "skipped special tokens" else len(tok) + 7
    detok = IncrementalDetokenizer(tok, tok.encode("Hello"), skip_special_tokens=True)
    words = tok.encode(" and so on", add_special_tokens=False)
    text, steps = "", 0
    for _ in range(10):  # long runs of tokens that decode to nothing, then real text
        for _ in range(300):
            text += detok.add([filler_id])
            steps += 1
        for word in words:
            text += detok.add([word])
            steps += 1
    assert text == " and so on" * 10
    # Each decode covers a few tokens; a window that kept the 300-token runs would decode
    # ~300 ids per step (and ~45,000 per run, summed).
    assert counting.ids_decoded <= 10 * steps


def _outputs(request_id: str, ids: list[int]) -> list[list[EngineCoreOutput]]:
    steps = [[EngineCoreOutput(request_id, 0, [t])] for t in ids]
    steps[-1][0].finish_reason = "length"
    return steps


def test_final_only_requests_get_one_output_with_the_whole_result():
    tok = load_tokenizer(resolve_model_path("demo"))
    ids = tok.encode(" Café 東京 and more", add_special_tokens=False)
    params = SamplingParams(max_tokens=len(ids))
    proc = OutputProcessor(tok)
    proc.add_request("whole", None, [5, 6], params, delta=False)
    proc.add_request("final", None, [5, 6], params, delta=True, final_only=True)
    per_step = []
    for step in zip(_outputs("whole", ids), _outputs("final", ids), strict=True):
        results, _ = proc.process_outputs([out for outs in step for out in outs])
        per_step.append({r.request_id: r for r in results})
    assert all("final" not in step for step in per_step[:-1])
    final, whole = per_step[-1]["final"], per_step[-1]["whole"]
    assert final.finished and final.outputs[0].finish_reason == "length"
    assert final.outputs[0].text == whole.outputs[0].text == tok.decode(ids)
    assert final.outputs[0].token_ids == ids


def test_long_streams_deliver_every_character_and_find_late_stop_strings():
    tok = load_tokenizer(resolve_model_path("demo"))
    line = " The quick brown fox jumps over the lazy dog, doesn't it?"
    ids = tok.encode(line * 200 + " STOP here", add_special_tokens=False)  # ~11k characters
    params = SamplingParams(max_tokens=len(ids), stop=["fox jumps over the lazy dog, doesn't it? STOP"])
    proc = OutputProcessor(tok)
    proc.add_request("whole", None, [5], params, delta=False)
    proc.add_request("delta", None, [5], params, delta=True)
    streamed, whole = "", None
    for step in zip(_outputs("whole", ids), _outputs("delta", ids), strict=True):
        for result in proc.process_outputs([out for outs in step for out in outs])[0]:
            if result.request_id == "delta":
                streamed += result.outputs[0].text
            elif result.finished:
                whole = result.outputs[0]
    assert whole is not None and whole.finish_reason == "stop"
    assert streamed == whole.text == line * 199 + " The quick brown "
