"""Sampling parameters, n > 1, seeds, stop conditions, detokenization and validation."""

from __future__ import annotations

import pytest
import torch

from soberana import LLM, SamplingParams
from soberana.engine.detokenizer import IncrementalDetokenizer
from soberana.engine.request import Request
from soberana.engine.sampler import Sampler


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("demo", max_model_len=1024)  # the built-in demo model


def test_n_samples_share_the_prompt_blocks_and_differ(llm):
    prompt = list(range(10, 10 + 70))  # 4 full blocks + 6 tokens
    before = llm.engine.get_stats().prefix_cache_hits
    out = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=3,
                                                ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 16 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    # Samples 1..3 reused sample 0's four full prompt blocks instead of computing them.
    assert llm.engine.get_stats().prefix_cache_hits - before == 3 * 64


def test_seeded_sample_is_the_same_whatever_else_is_in_the_batch(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=24, seed=1234,
                            ignore_eos=True)
    target = "The scheduler pauses the newest request"
    alone = llm.generate([target], params)[0].outputs[0].token_ids
    noise = [SamplingParams(temperature=1.2, max_tokens=30, ignore_eos=True)] * 5
    crowd = llm.generate(["Hello", "café Zürich", target, "Numbers: 1 2", "x" * 40, "Paris"],
                         noise[:2] + [params] + noise[2:])
    assert crowd[2].outputs[0].token_ids == alone
    again = llm.generate([target], params)[0].outputs[0].token_ids
    assert again == alone


def test_unseeded_samples_vary(llm):
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    outs = llm.generate(["Hello there"] * 4, params)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) > 1


def test_stop_string_across_token_boundaries_ends_the_text_before_it(llm):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    free = llm.generate(["The engine reads"], params)[0].outputs[0]
    tokenizer = llm.tokenizer
    # Pick a stop string that straddles two generated tokens.
    pieces = [tokenizer.decode(free.token_ids[: i + 1]) for i in range(len(free.token_ids))]
    cut = next(i for i in range(3, len(pieces)) if len(pieces[i]) - len(pieces[i - 1]) >= 2)
    stop = pieces[cut - 1][-1] + pieces[cut][len(pieces[cut - 1])]
    expected_text = free.text[: free.text.index(stop)]
    out = llm.generate(["The engine reads"], params.clone(stop=[stop]))[0].outputs[0]
    assert out.text == expected_text
    assert out.finish_reason == "stop" and out.stop_reason == stop
    with_stop = llm.generate(["The engine reads"],
                             params.clone(stop=[stop], include_stop_str_in_output=True))[0]
    assert with_stop.outputs[0].text == expected_text + stop


def test_stop_token_ids_and_eos_finish_with_reason_stop(llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    free = llm.generate(["Hello"], params)[0].outputs[0]
    stop_tok = free.token_ids[5]
    out = llm.generate(["Hello"], params.clone(stop_token_ids=[stop_tok]))[0].outputs[0]
    first = free.token_ids.index(stop_tok)
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok


def test_min_tokens_suppresses_eos_and_stop_tokens(llm):
    eos = llm.engine.model_info.eos_token_ids
    # Make EOS the only likely token, via stop_token_ids on everything greedy would pick.
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=8, ignore_eos=True)
    free = llm.generate(["Hello"], params)[0].outputs[0]
    stops = list(set(free.token_ids))
    out = llm.generate(["Hello"], params.clone(stop_token_ids=stops))[0].outputs[0]
    assert len(out.token_ids) >= 8
    assert not set(out.token_ids[:7]) & set(stops)
    assert eos  # the demo model declares EOS tokens


def test_max_tokens_gives_length_and_exact_count(llm):
    out = llm.generate(["Hello"], SamplingParams(max_tokens=7, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_detokenizer_never_emits_half_a_character(llm):
    tok = llm.tokenizer
    text = "café 東京 Ελλάδα 서울 مرحبا"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    pieces = [detok.add([i]) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # Multi-byte characters really were split across tokens in this test.
    assert any(tok.decode(ids[: i + 1]).endswith("\ufffd") for i in range(len(ids)))


def test_streamed_deltas_add_up_to_the_final_text(llm):
    from soberana.engine.output_processor import OutputProcessor
    from soberana.engine.outputs import EngineCoreRequest

    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["zz-never"])
    full = llm.generate(["Accents and scripts"], params)[0].outputs[0]
    proc = OutputProcessor(llm.tokenizer)
    ids = llm.tokenizer.encode("Accents and scripts")
    llm.engine.add_request(EngineCoreRequest("delta", ids, params, 0.0))
    proc.add_request("delta", None, ids, params, delta=True)
    text, tokens = "", []
    while llm.engine.has_unfinished_requests():
        for out in proc.process_outputs(llm.engine.step())[0]:
            text += out.outputs[0].text
            tokens += out.outputs[0].token_ids
    assert text == full.text and tokens == full.token_ids


def test_greedy_with_repetition_penalty_avoids_repeats(llm):
    base = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = llm.generate(["Hello"], base)[0].outputs[0].token_ids
    penalized = llm.generate(["Hello"], base.clone(repetition_penalty=2.0,
                                                   frequency_penalty=2.0))[0].outputs[0].token_ids
    assert len(set(penalized)) > len(set(plain))


def test_chat_applies_the_chat_template(llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(messages, SamplingParams(max_tokens=5, temperature=0))[0]
    expected = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
    assert llm.tokenizer.decode(out.prompt_token_ids) == expected


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "16"}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"seed": 1.5}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_bad_sampling_parameter_raises_value_error_naming_it(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_prompt_too_long_for_the_context_is_rejected_with_both_lengths(llm):
    with pytest.raises(ValueError, match="1000.*100.*1024"):
        llm.generate([[7] * 1000], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[10**6]], SamplingParams())


def test_top_k_one_and_tiny_top_p_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    reqs = [Request(str(i), 0, [1], p, 0.0, 0, None, 8) for i, p in enumerate([
        SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6),
        SamplingParams(temperature=1.0, min_p=1.0), SamplingParams(temperature=0.0)])]
    out = Sampler(50, torch.device("cpu"))(logits, reqs)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_sampling_follows_the_temperature_scaled_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    params = SamplingParams(temperature=0.5)
    reqs = [Request(str(i), 0, [1], params, 0.0, 0, None, 8) for i in range(4000)]
    counts = torch.bincount(Sampler(4, torch.device("cpu"))(logits, reqs).token_ids,
                            minlength=4).float()
    expected = torch.softmax(logits[0] / 0.5, -1) * 4000
    assert torch.allclose(counts, expected, atol=4 * expected.sqrt().max().item())


def test_bfloat16_logits_choose_as_their_float32_values_do():
    # Plain greedy rows take the argmax of the model's dtype as it is; anything else (here a
    # repetition penalty, logprobs and sampling) works on the float32 values.
    torch.manual_seed(0)
    logits = (torch.randn(6, 300) * 4).to(torch.bfloat16)
    logits[1, 7] = logits[1, 9] = 50.0  # a tie: the first wins
    plain = [SamplingParams(temperature=0.0) for _ in range(6)]
    reqs = [Request(str(i), 0, [1, 2], p, 0.0, 0, None, 8) for i, p in enumerate(plain)]
    sampler = Sampler(300, torch.device("cpu"))
    out = sampler(logits, reqs)
    assert out.token_ids.tolist() == logits.float().argmax(-1).tolist()
    assert out.token_ids[1] == 7
    mixed = plain[:4] + [SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=2),
                         SamplingParams(temperature=1.0, seed=3)]  # fmt: skip
    reqs = [Request(str(i), 0, [1, 2], p, 0.0, 0, None, 8) for i, p in enumerate(mixed)]
    from_bf16 = Sampler(300, torch.device("cpu"))(logits, reqs)
    from_f32 = Sampler(300, torch.device("cpu"))(logits.float(), reqs)
    assert torch.equal(from_bf16.token_ids, from_f32.token_ids)
    assert from_bf16.logprobs is not None
