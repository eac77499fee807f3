"""The slot queue hands slots out by weighted fair queuing across tenants."""

from __future__ import annotations

import asyncio

from soberana.gateway.waiters import SlotWaiters


def test_contended_slots_go_to_tenants_in_proportion_to_their_weight():
    async def scenario() -> list[str]:
        waiters = SlotWaiters()
        # A heavy tenant queues 6 first; a tenant of weight 2 queues 6 just after.
        tickets = [waiters.enqueue("m", "heavy", 1.0) for _ in range(6)]
        tickets += [waiters.enqueue("m", "gold", 2.0) for _ in range(6)]
        served: list[str] = []

        async def request(ticket) -> None:
            await waiters.wait(ticket, 10)
            served.append(ticket.tenant)  # takes "the slot" before yielding, as the proxy does
            waiters.leave(ticket, served=True)

        tasks = [asyncio.create_task(request(t)) for t in tickets]
        await asyncio.sleep(0)  # everyone parked
        waiters.wake("m")  # woken in tag order, each resumes (and takes a slot) in that order
        await asyncio.gather(*tasks)
        return served

    served = asyncio.run(scenario())
    # gold's tags are 0.5, 1, 1.5, ...; heavy's 1, 2, 3, ...: two gold per heavy while both wait.
    assert served[:9] == ["gold", "heavy", "gold", "gold", "heavy", "gold", "gold", "heavy", "gold"]
    assert served.count("heavy") == 6 and served.count("gold") == 6
