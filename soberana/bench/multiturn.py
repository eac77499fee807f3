"""The `multiturn` workload: conversations, each round built on the previous answer."""

from __future__ import annotations

import asyncio
import random

from soberana.bench.config import LengthRange, WorkloadConfig
from soberana.bench.request import RequestResult, RequestSpec
from soberana.bench.tokens import TokenCounter


class MultiTurnSource:
    """`num_users` concurrent conversations of `num_rounds` rounds each.

    A conversation is the system prompt shared by everyone, then the user's own history
    (`history_len` tokens, opening their first question), then question/answer rounds. The
    real answer is appended before the next question, which becomes ready after the user's
    think time. When a user finishes, a new user takes their place, so runs longer than
    num_users x num_rounds requests (--num-prompts, --duration) keep the same shape.
    """

    def __init__(
        self,
        cfg: WorkloadConfig,
        counter: TokenCounter,
        rng: random.Random,
        output_len: LengthRange,
    ) -> None:
        self.cfg = cfg
        self.counter = counter
        self.rng = rng
        self.output_len = output_len
        # Lengths are of each segment alone (no BOS): they add up inside the conversation.
        self.system_prompt = (
            counter.make_text(rng, cfg.system_prompt_len, as_prompt=False)
            if cfg.system_prompt_len
            else ""
        )
        self.conversations: dict[int, list[dict[str, str]]] = {}  # user -> messages so far
        self.rounds_sent: dict[int, int] = {}  # user -> rounds handed out
        self.ready: asyncio.Queue[RequestSpec] = asyncio.Queue()  # FIFO: fair between users
        self.next_user = 0
        for _ in range(cfg.num_users):
            self._start_user()

    async def next(self) -> RequestSpec:
        """The next question of whichever user is ready first."""
        return await self.ready.get()

    def complete(self, result: RequestResult) -> None:
        """Append the answer; after the think time, queue the user's next round (or a new user)."""
        user = result.spec.user
        self.conversations[user].append({"role": "assistant", "content": result.text})
        if self.rounds_sent[user] >= self.cfg.num_rounds:
            del self.conversations[user], self.rounds_sent[user]
            self._start_user()
            return
        think = self.cfg.think_time.sample_float(self.rng)
        if think > 0:
            asyncio.get_running_loop().call_later(think, self._ask, user)
        else:
            self._ask(user)

    def _start_user(self) -> None:
        user = self.next_user
        self.next_user += 1
        self.conversations[user] = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        )
        self.rounds_sent[user] = 0
        self._ask(user)

    def _ask(self, user: int) -> None:
        messages = self.conversations[user]
        turn = self.rounds_sent[user]
        question = self.counter.make_text(
            self.rng, self.cfg.input_len.sample_int(self.rng), as_prompt=False
        )
        if turn == 0 and self.cfg.history_len:
            history = self.counter.make_text(self.rng, self.cfg.history_len, as_prompt=False)
            question = f"{history}\n\n{question}"
        messages.append({"role": "user", "content": question})
        self.rounds_sent[user] = turn + 1
        self.ready.put_nowait(
            RequestSpec(
                request_id=f"u{user}-t{turn}",
                messages=list(messages),  # a snapshot: the conversation grows after the answer
                max_tokens=self.output_len.sample_int(self.rng),
                user=user,
                turn=turn,
            )
        )
