"""More calls than the service can take, and callers who leave: every call is served or told to retry
(RESOURCE_EXHAUSTED with a RetryInfo delay, 429 with Retry-After), never CANCELLED or 502; work for a
caller past its deadline is dropped, not computed."""

from __future__ import annotations

import asyncio
import collections
import time

import grpc
import httpx

from embedding_client.errors import read_details
from embedding_client.v1 import embedding_pb2 as pb
from embedding_client.v1 import embedding_pb2_grpc
from embedding_service.wire.reasons import Reason
from tests.conftest import METRICS_REPORT_MS, MINILM, ROUTER_ONGOING, ROUTER_QUEUED
from tests.gateway_helpers import gateway_process
from tests.observe import scrape, settled, total, wait_until

# Past gRPC core's default backlog (1,000 calls not yet taken by the proxy), where it used to cancel calls.
BURST = 3000
# Far past the few seconds a burst takes to be served or refused: a call still unanswered at this deadline waited in
# a queue the service bounds (Serve's router backing off to 0.5 s between placements once left 165-401 of them so).
BURST_DEADLINE_S = 60
# Calls in the REST burst, more than the router's bounds hold while the model is busy.
REST_BURST = 800
FORWARDED = "ray_embedding_sequences_forwarded_total"
DROPPED = "ray_embedding_sequences_dropped_total"
ROUTER_DROPPED = "ray_embedding_router_inputs_dropped_total"
PROXY_DROPPED = "ray_embedding_proxy_inputs_dropped_total"


def one(text: str, dimensions: int | None = None) -> pb.EmbedRequest:
    return pb.EmbedRequest(inputs=[pb.EmbedInput(text=text)], dimensions=dimensions)


def unmergeable(i: int) -> int:
    """A Matryoshka width of its own for call i among its neighbours. Identical small calls leave the proxy 32 to
    a call (a burst of 3,000 is then about 94 calls, within the router's bounds, and all are served); calls that
    differ in dimensions never merge, so a burst of them reaches the router's bounds as calls."""
    return 16 + i % 360


async def busy_model(stub, inputs: list, before: list, started: int) -> asyncio.Future:
    """The long call `inputs`, once `started` of its inputs have been forwarded since the `before` scrape: the model
    is busy with it (forwards count as a batch starts). Observed, not slept."""
    blocker = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(inputs=inputs), timeout=300))
    await asyncio.to_thread(wait_until, lambda: total(FORWARDED, model=MINILM) - total(
        FORWARDED, before, model=MINILM) >= started, 120, "the model busy with the blocker")
    return blocker


def test_a_grpc_burst_past_the_queue_bounds_is_served_or_told_when_to_retry(service):
    async def burst() -> tuple[collections.Counter, list]:
        async with grpc.aio.insecure_channel(service.target) as channel:
            stub = embedding_pb2_grpc.EmbedServiceStub(channel)
            await stub.Embed(one("warm up"), timeout=60)
            outcomes: collections.Counter = collections.Counter()
            hints: list = []

            async def call(i: int) -> None:
                try:
                    await stub.Embed(one(f"burst sentence {i}", unmergeable(i)), timeout=BURST_DEADLINE_S)
                    outcomes["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    details = read_details(err.trailing_metadata(), err.details() or "")
                    outcomes[(err.code().name, details.reason)] += 1
                    hints.append(details.retry_after_s)

            await asyncio.gather(*(call(i) for i in range(BURST)))
            return outcomes, hints

    started = time.monotonic()
    outcomes, hints = asyncio.run(burst())
    assert set(outcomes) <= {"OK", ("RESOURCE_EXHAUSTED", Reason.OVERLOADED.name)}, outcomes
    assert outcomes[("RESOURCE_EXHAUSTED", "OVERLOADED")] > 0, "the burst never exceeded the bounds"
    assert outcomes["OK"] >= ROUTER_ONGOING + ROUTER_QUEUED
    assert hints and all(h is not None and h > 0 for h in hints), "every refusal says when to retry"
    assert sum(outcomes.values()) == BURST
    print(f"burst of {BURST}: {dict(outcomes)} in {time.monotonic() - started:.1f} s")
    # The service is whole afterwards.
    assert service.stub.Embed(one("after the burst"), timeout=60).embeddings


def test_a_rest_burst_through_the_gateway_is_200_or_429_with_retry_after(service):
    """The burst meets a model kept busy by a long call, so that it overfills the router's bounds (64 + 64 calls):
    an idle service now takes 800 such calls from one httpx client without refusing one (three bursts in a row
    were seen so; the client sends about 750 calls/s at most, docs/benchmarks.md)."""
    # 768 inputs of about 160 tokens: both replicas busy past the burst, 8 shards of 32 at a time (the router's
    # max_concurrent_shards), the next ones queued behind the burst's calls as earlier ones finish. It may run
    # into the service's request bound (45 s) on a slow machine; it is cancelled once the burst is answered.
    blocker_inputs = [pb.EmbedInput(text=f"{i} " + " ".join(["retrieval"] * 160)) for i in range(768)]

    async def burst(base: str) -> collections.Counter:
        before = await asyncio.to_thread(settled, FORWARDED, 2 * METRICS_REPORT_MS / 1000, model=MINILM)
        async with grpc.aio.insecure_channel(service.target) as channel:
            stub = embedding_pb2_grpc.EmbedServiceStub(channel)
            blocker = await busy_model(stub, blocker_inputs, before, 32)
            limits = httpx.Limits(max_connections=REST_BURST, max_keepalive_connections=REST_BURST)
            async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
                async def call(i: int) -> tuple[int, str | None]:
                    r = await client.post("/v1/embeddings", json={"model": MINILM, "input": f"rest burst {i}",
                                                                  "dimensions": unmergeable(i)})
                    return r.status_code, r.headers.get("retry-after")

                results = await asyncio.gather(*(call(i) for i in range(REST_BURST)))
            assert all(retry and int(retry) >= 1 for status, retry in results if status == 429)
            blocker.cancel()
            await asyncio.gather(blocker, return_exceptions=True)
        # Shards of the blocker already running when it was cancelled still finish: their forwards reported before
        # the next burst or test takes its baseline.
        await asyncio.to_thread(settled, FORWARDED, 2 * METRICS_REPORT_MS / 1000, model=MINILM)
        return collections.Counter(status for status, _ in results)

    # The gateway as its own process, with no retries: the caller sees every refusal itself. Its deadlines
    # outlast the burst: on 2 cores the replicas computing starve the proxy that refuses, for seconds.
    # Coalescing off, and calls that cannot merge in the proxy either (unmergeable): merged, the 800 calls are a
    # few dozen gRPC calls the service takes without refusing.
    with gateway_process("--targets", service.target, "--max-retries", "0", "--call-timeout-s", "120",
                         "--request-timeout-s", "120", "--coalesce-max-in-flight", "0") as (base, _):
        # On 2 cores the replicas computing also slow the calls' way in, so how many a burst gets refused still
        # varies (2 to 528 of 800 seen): each burst is checked, and a later one (at most three) must refuse.
        bursts = []
        while not bursts or (bursts[-1][429] == 0 and len(bursts) < 3):
            bursts.append(asyncio.run(burst(base)))
            assert set(bursts[-1]) <= {200, 429}, bursts
    assert bursts[-1][429] > 0 and sum(b[200] for b in bursts) > 0, bursts
    print(f"REST bursts of {REST_BURST} beside a long call: {[dict(b) for b in bursts]}")


def test_calls_past_their_deadline_are_dropped_not_computed(service):
    """The model is kept busy; short-deadline calls queue behind it, time out, and are never run."""
    before = settled(FORWARDED, 2 * METRICS_REPORT_MS / 1000, model=MINILM)  # earlier tests' forwards reported
    # 12 shards of 32 long inputs, more than the router sends at once (8): a replica that finishes its
    # share gets the next one, so both stay busy while the short calls wait.
    # 80 tokens each: the blocker itself within the service's request bound (45 s) on a slow 2-core CPU.
    blocker_inputs = [pb.EmbedInput(text=f"{i} " + " ".join(["retrieval"] * 80)) for i in range(384)]
    # A replica that runs out of blocker work may start batches of short calls (up to max_batch_size, 128
    # inputs each) still in time, and answer them late: legitimate, 0 to 288 inputs seen from the two replicas. The
    # short calls far outnumber that, so the bound below still tells dropping from computing everything (which
    # would put every timed-out input among the extra forwards).
    small_calls, small_size, small_deadline_s = 120, 16, 0.2

    async def run() -> tuple[object, collections.Counter]:
        async with grpc.aio.insecure_channel(service.target) as channel:
            stub = embedding_pb2_grpc.EmbedServiceStub(channel)
            # Half the blocker has started; the rest keeps both replicas busy for seconds, far past the short
            # calls' deadline.
            blocker = await busy_model(stub, blocker_inputs, before, len(blocker_inputs) // 2)

            async def small(i: int) -> str:
                request = pb.EmbedRequest(inputs=[pb.EmbedInput(text=f"short {i} {j}") for j in range(small_size)])
                try:
                    await stub.Embed(request, timeout=small_deadline_s)
                    return "OK"
                except grpc.aio.AioRpcError as err:
                    return err.code().name

            outcomes = collections.Counter(await asyncio.gather(*(small(i) for i in range(small_calls))))
            return await blocker, outcomes

    response, outcomes = asyncio.run(run())
    assert len(response.embeddings) == len(blocker_inputs)
    # A short call may still be answered in time (the blocker need not keep both replicas busy); most time out.
    assert set(outcomes) <= {"DEADLINE_EXCEEDED", "OK"} and outcomes["DEADLINE_EXCEEDED"] >= small_calls // 2, outcomes
    answered = outcomes["OK"] * small_size
    timed_out = outcomes["DEADLINE_EXCEEDED"] * small_size

    def forwarded() -> float:
        return total(FORWARDED, model=MINILM) - total(FORWARDED, before, model=MINILM)

    # Forwards are counted before they run: once the blocker's last batch shows, every forward of a
    # short call (all long expired) would show too.
    wait_until(lambda: forwarded() >= len(blocker_inputs) + answered, 30, "the answered calls' forwards reported")
    extra = forwarded() - len(blocker_inputs) - answered
    def dropped() -> tuple[float, float, float]:
        samples = scrape()
        return (total(DROPPED, samples, model=MINILM) - total(DROPPED, before, model=MINILM),
                total(ROUTER_DROPPED, samples, model=MINILM) - total(ROUTER_DROPPED, before, model=MINILM),
                total(PROXY_DROPPED, samples) - total(PROXY_DROPPED, before))

    # Without the drops every timed-out input would be forwarded in the end. With them, they are dropped where
    # they wait: in the proxy (calls queued to leave merged), in the router (to be coalesced) or at a replica;
    # a few may start in time on a replica that ran out of blocker work, and answer late. Calls still queued in
    # Serve for a router or a replica when their caller leaves are cancelled by Serve itself, uncounted here:
    # 34-85% of the timed-out inputs were counted. (Counted as Ray reports each process's metrics.)
    try:
        wait_until(lambda: sum(dropped()) >= 0.25 * timed_out, 10, "the timed-out inputs counted as dropped")
    finally:
        at_replicas, in_router, in_proxy = dropped()
        print(f"short calls: {timed_out} inputs timed out, {answered} answered; forwarded beyond those answered: "
              f"{extra:.0f}; dropped at the replicas: {at_replicas:.0f}, in the router: {in_router:.0f}, in the "
              f"proxy: {in_proxy:.0f}")
    assert extra <= 0.25 * timed_out, "work for callers who had left was computed"
