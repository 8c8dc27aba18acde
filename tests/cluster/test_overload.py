"""More calls than the service can take, and callers who leave: every call is served or told to retry
(RESOURCE_EXHAUSTED with a RetryInfo delay, 429 with Retry-After), never CANCELLED or 502; work for a
caller past its deadline is dropped, not computed.

What makes the model busy and the service full is observed, not timed: blocker calls are added until every model
replica has started on them; the proxy's queue of calls waiting to leave merged (args.proxy.max_queued_calls) is
filled call by call, and a call refused shows it full. Whether work for a caller was computed after its deadline is
read from the model's own spans, on the clock the test's deadlines come from."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import secrets
import time
from collections.abc import AsyncIterator

import grpc
import httpx

from embedding_client.errors import read_details
from embedding_client.v1 import embedding_pb2 as pb
from embedding_client.v1 import embedding_pb2_grpc
from embedding_service.wire.reasons import Reason
from tests.helpers.gateways import gateway_process
from tests.helpers.models import MINILM
from tests.helpers.observe import scrape, settled, total
from tests.helpers.session import METRICS_REPORT_MS, PROXY_MAX_QUEUED_CALLS, ROUTER_ONGOING

# Past gRPC core's default backlog (1,000 calls not yet taken by the proxy), where it used to cancel calls.
BURST = 3000
# Far past the few seconds a burst takes to be served or refused: a call still unanswered at this deadline waited in
# a queue the service bounds (Serve's router backing off to 0.5 s between placements once left 165-401 of them so).
BURST_DEADLINE_S = 60
REST_BURST = 200
# Short-deadline calls of 16 inputs.
SMALL_CALLS = 48
FORWARDED = "ray_embedding_sequences_forwarded_total"
QUEUE_DEPTH = "ray_embedding_queue_depth"
DROPPED = "ray_embedding_sequences_dropped_total"
ROUTER_DROPPED = "ray_embedding_router_inputs_dropped_total"
PROXY_DROPPED = "ray_embedding_proxy_inputs_dropped_total"
SETTLE_S = 2 * METRICS_REPORT_MS / 1000
# Blockers: one-shard calls (32 inputs of about 40 tokens), each with a Matryoshka width of its own so that none merge
# in the proxy or the router. Serve sends each to the replica with fewer calls running, so a wave of them is split
# between the replicas; a replica runs what has queued in batches of up to 128 sequences (model.max_batch_size).
BLOCKER_INPUTS, BATCH, REPLICAS = 32, 128, 2
TEXT = " ".join(["retrieval"] * 40)
WAVE, MAX_WAVES = 24, 4
# The short calls' deadline, and how much later than it the deadline may reach a replica (each hop loses its transit
# time, wire/deadline.py).
SHORT_DEADLINE_S, TRANSIT_S = 0.3, 0.05
# How long one of saturated()'s calls out keeps a replica, at least, and its fewest and most windows (below the
# model's max_windows, 128). Its text is a word of one token and two characters with its space, so that the most
# windows stay within the service's bound on an input's characters: 223 x 120 x 2 = 53,520 of 100,000 (with a word
# of 10, 45 windows were refused INVALID_ARGUMENT on a machine that ran 9 in 0.3 s, and nothing held the queue).
HOLD_S, MIN_WINDOWS, MAX_WINDOWS = 1.5, 20, 120
WORD = "a"
# A key of the proxy's merging holds at most 31 one-input calls waiting (32 leave at once, merged): these many keys
# hold more than the proxy's queue bound, three of them to spare.
HELD_KEYS = math.ceil(PROXY_MAX_QUEUED_CALLS / 30) + 3


def one(text: str, dimensions: int | None = None) -> pb.EmbedRequest:
    return pb.EmbedRequest(inputs=[pb.EmbedInput(text=text)], dimensions=dimensions)


def unmergeable(i: int) -> int:
    """A Matryoshka width of its own for call i among its neighbours. Identical small calls leave the proxy 32 to
    a call (a burst of 3,000 is then about 94 calls, within the router's bounds, and all are served); calls that
    differ in dimensions never merge, so a burst of them reaches the router's bounds as calls."""
    return 16 + i % 360


def refusal(err: grpc.aio.AioRpcError) -> tuple[tuple[str, str | None], float | None]:
    details = read_details(err.trailing_metadata(), err.details() or "")
    return (err.code().name, details.reason), details.retry_after_s


def queued() -> dict[str, float]:
    """Sequences waiting in each MiniLM replica's batcher, as Ray last reported them."""
    return {s.labels["replica"]: s.value for s in scrape() if s.name == QUEUE_DEPTH and s.labels.get("model") == MINILM}


@contextlib.asynccontextmanager
async def model_busy(stub, finish: bool = False) -> AsyncIterator[list]:
    """The model busy: waves of blocker calls until a replica, as Ray last reported, has a full batch of them waiting
    behind the one it runs (Serve splits a wave between the replicas by the calls each runs, and sends later calls
    alike), so a call sent now waits at least a batch's time there.
    Yields the scrape taken before. On leaving, the blockers finish, or (not `finish`) are cancelled (a replica drops
    those still queued, counted) and the batches already running are waited out; the forwards are reported: the
    model is idle again."""
    before = await asyncio.to_thread(settled, FORWARDED, SETTLE_S, model=MINILM)
    blockers: list[asyncio.Future] = []

    def wave() -> None:
        for _ in range(WAVE):
            k = len(blockers)
            blockers.append(asyncio.ensure_future(stub.Embed(pb.EmbedRequest(
                inputs=[pb.EmbedInput(text=f"blocker {k} {i} {TEXT}") for i in range(BLOCKER_INPUTS)],
                dimensions=384 - k), timeout=300)))

    try:
        for _ in range(MAX_WAVES):
            wave()
            waves_sent = time.monotonic()
            while time.monotonic() - waves_sent < 10:
                depths = await asyncio.to_thread(queued)
                if depths and max(depths.values()) >= BATCH:
                    break
                await asyncio.sleep(0.2)
            else:
                continue
            break
        else:
            failed = collections.Counter(repr(c.exception())[:200] for c in blockers if c.done() and c.exception())
            raise AssertionError(f"{MAX_WAVES} waves of blockers never queued a batch at a replica: {depths}; "
                                 f"{sum(c.done() for c in blockers)} of {len(blockers)} done, failed: {dict(failed)}")
        yield before
    finally:
        if not finish:
            for c in blockers:
                c.cancel()
        await asyncio.gather(*blockers, return_exceptions=True)
        # A call to each replica (Serve sends each to the one with fewer running) waits out the batch it runs.
        await asyncio.gather(*(stub.Embed(one(f"after the blockers {i}", 8 + i), timeout=120)
                               for i in range(2 * REPLICAS)))
        await asyncio.to_thread(settled, FORWARDED, SETTLE_S, model=MINILM)


def windowed(text: str, dimensions: int) -> pb.EmbedRequest:
    """One input embedded whole in token windows (truncation WINDOWS: all-MiniLM-L6-v2's are 254 tokens, 223 apart)."""
    return pb.EmbedRequest(inputs=[pb.EmbedInput(text=text)], truncation=pb.TRUNCATION_POLICY_WINDOWS,
                           dimensions=dimensions)


@contextlib.asynccontextmanager
async def saturated(stub, max_chars: int) -> AsyncIterator[None]:
    """The proxy's queue of calls waiting to leave merged full: HELD_KEYS keys (Matryoshka widths) each with a call out
    that keeps the model a second or more (one long input in windows, sized from how long a short one takes here: at
    most one runs on each replica at a time, the rest wait behind) and 30 one-input calls waiting for it, more than
    the queue holds. Entered once one of them is refused OVERLOADED: the queue is full, and stays so while the calls
    out run (a burst's first calls come within milliseconds of that; later ones may find room). On leaving, all of
    them are cancelled and the batches already running waited out."""
    await asyncio.to_thread(settled, FORWARDED, SETTLE_S, model=MINILM)  # the model idle: what it takes alone
    took = []
    for _ in range(2):
        started = time.monotonic()
        await stub.Embed(windowed(" ".join([WORD] * 2000), 383), timeout=120)  # 9 windows
        took.append(time.monotonic() - started)
    windows = max(MIN_WINDOWS, min(MAX_WINDOWS, math.ceil(9 * HOLD_S / min(took))))
    text = " ".join([WORD] * (223 * windows))
    assert len(text) <= max_chars, (len(text), max_chars)
    held = [asyncio.ensure_future(stub.Embed(windowed(text, unmergeable(key)), timeout=300))
            for key in range(HELD_KEYS)]
    waiting = [asyncio.ensure_future(stub.Embed(pb.EmbedRequest(
        inputs=[pb.EmbedInput(text=f"held {key} {n}")], truncation=pb.TRUNCATION_POLICY_WINDOWS,
        dimensions=unmergeable(key)), timeout=300)) for key in range(HELD_KEYS) for n in range(30)]

    def outcome(call: asyncio.Future) -> str:
        err = call.exception()
        return "OK" if err is None else f"{err.code().name} {err.details()}" if isinstance(err, grpc.RpcError) \
            else repr(err)

    def refused() -> bool:
        return any(c.done() and isinstance(c.exception(), grpc.aio.AioRpcError) and refusal(c.exception())[0]
                   == ("RESOURCE_EXHAUSTED", Reason.OVERLOADED.name) for c in waiting)

    try:
        while not refused():
            pending = [c for c in held + waiting if not c.done()]
            assert pending, f"the proxy's queue never filled: calls out of {windows} windows (9 took {took} s); " \
                f"the calls out: {collections.Counter(outcome(c) for c in held)}, the calls waiting: " \
                f"{collections.Counter(outcome(c) for c in waiting)}"
            await asyncio.wait(pending, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        yield
    finally:
        for c in held + waiting:
            c.cancel()
        await asyncio.gather(*held, *waiting, return_exceptions=True)
        # A call to each replica (Serve sends each to the one with fewer running) waits out the batch it runs.
        await asyncio.gather(*(stub.Embed(one(f"after the held calls {i}", 8 + i), timeout=120)
                               for i in range(2 * REPLICAS)))
        await asyncio.to_thread(settled, FORWARDED, SETTLE_S, model=MINILM)


def test_a_grpc_burst_past_the_queue_bounds_is_served_or_told_when_to_retry(service):
    """3,000 calls at once, past gRPC's backlog, each served or refused with a retry delay, never cancelled or lost:
    into a full service (its first calls refused), and into an idle one (its first ROUTER_ONGOING served)."""
    async def burst(stub) -> tuple[collections.Counter, list]:
        outcomes: collections.Counter = collections.Counter()
        hints: list = []

        async def call(i: int) -> None:
            try:
                await stub.Embed(one(f"burst sentence {i}", unmergeable(i)), timeout=BURST_DEADLINE_S)
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as err:
                outcome, hint = refusal(err)
                outcomes[outcome] += 1
                hints.append(hint)

        await asyncio.gather(*(call(i) for i in range(BURST)))
        return outcomes, hints

    async def run() -> list[tuple[collections.Counter, list, float]]:
        async with grpc.aio.insecure_channel(service.target) as channel:
            stub = embedding_pb2_grpc.EmbedServiceStub(channel)
            await stub.Embed(one("warm up"), timeout=60)
            results = []
            async with saturated(stub, service.config.args.limits.max_chars_per_input):
                started = time.monotonic()
                results.append((*await burst(stub), time.monotonic() - started))
            started = time.monotonic()
            results.append((*await burst(stub), time.monotonic() - started))
            return results

    (full, full_hints, full_s), (idle, idle_hints, idle_s) = asyncio.run(run())
    overloaded = ("RESOURCE_EXHAUSTED", Reason.OVERLOADED.name)
    print(f"burst of {BURST} into a full service: {dict(full)} in {full_s:.1f} s; into an idle one: {dict(idle)} "
          f"in {idle_s:.1f} s")
    for outcomes in (full, idle):
        assert set(outcomes) <= {"OK", overloaded} and sum(outcomes.values()) == BURST, outcomes
    assert full[overloaded] >= 1, full
    assert idle["OK"] >= ROUTER_ONGOING, idle
    assert all(h is not None and h > 0 for h in full_hints + idle_hints), "every refusal says when to retry"
    # The service is whole afterwards.
    assert service.stub.Embed(one("after the burst"), timeout=60).embeddings


def test_a_rest_burst_through_the_gateway_is_200_or_429_with_retry_after(service):
    """Into a full service, each REST call of a burst is 200 or 429 with Retry-After (never 502 or 503), its first
    ones 429; once it has room again, the same gateway serves."""
    async def run(base: str) -> tuple[list[tuple[int, str | None]], int]:
        async with grpc.aio.insecure_channel(service.target) as channel:
            stub = embedding_pb2_grpc.EmbedServiceStub(channel)
            limits = httpx.Limits(max_connections=REST_BURST, max_keepalive_connections=REST_BURST)
            async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
                async def call(i: int) -> tuple[int, str | None]:
                    r = await client.post("/v1/embeddings", json={"model": MINILM, "input": f"rest burst {i}",
                                                                  "dimensions": unmergeable(i)})
                    return r.status_code, r.headers.get("retry-after")

                async with saturated(stub, service.config.args.limits.max_chars_per_input):
                    results = await asyncio.gather(*(call(i) for i in range(REST_BURST)))
                after, _ = await call(REST_BURST)
        return results, after

    # The gateway as its own process, with no retries, coalescing off: the caller sees every refusal itself.
    with gateway_process("--targets", service.target, "--max-retries", "0", "--call-timeout-s", "120",
                         "--request-timeout-s", "120", "--coalesce-max-in-flight", "0") as (base, _):
        results, after = asyncio.run(run(base))
    statuses = collections.Counter(status for status, _ in results)
    print(f"REST burst of {REST_BURST} into a full service: {dict(statuses)}")
    assert set(statuses) <= {200, 429} and statuses[429] >= 1, statuses
    assert all(int(retry) >= 1 for status, retry in results if status == 429), "every refusal says when to retry"
    assert after == 200, "served once the service had room again"


def test_calls_past_their_deadline_are_dropped_not_computed(service):
    """Short-deadline calls queue behind the blockers' batches: those that time out waiting are dropped where they
    wait (in the proxy, the router or at a replica, and counted there), never run through the model afterwards. Each
    short call has a trace of its own; the model's `forward` spans say when each batch started, on this machine's
    clock, which the short calls' deadlines come from."""
    traces = [secrets.token_hex(16) for _ in range(SMALL_CALLS)]

    async def run() -> tuple[list, collections.Counter, float]:
        async with grpc.aio.insecure_channel(service.target) as channel:
            stub = embedding_pb2_grpc.EmbedServiceStub(channel)
            async with model_busy(stub, finish=True) as before:
                async def small(i: int) -> str:
                    request = pb.EmbedRequest(inputs=[pb.EmbedInput(text=f"short {i} {j}") for j in range(16)])
                    metadata = (("traceparent", f"00-{traces[i]}-{secrets.token_hex(8)}-01"),)
                    try:
                        await stub.Embed(request, timeout=SHORT_DEADLINE_S, metadata=metadata)
                        return "OK"
                    except grpc.aio.AioRpcError as err:
                        return err.code().name

                sent = time.time()
                outcomes = collections.Counter(await asyncio.gather(*(small(i) for i in range(SMALL_CALLS))))
            # The blockers done, the model idle again: every batch a short call could have been in has ended, its span
            # sent; every drop counted, and only the short calls' (no blocker was cancelled).
            return before, outcomes, sent

    before, outcomes, sent = asyncio.run(run())
    assert set(outcomes) <= {"DEADLINE_EXCEEDED", "OK"} and outcomes["DEADLINE_EXCEEDED"] >= 1, outcomes
    after = scrape()  # model_busy settled the forwarded count as it ended

    def delta(name: str, **labels: str) -> float:
        return total(name, after, **labels) - total(name, before, **labels)

    # A merged call (in the proxy or the router) runs in its first caller's trace: any short input that ran shows
    # as a `forward` span in some short call's trace.
    last_deadline_ns = int((sent + SHORT_DEADLINE_S + TRANSIT_S) * 1e9) + 10 ** 8  # + the sends' spread, 0.1 s
    late = [s for trace in traces for s in service.traces.spans(trace)
            if s.name == "forward" and s.start_ns > last_deadline_ns]
    dropped = {"at the replicas": delta(DROPPED, model=MINILM), "in the router": delta(ROUTER_DROPPED, model=MINILM),
               "in the proxy": delta(PROXY_DROPPED)}
    print(f"short calls {dict(outcomes)}; forwarded {delta(FORWARDED, model=MINILM):.0f}; dropped {dropped}")
    assert not late, f"{len(late)} batches of short calls started after their callers' deadline"
    # Counted where they waited, once (a call Serve cancels before it reaches the service's code is not counted).
    assert 0 < sum(dropped.values()) <= outcomes["DEADLINE_EXCEEDED"] * 16
