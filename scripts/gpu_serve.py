"""The service-level run of scripts/gpu-check.sh (run that, not this): what a user of the whole service sees.

Jobs go through a running gateway (its OpenAI route, streamed, with our decoding extensions) to one worker.
For each concurrency N and each mix, N jobs of the same prompt arrive STAGGER ms apart (so most join a
batch that is already decoding, the case continuous batching is for) and each asks NEW tokens; the client
clocks every job: submission, the first streamed text (time to first token), the end of the stream.

  greedy  every job greedy
  mixed   6 greedy : 3 seeded sampling : 1 contrastive search (penalty_alpha 0.6, top_k 4), interleaved

Per phase: generated tokens over the phase's wall time (first submission to last end), TTFT p50/p99, and
inter-token latency p50/p99 over jobs, each job's being (end - first text) / (tokens - 1): streaming
coalesces tokens into chunks, so a job's mean gap is what its client can measure. EOS is not masked (no
min_tokens): a job that ends early counts the tokens it got. The worker's own split of its steps comes
from its Prometheus metrics, read before and after each phase (`worker_step_duration_seconds`,
`worker_step_phase_seconds{phase}`).

Writes one JSON document (OUT) and prints a line per phase to stderr. Only the standard library: it runs
with any python3.
"""

import argparse
import json
import re
import sys
import time
import urllib.request

from bench_serve import Http, openai_phase, percentile

PHASES = ("prefill", "select", "forward", "maintenance")


def log(msg):
    print(f"--- {msg}", file=sys.stderr, flush=True)


def scrape(url):
    """The worker's step histograms: {name: (sum, count)} for the step and each phase; {} if unreadable."""
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(worker_step_duration_seconds|worker_step_phase_seconds)_(sum|count)(\{[^}]*\})? (\S+)$',
                     line)
        if not m:
            continue
        name, kind, labels, value = m.groups()
        phase = re.search(r'phase="([^"]+)"', labels or "")
        key = phase.group(1) if phase else "step"
        total, count = out.get(key, (0.0, 0.0))
        out[key] = (total + float(value), count) if kind == "sum" else (total, count + float(value))
    return out


def step_split(before, after):
    """Mean milliseconds a step, and each phase's, between two scrapes."""
    res = {}
    for key in ("step",) + PHASES:
        s0, c0 = before.get(key, (0.0, 0.0))
        s1, c1 = after.get(key, (0.0, 0.0))
        if c1 > c0:
            res[key] = (s1 - s0) / (c1 - c0) * 1e3
    res["steps"] = int(after.get("step", (0, 0))[1] - before.get("step", (0, 0))[1])
    return res


def body(model, prompt, new_tokens, kind, seed):
    b = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "stream": True,
         "stream_options": {"include_usage": True}}
    if kind == "greedy":
        b["strategy"] = "greedy"
    elif kind == "sample":
        b.update(strategy="sample", temperature=0.8, top_p=0.95, seed=seed)
    else:
        b.update(strategy="contrastive", penalty_alpha=0.6, top_k=4)
    return b


def kinds(mix, n):
    if mix == "greedy":
        return ["greedy"] * n
    # 6 : 3 : 1, interleaved so every stretch of arrivals holds all three.
    pattern = ["greedy", "sample", "greedy", "sample", "greedy", "contrastive", "greedy", "sample", "greedy",
               "greedy"]
    return [pattern[i % len(pattern)] for i in range(n)]


def phase(args, model, mix, n):
    bodies = [body(model, args.prompt, args.new_tokens, k, seed=i) for i, k in enumerate(kinds(mix, n))]
    arrivals = [i * args.stagger_ms / 1000.0 for i in range(n)]
    before = scrape(args.metrics)
    results = openai_phase(args.base, bodies, arrivals, args.job_timeout)
    after = scrape(args.metrics)
    wall = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    tokens = sum(r["tokens"] or 0 for r in results)
    ttft = [(r["first"] - r["t0"]) * 1e3 for r in results]
    itl = [(r["t1"] - r["first"]) / (r["tokens"] - 1) * 1e3 for r in results if (r["tokens"] or 0) > 1]
    return {
        "mix": mix, "concurrency": n, "jobs": n, "stagger_ms": args.stagger_ms, "new_tokens": tokens,
        "asked_tokens": n * args.new_tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
        "itl_ms_p50": percentile(itl, 50) if itl else None, "itl_ms_p99": percentile(itl, 99) if itl else None,
        "step_ms": step_split(before, after),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True, help="the gateway, e.g. http://127.0.0.1:18190")
    p.add_argument("--metrics", required=True, help="the worker's /metrics URL")
    p.add_argument("--prompt-file", required=True)
    p.add_argument("--concurrency", default="16 64 128 256")
    p.add_argument("--mixes", default="greedy mixed")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--stagger-ms", type=float, default=10.0)
    p.add_argument("--deadline-s", type=float, default=300.0,
                   help="seconds this run may take: a phase that would not fit (judged by the last one) is skipped")
    p.add_argument("--job-timeout", type=float, default=300.0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    with open(args.prompt_file) as f:
        args.prompt = f.read()
    started = time.monotonic()
    status, models = Http(args.base).request("GET", "/v1/models")
    if status != 200 or not (models or {}).get("data"):
        sys.exit(f"{args.base}/v1/models answered {status}: {models}")
    model = models["data"][0]["id"]
    log("warm-up: 2 short jobs through the same route (not counted)")
    openai_phase(args.base, [body(model, args.prompt, 4, "greedy", 0)] * 2, [0.0, 0.0], args.job_timeout)

    rows, last = [], None  # last: (jobs, seconds) of the phase before
    for mix in args.mixes.split():
        for n in [int(c) for c in args.concurrency.split()]:
            left = args.deadline_s - (time.monotonic() - started)
            # A phase decodes about new_tokens steps whatever its size; a step of more rows costs more, less
            # than in proportion (the weights are read once a step): the square root of the ratio, as a guess.
            guess = last[1] * max(1.0, n / last[0]) ** 0.5 if last else 0.0
            if guess > left:
                log(f"{mix} x {n}: skipped, ~{guess:.0f} s needed and {left:.0f} s left")
                rows.append({"mix": mix, "concurrency": n, "status": f"skipped (~{guess:.0f} s, {left:.0f} s left)"})
                continue
            r = phase(args, model, mix, n)
            rows.append(r)
            last = (n, r["wall_s"])
            s = r["step_ms"]
            log(f"{mix} x {n}: {r['new_tokens']}/{r['asked_tokens']} tokens in {r['wall_s']:.2f} s = "
                f"{r['tokens_per_s']:.0f} tok/s, TTFT p50 {r['ttft_ms_p50']:.0f} ms p99 {r['ttft_ms_p99']:.0f} ms, "
                f"ITL p50 {r['itl_ms_p50'] or 0:.1f} ms p99 {r['itl_ms_p99'] or 0:.1f} ms, "
                f"{s.get('steps', 0)} steps of {s.get('step', 0):.1f} ms")
    with open(args.out, "w") as f:
        json.dump({"model": model, "prompt_chars": len(args.prompt), "new_tokens": args.new_tokens,
                   "stagger_ms": args.stagger_ms, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
