"""The benchmark workloads of mitogen-bench, written for Mitogen (the Python original).

Run: python3 mitogen_bench.py WORKLOAD. Same definitions as tests/src/bin/mitogen-bench.rs.
"""

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mitogen.core  # noqa: E402
import mitogen.master  # noqa: E402
import mitogen.select  # noqa: E402

from common import BLOCKS, MIB, micros, now, random_block, report, report_fanout, report_latency  # noqa: E402


def echo(x):
    return x


def sink(data):
    return len(data)


def getpid():
    return os.getpid()


def source(n, length, sender):
    block = os.urandom(length)
    for _ in range(n):
        sender.send(block)
    sender.close()


def lifecycle(router, start=None, name="lifecycle"):
    """Start a context (`start(router)`, a local one by default), first call, shutdown."""
    samples = []
    for _ in range(20):
        t = now()
        ctx = start(router) if start else router.local()
        ctx.call(echo, 1)
        ctx.shutdown(wait=True)
        samples.append(micros(now() - t) / 1000)
    samples.sort()
    report(name, "median", samples[len(samples) // 2], "ms")


def roundtrip(router, via, ctx=None, name=None):
    if ctx is None:
        first = router.local()
        ctx = router.local(via=first) if via else first
    samples = []
    for i in range(5200):
        t = now()
        v = ctx.call(echo, i)
        if i >= 200:
            samples.append(micros(now() - t))
        assert v == i
    report_latency(name or ("roundtrip-via" if via else "roundtrip"), samples)


def stream_c2p(router, ctx=None, name="stream-c2p"):
    ctx = ctx or router.local()
    ctx.call(echo, 0)
    recv = mitogen.core.Receiver(router)
    t = now()
    pending = ctx.call_async(source, BLOCKS, MIB, recv.to_sender())
    total = 0
    for msg in recv:
        total += len(msg.unpickle())
    secs = now() - t
    pending.get().unpickle()
    assert total == BLOCKS * MIB, total
    report(name, "throughput", (total / MIB) / secs, "MiB/s")


def args_p2c(router, ctx=None, name="args-p2c"):
    ctx = ctx or router.local()
    ctx.call(echo, 0)
    block = random_block()
    t = now()
    window = collections.deque()
    total = 0
    for _ in range(BLOCKS):
        window.append(ctx.call_async(sink, block))
        if len(window) == 4:
            total += window.popleft().get().unpickle()
    for r in window:
        total += r.get().unpickle()
    secs = now() - t
    assert total == BLOCKS * MIB
    report(name, "throughput", BLOCKS / secs, "MiB/s")


def fanout(router, n):
    t = now()
    ctxs = [router.local() for _ in range(n)]
    start = now() - t
    t = now()
    sel = mitogen.select.Select([c.call_async(getpid) for c in ctxs])
    pids = [msg.unpickle() for msg in sel]
    call_all = now() - t
    assert len(pids) == n
    report_fanout(n, start, call_all, pids)


SUDO_USER = "mitogen-test-a"
SYSTEM_PYTHON = "/usr/bin/python3"


def sudo(router):
    # The venv's interpreter lives under /root, out of the target account's reach.
    return router.sudo(username=SUDO_USER, python_path=SYSTEM_PYTHON)


def ssh(router):
    """The ssh target of cargo xtask bench --ssh, with the same options as ours."""
    user, host = os.environ["MITOGEN_BENCH_SSH"].split("@", 1)
    return router.ssh(
        hostname=host,
        username=user,
        identity_file=os.environ["MITOGEN_BENCH_SSH_KEY"],
        identities_only=True,
        compression=False,
        python_path="python3",
        ssh_args=["-o", "UserKnownHostsFile=" + os.environ["MITOGEN_BENCH_SSH_KNOWN_HOSTS"]],
    )


WORKLOADS = {
    "ssh-lifecycle": lambda r: lifecycle(r, ssh, "ssh-lifecycle"),
    "ssh-roundtrip": lambda r: roundtrip(r, False, ssh(r), "ssh-roundtrip"),
    "ssh-stream-c2p": lambda r: stream_c2p(r, ssh(r), "ssh-stream-c2p"),
    "ssh-args-p2c": lambda r: args_p2c(r, ssh(r), "ssh-args-p2c"),
    "lifecycle": lifecycle,
    "roundtrip": lambda r: roundtrip(r, False),
    "roundtrip-via": lambda r: roundtrip(r, True),
    "stream-c2p": stream_c2p,
    "args-p2c": args_p2c,
    "fanout-50": lambda r: fanout(r, 50),
    "fanout-200": lambda r: fanout(r, 200),
    "sudo-lifecycle": lambda r: lifecycle(r, sudo, "sudo-lifecycle"),
}


def main():
    workload = WORKLOADS.get(sys.argv[1])
    if workload is None:
        return  # not a workload this system has: no RESULT lines
    broker = mitogen.master.Broker()
    router = mitogen.master.Router(broker)
    try:
        workload(router)
    finally:
        broker.shutdown()
        broker.join()


if __name__ == "__main__":
    main()
