"""Workloads: prompt lengths in tokens, distinctness, shared prefixes, conversations, files."""

from __future__ import annotations

import asyncio
import json
import random
from itertools import islice

import pytest

from soberana.bench.config import BenchConfigError, LengthRange, WorkloadConfig
from soberana.bench.multiturn import MultiTurnSource
from soberana.bench.request import RequestResult
from soberana.bench.tokens import TokenCounter, load_token_counter
from soberana.bench.workloads import build_source, file_requests, prefix_requests, random_requests


@pytest.fixture(scope="module")
def counter(tiny_tokenizer_dir) -> TokenCounter:
    counter, warning = load_token_counter(tiny_tokenizer_dir, None)
    assert warning is None and counter.exact
    return counter


def ids(counter: TokenCounter, text: str) -> list[int]:
    return counter.tokenizer(text)["input_ids"]


def test_random_prompts_have_exactly_the_requested_token_count(counter):
    cfg = WorkloadConfig(input_len=LengthRange(1, 300), output_len=LengthRange(5, 9))
    specs = list(islice(random_requests(cfg, counter, random.Random(0)), 60))
    for spec in specs:
        assert counter.count(spec.prompt_text()) == spec.target_prompt_tokens  # BOS included
        assert 1 <= spec.target_prompt_tokens <= 300
        assert 5 <= spec.max_tokens <= 9
    assert len({s.target_prompt_tokens for s in specs}) > 20  # the range is used, not one value


def test_random_prompts_share_no_cache_block(counter):
    cfg = WorkloadConfig(input_len=LengthRange(64, 64))
    specs = list(islice(random_requests(cfg, counter, random.Random(0)), 200))
    # Prefix caching works on whole blocks (16 tokens in Soberana and vLLM): with distinct
    # first blocks, no request can reuse another's cache.
    first_blocks = {tuple(ids(counter, s.prompt_text())[:16]) for s in specs}
    assert len(first_blocks) == 200


def test_workloads_are_reproducible_from_the_seed(counter):
    cfg = WorkloadConfig(input_len=LengthRange(10, 40))
    a = [s.prompt_text() for s in islice(random_requests(cfg, counter, random.Random(3)), 10)]
    b = [s.prompt_text() for s in islice(random_requests(cfg, counter, random.Random(3)), 10)]
    c = [s.prompt_text() for s in islice(random_requests(cfg, counter, random.Random(4)), 10)]
    assert a == b and a != c


def test_prefix_workload_shares_each_prefix_across_its_distinct_suffixes(counter):
    cfg = WorkloadConfig(
        name="prefix",
        input_len=LengthRange(20, 20),
        num_prefixes=3,
        prefix_len=48,
        suffixes_per_prefix=5,
    )
    specs = list(islice(prefix_requests(cfg, counter, random.Random(0)), 15))
    assert sorted(s.prefix for s in specs) == sorted([0, 1, 2] * 5)
    assert len({s.prompt_text() for s in specs}) == 15
    by_prefix: dict[int, list[list[int]]] = {}
    for s in specs:
        assert counter.count(s.prompt_text()) == 48 + 20
        by_prefix.setdefault(s.prefix, []).append(ids(counter, s.prompt_text()))
    for prompts in by_prefix.values():
        # Every prompt of a group starts with the same 48 tokens (what the cache reuses)...
        assert len({tuple(p[:47]) for p in prompts}) == 1
        # ...and no two go on the same way.
        assert len({tuple(p[48:]) for p in prompts}) == len(prompts)
    heads = {tuple(prompts[0][:16]) for prompts in by_prefix.values()}
    assert len(heads) == 3  # the prefixes themselves differ


def test_prefix_workload_default_size_is_prefixes_times_suffixes(counter):
    cfg = WorkloadConfig(
        name="prefix",
        input_len=LengthRange(4, 4),
        num_prefixes=2,
        prefix_len=8,
        suffixes_per_prefix=3,
    )
    from soberana.bench.workloads import natural_num_prompts

    assert natural_num_prompts(cfg) == 6


def answer(spec, text: str) -> RequestResult:
    return RequestResult(spec=spec, status=200, text=text)


def test_multiturn_conversations_grow_by_each_answer_and_share_the_system_prompt(counter):
    cfg = WorkloadConfig(
        name="multiturn",
        input_len=LengthRange(12, 12),
        num_users=3,
        num_rounds=3,
        system_prompt_len=40,
        history_len=10,
    )

    async def play() -> list:
        source = MultiTurnSource(cfg, counter, random.Random(0), LengthRange(8, 8))
        sent = []
        for _ in range(9):
            spec = await source.next()
            sent.append(spec)
            source.complete(answer(spec, f" answer of {spec.request_id}"))
        return sent

    sent = asyncio.run(play())
    assert sorted((s.user, s.turn) for s in sent) == [(u, t) for u in range(3) for t in range(3)]
    systems = {s.messages[0]["content"] for s in sent}
    assert len(systems) == 1 and counter.count_output(systems.pop()) == 40
    for user in range(3):
        turns = sorted((s for s in sent if s.user == user), key=lambda s: s.turn)
        for earlier, later in zip(turns, turns[1:], strict=False):
            # The next round is the previous prompt + its real answer + a new question.
            assert later.messages[: len(earlier.messages)] == earlier.messages
            assert later.messages[len(earlier.messages)] == {
                "role": "assistant",
                "content": f" answer of {earlier.request_id}",
            }
            assert later.messages[-1]["role"] == "user"
        # Each user's own history opens their first question: conversations differ from there.
    firsts = {s.messages[1]["content"] for s in sent if s.turn == 0}
    assert len(firsts) == 3


def test_multiturn_completions_prompt_extends_the_previous_round(counter):
    cfg = WorkloadConfig(
        name="multiturn",
        input_len=LengthRange(6, 6),
        num_users=1,
        num_rounds=2,
        system_prompt_len=10,
    )

    async def play():
        source = MultiTurnSource(cfg, counter, random.Random(0), LengthRange(4, 4))
        first = await source.next()
        source.complete(answer(first, " first answer"))
        return first, await source.next()

    first, second = asyncio.run(play())
    # Append-only transcript: the server can reuse the first round's cache for the second.
    assert second.prompt_text().startswith(first.prompt_text() + " first answer")


def test_multiturn_next_round_waits_for_the_think_time(counter):
    cfg = WorkloadConfig(
        name="multiturn",
        input_len=LengthRange(4, 4),
        num_users=1,
        num_rounds=2,
        system_prompt_len=0,
        think_time=LengthRange(0.3, 0.3),
    )

    async def play() -> float:
        loop = asyncio.get_running_loop()
        source = MultiTurnSource(cfg, counter, random.Random(0), LengthRange(4, 4))
        first = await source.next()
        answered = loop.time()
        source.complete(answer(first, " ok"))
        await source.next()
        return loop.time() - answered

    assert asyncio.run(play()) >= 0.29


def test_multiturn_starts_new_users_when_one_finishes(counter):
    cfg = WorkloadConfig(
        name="multiturn",
        input_len=LengthRange(4, 4),
        num_users=2,
        num_rounds=1,
        system_prompt_len=0,
    )

    async def play():
        source = MultiTurnSource(cfg, counter, random.Random(0), LengthRange(4, 4))
        users = []
        for _ in range(5):
            spec = await source.next()
            users.append(spec.user)
            source.complete(answer(spec, " ok"))
        return users

    assert asyncio.run(play()) == [0, 1, 2, 3, 4]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_file_workload_reads_prompts_messages_and_sharegpt(counter, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "plain prompt", "max_tokens": 7},
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                ]
            },
            {
                "conversations": [
                    {"from": "human", "value": "question"},
                    {"from": "gpt", "value": " one two three four five"},
                ]
            },
            {"conversations": [{"from": "gpt", "value": "no user turn: skipped"}]},
        ],
    )
    cfg = WorkloadConfig(name="file", dataset_path=path)
    specs = list(islice(file_requests(cfg, counter, random.Random(0)), 4))
    assert specs[0].prompt_text() == "plain prompt" and specs[0].max_tokens == 7
    assert specs[1].messages[0] == {"role": "system", "content": "be brief"}
    assert specs[1].max_tokens == 128  # no length given: the default
    assert specs[2].messages == [{"role": "user", "content": "question"}]
    # The dataset's own answer sets the answer length, in tokens.
    assert specs[2].max_tokens == counter.count_output(" one two three four five")
    assert specs[3].prompt_text() == "plain prompt"  # cycles once exhausted


def test_file_workload_accepts_a_sharegpt_json_array_and_output_len_overrides(counter, tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(
        json.dumps(
            [
                {
                    "conversations": [
                        {"from": "human", "value": "q"},
                        {"from": "gpt", "value": "a b c"},
                    ]
                }
            ]
        )
    )
    cfg = WorkloadConfig(name="file", dataset_path=str(path), output_len=LengthRange(3, 3))
    (spec,) = islice(file_requests(cfg, counter, random.Random(0)), 1)
    assert spec.max_tokens == 3


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 2: not valid JSON"),
        ('{"text": "x"}', "line 2: expected a 'prompt', 'messages' or 'conversations' field"),
        ('{"prompt": "x", "max_tokens": 0}', "line 2: max_tokens must be an integer >= 1"),
        ('{"messages": [{"role": "wizard", "content": "x"}]}', "line 2: each turn needs a role"),
    ],
)
def test_a_bad_dataset_line_is_reported_with_its_number(counter, tmp_path, line, message):
    path = tmp_path / f"bad{abs(hash(line))}.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(BenchConfigError, match=message):
        build_source(WorkloadConfig(name="file", dataset_path=str(path)), counter, 0, 2)


def test_without_a_tokenizer_lengths_are_approximate_and_the_user_is_told():
    counter, warning = load_token_counter(None, "some-hub/model-id")
    assert not counter.exact
    assert "--tokenizer DIR" in warning and "approximate" in warning
    text = counter.make_text(random.Random(0), 50)
    assert len(text.split()) == 50


def test_an_unloadable_tokenizer_dir_is_a_clear_error(tmp_path):
    with pytest.raises(BenchConfigError, match="--tokenizer .* could not be loaded"):
        load_token_counter(str(tmp_path), None)
