"""Shared helpers for the peer benchmark programs (same output format as mitogen-bench)."""

import os
import time

MIB = 1 << 20
BLOCKS = 256


def report(workload, metric, value, unit):
    print(f"RESULT {workload} {metric} {value:.3f} {unit}", flush=True)


def pct(sorted_values, p):
    return sorted_values[round((len(sorted_values) - 1) * p)]


def micros(seconds):
    return seconds * 1e6


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def uss_kib(pid):
    total = 0.0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean", "Private_Dirty")):
                    total += float(line.split()[1])
    except OSError:
        pass
    return total


def report_latency(workload, samples_us):
    samples_us.sort()
    report(workload, "median", pct(samples_us, 0.5), "us")
    report(workload, "p99", pct(samples_us, 0.99), "us")


def report_fanout(n, start_s, call_s, pids):
    w = f"fanout-{n}"
    report(w, "start-all", start_s * 1000, "ms")
    report(w, "call-all", call_s * 1000, "ms")
    report(w, "master-peak-rss", status_kib("self", "VmHWM") / 1024, "MiB")
    report(w, "child-rss", sum(status_kib(p, "VmRSS") for p in pids) / len(pids) / 1024, "MiB")
    report(w, "child-uss", sum(uss_kib(p) for p in pids) / len(pids) / 1024, "MiB")


def random_block():
    return os.urandom(MIB)


now = time.perf_counter
