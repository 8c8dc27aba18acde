"""Ray Serve's own floor for one small unary call on this machine, apart from anything of ours.

`python -m benchmarks.serve_floor [--out FILE] [--calls N] [--config FILE]`: for the Serve settings the service
ships (every RAY_SERVE_* variable of serve-config.yaml's runtime_env: the throughput bundle with direct ingress
off, the proxy's calls over gRPC) and with Serve's direct ingress on, a trivial ingress
deployment behind Serve's gRPC port (one hop) and one that awaits a second trivial deployment (two hops, as the
proxy -> router -> model path), N sequential Embed calls each: p50/p90 milliseconds. A third shape is the two
hops as the service makes its second one: a ShardRequest of one text to the model deployment's method, routed by
the service's request router, answered with a ShardResult of one 384-float vector; what it takes over the plain
two hops is what the service's messages and routing add to Serve's. Each setting runs in a process of its own,
since Serve reads these variables when it is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHIPPED = "shipped (serve-config.yaml's RAY_SERVE_* settings)"
SERVICER = "embedding_client.v1.embedding_pb2_grpc.add_EmbedServiceServicer_to_server"


def _one_setting(calls: int) -> dict:
    import grpc
    import numpy as np
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig, gRPCOptions

    from embedding_client.v1 import embedding_pb2 as pb
    from embedding_client.v1 import embedding_pb2_grpc as pbg
    from embedding_service.router.replica_routing import HealthyNodeRequestRouter
    from embedding_service.wire.deadline import Deadline
    from embedding_service.wire.messages import EmbedOptions, ShardRequest, ShardResult

    @serve.deployment
    class Leaf:
        async def __call__(self, n: int) -> int:
            return n

    @serve.deployment
    class OneHop:
        async def Embed(self, request):
            return pb.EmbedResponse(model=request.model)

    @serve.deployment
    class TwoHops:
        def __init__(self, leaf) -> None:
            self.leaf = leaf

        async def Embed(self, request):
            await self.leaf.remote(1)
            return pb.EmbedResponse(model=request.model)

    @serve.deployment(request_router_config=RequestRouterConfig(request_router_class=HealthyNodeRequestRouter))
    class ShardLeaf:
        async def embed(self, request: ShardRequest) -> ShardResult:
            n = len(request.inputs)
            return ShardResult(vectors=np.zeros((n, 384), np.float32), token_counts=np.full(n, 3, np.int64))

    @serve.deployment
    class TwoHopsShard:
        def __init__(self, leaf) -> None:
            self.leaf = leaf

        async def Embed(self, request):
            shard = ShardRequest([request.inputs[0].text], EmbedOptions(), deadline=Deadline.after(30))
            await self.leaf.embed.remote(shard)
            return pb.EmbedResponse(model=request.model)

    def measure() -> dict:
        with grpc.insecure_channel("127.0.0.1:9000") as channel:
            stub = pbg.EmbedServiceStub(channel)
            request = pb.EmbedRequest(model="m", inputs=[pb.EmbedInput(text="hello")])
            for _ in range(30):
                stub.Embed(request, timeout=30)
            ms = []
            for _ in range(calls):
                started = time.perf_counter()
                stub.Embed(request, timeout=30)
                ms.append((time.perf_counter() - started) * 1000)
        ms.sort()
        return {"p50_ms": round(ms[len(ms) // 2], 2), "p90_ms": round(ms[int(len(ms) * 0.9)], 2)}

    env = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        serve.start(grpc_options=gRPCOptions(port=9000, grpc_servicer_functions=[SERVICER]))
        serve.run(OneHop.bind(), name="floor", route_prefix="/")
        one = measure()
        serve.run(TwoHops.bind(Leaf.bind()), name="floor", route_prefix="/")
        two = measure()
        serve.run(TwoHopsShard.bind(ShardLeaf.bind()), name="floor", route_prefix="/")
        shard = measure()
        serve.shutdown()
    finally:
        ray.shutdown()
    return {"one_hop": one, "two_hops": two, "two_hops_shard_messages": shard}


def settings(config: str | None) -> dict[str, dict[str, str]]:
    """Setting name -> Serve's variables: the service's own, read from its config file (so the floor is the
    path the service ships), and the same with Serve's direct ingress on."""
    from embedding_service.ops.servefile import ServeFile

    shipped = {k: v for k, v in ServeFile.load(config).app_env.items() if k.startswith("RAY_SERVE_")}
    return {SHIPPED: shipped, "direct ingress": {**shipped, "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--config", help="the service's config file (default: serve-config.yaml)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_one_setting(args.calls)))
        return 0
    results = {}
    chosen = settings(args.config)
    # Only each setting's Serve variables: none inherited from the caller's environment.
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    for name, env in chosen.items():
        child = subprocess.run([sys.executable, "-m", "benchmarks.serve_floor", "--child", "--calls", str(args.calls)],
                               env={**base, **env}, capture_output=True, text=True, timeout=600, check=True)
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{name}: one hop p50 {results[name]['one_hop']['p50_ms']} ms, "
              f"two hops p50 {results[name]['two_hops']['p50_ms']} ms, "
              f"two hops with the shard messages p50 {results[name]['two_hops_shard_messages']['p50_ms']} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"calls": args.calls, "cpu": _cpu(), "settings": chosen, "results": results}, f, indent=1)
    return 0


def _cpu() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0]} x{len(names)}" if names else "unknown"


if __name__ == "__main__":
    sys.exit(main())
