"""Serving overhead of one job through the whole service: `/run` end to end minus the worker's own
inference time, one client at a time, tiny model (so inference is a few milliseconds and the service's
own hops show). Reuses bench_serve.py's process handling; prints a Markdown table."""

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_serve  # noqa: E402


def p(values, q):
    return bench_serve.percentile(values, q)


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--worker", required=True)
    a.add_argument("--gateway", required=True)
    a.add_argument("--model", required=True, help="tiny checkpoint (written with init-tiny-model if missing)")
    a.add_argument("--requests", type=int, default=200)
    a.add_argument("--tokens", type=int, default=8)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--namespace", default=f"overhead{os.getpid()}")
    a.add_argument("--port", type=int, default=18091)
    a.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    a.add_argument("--redis-url", default="redis://127.0.0.1:6379/")
    a.add_argument("--worker-args", default="")
    a.add_argument("--log-dir", default=os.path.join(os.path.dirname(__file__), "..", "target", "bench-overhead-logs"))
    a.add_argument("--command", default="scripts/bench-overhead.sh")
    args = a.parse_args()
    # What bench_serve.Service reads from its arguments.
    args.no_notices, args.poll_ms, args.job_timeout, args.ready_timeout = False, 1000, 120, 300
    if not os.path.exists(os.path.join(args.model, "config.json")):
        subprocess.run([args.worker, "init-tiny-model", args.model], check=True, stdout=subprocess.DEVNULL)

    svc = bench_serve.Service(args)
    body = {"prompt": "Hello there, how are you", "parameters": {
        "strategy": "greedy", "max_new_tokens": args.tokens, "min_new_tokens": args.tokens}}
    try:
        svc.start_gateway()
        svc.start_worker("overhead", 8)
        for _ in range(20):  # warm-up: connections, allocator, caches
            svc.http.request("POST", "/run", body, timeout=30)
        runs = []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            status, _ = svc.http.request("POST", "/run", body, timeout=30)
            runs.append((time.perf_counter() - t0) * 1e3)
            if status != 200:
                raise SystemExit(f"/run answered {status}")
        inference, polled = [], []
        for _ in range(args.requests):
            r = svc.run_job(body)
            inference.append(float(r["record"]["timings"]["inference_ms"]))
            polled.append((r["t1"] - r["t0"]) * 1e3)
    finally:
        svc.stop()
    run50, inf50 = p(runs, 50), p(inference, 50)
    print(f"Machine: {bench_serve.cpu_model()}, nproc {bench_serve.nproc()}; tiny GPT-J, greedy, "
          f"{args.tokens} new tokens, {args.threads} thread(s), one client, {args.requests} requests each.\n")
    print(f"Command: `{args.command}`\n")
    print("| measure | p50 ms | p90 ms | mean ms |")
    print("|---|---:|---:|---:|")
    print(f"| `/run`, client side | {run50:.2f} | {p(runs, 90):.2f} | {statistics.mean(runs):.2f} |")
    print(f"| worker `inference_ms` (engine receives the job → answer) | {inf50:.2f} | {p(inference, 90):.2f} | "
          f"{statistics.mean(inference):.2f} |")
    print(f"| submit → completion notice (`POST /v1/jobs`, Redis `done`) | {p(polled, 50):.2f} | {p(polled, 90):.2f} | "
          f"{statistics.mean(polled):.2f} |")
    print(f"\n**Serving overhead** (p50 `/run` − p50 inference): **{run50 - inf50:.2f} ms**")


if __name__ == "__main__":
    main()
