"""Prepare over one long-lived call per agent (PrepareStream).

The coordinator's multiplexing (`coordinator.prepare_stream`) is checked against a
real gRPC server on loopback whose servicer answers in an order of the test's
choosing; the whole path (coordinator, agents, PostgreSQL) against real daemons, with
an agent killed while several Prepares are in flight on its call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from coordinator.client import Outcome
from coordinator.participants import ParticipantClient
from coordinator.prepare_stream import CallBroken, PrepareStream
from tests.conftest import SystemFactory, create_tagged_rows, rows, tagged_inserts
from twopc_common.tls import TlsConfig
from twopc_common.votes import Vote
from twopc_harness.daemons import wait_until
from twopc_harness.postgres import free_port
from twopc_pb import participant_pb2 as pb
from twopc_pb import participant_pb2_grpc as pgrpc


class HeldAnswers(pgrpc.ParticipantServicer):
    """Answers each Prepare only when the test releases it (by transaction id), and
    records the messages it read."""

    def __init__(self) -> None:
        self.messages: list[list[str]] = []
        self.release: dict[str, asyncio.Event] = {}
        self.calls = 0

    def gate(self, txid: str) -> asyncio.Event:
        return self.release.setdefault(txid, asyncio.Event())

    async def PrepareStream(
        self, requests: AsyncIterator[pb.PrepareBatch], context: Any
    ) -> AsyncIterator[pb.VoteBatch]:
        self.calls += 1
        await context.send_initial_metadata(())  # accepted, as multiplex.serve does
        answers: asyncio.Queue[pb.VoteItem] = asyncio.Queue()

        async def one(item: pb.PrepareItem) -> None:
            await self.gate(item.request.transaction_id).wait()
            await answers.put(
                pb.VoteItem(
                    ref=item.ref,
                    response=pb.PrepareResponse(vote=pb.YES, reason=item.request.transaction_id),
                )
            )

        held: set[asyncio.Future[None]] = set()

        async def read() -> None:
            async for batch in requests:
                self.messages.append([i.request.transaction_id for i in batch.items])
                held.update(asyncio.ensure_future(one(item)) for item in batch.items)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                yield pb.VoteBatch(items=[await answers.get()])
        finally:
            reader.cancel()


@dataclass
class Rig:
    """A held-answer servicer on a loopback port, and a PrepareStream to it."""

    servicer: HeldAnswers
    address: str
    channel: grpc.aio.Channel
    stream: PrepareStream
    server: grpc.aio.Server | None = None

    async def start_server(self) -> None:
        """Serve on the rig's address (again, after `server.stop`)."""
        self.server = grpc.aio.server()
        pgrpc.add_ParticipantServicer_to_server(self.servicer, self.server)
        self.server.add_insecure_port(self.address)
        await self.server.start()


@contextlib.asynccontextmanager
async def rig(
    max_items: int = 100, max_bytes: int = 1 << 20, serving: bool = True
) -> AsyncIterator[Rig]:
    address = f"127.0.0.1:{free_port()}"
    channel = grpc.aio.insecure_channel(address)
    stream = PrepareStream(
        lambda: pgrpc.ParticipantStub(channel).PrepareStream(wait_for_ready=True),
        max_items,
        max_bytes,
    )
    r = Rig(HeldAnswers(), address, channel, stream)
    if serving:
        await r.start_server()
    try:
        yield r
    finally:
        await stream.close()
        await channel.close()
        if r.server is not None:
            await r.server.stop(None)


def _request(txid: str, sql_bytes: int = 10) -> pb.PrepareRequest:
    return pb.PrepareRequest(transaction_id=txid, statements=[{"sql": "x" * sql_bytes}])


def run(test: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


def test_answers_reach_their_own_callers_in_any_order() -> None:
    async def test() -> None:
        async with rig() as r:
            servicer, stream = r.servicer, r.stream
            calls = [asyncio.ensure_future(stream.prepare(_request(f"t{i}"))) for i in range(6)]
            wait = 0.0
            while sum(map(len, servicer.messages)) < 6 and wait < 30:
                await asyncio.sleep(0.01)
                wait += 0.01
            for i in reversed(range(6)):  # answered last to first
                servicer.gate(f"t{i}").set()
                answer = await calls[i]
                assert answer.response.reason == f"t{i}"
            # Queued together behind the first write, the rest shared messages.
            assert len(servicer.messages) < 6, servicer.messages
            assert servicer.calls == 1
            assert stream.stats["prepare_items"] == 6

    run(test)


def test_a_prepare_given_up_leaves_nothing_behind_and_its_late_answer_is_dropped() -> None:
    async def test() -> None:
        async with rig() as r:
            servicer, stream = r.servicer, r.stream
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(stream.prepare(_request("slow")), 0.2)
            servicer.gate("slow").set()  # its answer comes now, and nobody waits for it
            servicer.gate("next").set()
            answer = await stream.prepare(_request("next"))
            assert answer.response.reason == "next"
            assert not stream._waiting  # nothing left behind

    run(test)


def test_a_broken_call_fails_every_prepare_on_it_and_the_next_opens_a_new_one() -> None:
    async def test() -> None:
        async with rig() as r:
            servicer, stream = r.servicer, r.stream
            calls = [asyncio.ensure_future(stream.prepare(_request(f"b{i}"))) for i in range(4)]
            wait = 0.0
            while sum(map(len, servicer.messages)) < 4 and wait < 30:
                await asyncio.sleep(0.01)
                wait += 0.01
            assert r.server is not None
            await r.server.stop(None)  # the agent goes away with four Prepares unanswered
            for call in calls:
                with pytest.raises(CallBroken) as broken:
                    await call
                assert broken.value.code in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.CANCELLED,
                ), broken.value
            await r.start_server()
            servicer.gate("after").set()
            answer = await stream.prepare(_request("after"))
            assert answer.response.reason == "after"
            assert servicer.calls == 2

    run(test)


def test_messages_stay_within_the_size_limit_and_an_oversized_prepare_fails_alone() -> None:
    async def test() -> None:
        limit = 64 * 1024
        async with rig(3, limit) as r:
            servicer, stream = r.servicer, r.stream
            with pytest.raises(CallBroken) as too_big:
                await stream.prepare(_request("huge", limit))
            assert too_big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            for i in range(10):
                servicer.gate(f"m{i}").set()
            answers = await asyncio.gather(
                *(stream.prepare(_request(f"m{i}", 20_000)) for i in range(10))
            )
            assert [a.response.reason for a in answers] == [f"m{i}" for i in range(10)]
            # 20 kB each under a 64 kB limit and at most 3 a message: never more than 3.
            assert all(len(m) <= 3 for m in servicer.messages), servicer.messages
            assert "huge" not in {t for m in servicer.messages for t in m}

    run(test)


def test_an_agent_killed_with_prepares_in_flight_on_its_call(make_system: SystemFactory) -> None:
    """Eight transactions have their Prepares on one agent's call when the agent is
    killed: each gets an outcome (none hangs), each is applied on both shards or on
    neither, and once the agent is back the next transaction commits over a new call."""
    system = make_system(["--prepare-timeout", "20"], ["--allow-failpoints"])
    create_tagged_rows(system)
    agent = system.participants["shard2"]
    agent.set_failpoints("participant.before_prepare=hang")
    outcomes: list[Outcome | BaseException] = []
    with (
        system.client(timeout=60) as client,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        tags = [f"killed-{i}" for i in range(8)]
        futures = [
            pool.submit(client.run, tagged_inserts(tag, ("shard1", "shard2"))) for tag in tags
        ]
        wait_until(
            lambda: client.status().counters.get("prepare_items.shard2", 0) >= 8,
            30,
            "eight Prepares written to shard2's call",
        )
        agent.kill()
        for future in futures:
            try:
                outcomes.append(future.result(timeout=60))
            except Exception as exc:  # an outcome unknown to the client is allowed
                outcomes.append(exc)
        agent.start()
        for tag in tags:
            wait_until(
                lambda: len(set(rows(system, tag).values())) == 1,  # noqa: B023
                60,
                f"{tag} applied on both shards or neither",
            )
            applied = rows(system, tag)
            assert applied["shard1"] == applied["shard2"], (tag, applied)
            assert applied["shard3"] == 0
        for outcome in outcomes:
            if isinstance(outcome, Outcome):
                assert not outcome.committed  # the vote never came
        after = client.run(
            tagged_inserts("after-kill", ("shard1", "shard2")), wait_for_completion=True
        )
        assert after.committed
    assert rows(system, "after-kill") == {"shard1": 1, "shard2": 1, "shard3": 0}


def test_unary_prepares_still_work_and_use_no_stream(make_system: SystemFactory) -> None:
    system = make_system(["--prepare-calls", "unary"])
    create_tagged_rows(system)
    with system.client(timeout=60) as client:
        for i in range(3):
            assert client.run(tagged_inserts(f"unary-{i}", ("shard1", "shard2"))).committed
        counters = client.status().counters
    assert not any(k.startswith("prepare_items") for k in counters), counters
    streamed = make_system()
    create_tagged_rows(streamed)
    with streamed.client(timeout=60) as client:
        assert client.run(tagged_inserts("streamed", ("shard1", "shard2"))).committed
        counters = client.status().counters
    assert counters.get("prepare_items.shard1") == 1, counters


def test_a_prepare_given_up_before_it_was_written_is_never_written() -> None:
    """While the agent cannot be reached the first write waits (wait_for_ready); a
    Prepare queued behind it and given up is dropped, not sent once the agent is up."""

    async def test() -> None:
        async with rig(serving=False) as r:
            servicer, stream = r.servicer, r.stream
            for txid in ("first", "given-up"):
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(stream.prepare(_request(txid)), 0.3)
            await r.start_server()
            servicer.gate("later").set()
            assert (await stream.prepare(_request("later"))).response.reason == "later"
            sent = {t for m in servicer.messages for t in m}
            assert "given-up" not in sent and "later" in sent, servicer.messages

    run(test)


class UnaryOnly(pgrpc.ParticipantServicer):
    """An agent from before PrepareStream: the generated base answers UNIMPLEMENTED."""

    async def Prepare(self, request: pb.PrepareRequest, context: Any) -> pb.PrepareResponse:
        return pb.PrepareResponse(vote=pb.YES, reason=f"unary {request.transaction_id}")


def test_an_agent_without_prepare_stream_gets_unary_prepares() -> None:
    async def test() -> None:
        server = grpc.aio.server()
        pgrpc.add_ParticipantServicer_to_server(UnaryOnly(), server)
        address = f"127.0.0.1:{free_port()}"
        server.add_insecure_port(address)
        await server.start()
        client = ParticipantClient("old", address, 5.0, 1 << 20, tls=TlsConfig())
        try:
            for txid in ("t1", "t2"):
                reply = await client.prepare(txid, (), False, 5.0)
                assert reply.ballot.vote is Vote.YES, reply
                assert reply.ballot.reason == f"unary {txid}"
            assert client.stats["prepare_streams"] == 1  # tried once, then unary for good
        finally:
            await client.close()
            await server.stop(None)

    run(test)
