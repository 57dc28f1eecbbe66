"""The benchmark workloads of mitogen-bench, written for execnet.

Run: python3 execnet_bench.py WORKLOAD. Same definitions as tests/src/bin/mitogen-bench.rs;
a "call" is a request/response pair on a channel to a remote loop.
"""

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import execnet  # noqa: E402

from common import BLOCKS, MIB, micros, now, random_block, report, report_fanout, report_latency  # noqa: E402

ECHO = "for x in channel:\n    channel.send(x)\n"
SINK = "for x in channel:\n    channel.send(len(x))\n"
GETPID = "import os\nchannel.send(os.getpid())\n"
SOURCE = (
    "import os\n"
    "n, length = channel.receive()\n"
    "block = os.urandom(length)\n"
    "for _ in range(n):\n"
    "    channel.send(block)\n"
)


def lifecycle(spec=None, name="lifecycle"):
    samples = []
    for _ in range(20):
        t = now()
        gw = execnet.makegateway(spec)
        ch = gw.remote_exec(ECHO)
        ch.send(1)
        ch.receive()
        gw.exit()
        gw.join()
        samples.append(micros(now() - t) / 1000)
    samples.sort()
    report(name, "median", samples[len(samples) // 2], "ms")


def roundtrip(via, spec=None, name=None):
    group = execnet.Group()
    first = group.makegateway(spec or "popen//id=first")
    gw = group.makegateway("popen//via=first") if via else first
    ch = gw.remote_exec(ECHO)
    samples = []
    for i in range(5200):
        t = now()
        ch.send(i)
        v = ch.receive()
        if i >= 200:
            samples.append(micros(now() - t))
        assert v == i
    report_latency(name or ("roundtrip-via" if via else "roundtrip"), samples)
    group.terminate()


def stream_c2p(spec=None, name="stream-c2p"):
    gw = execnet.makegateway(spec)
    ch = gw.remote_exec(SOURCE)
    t = now()
    ch.send((BLOCKS, MIB))
    total = 0
    for _ in range(BLOCKS):
        total += len(ch.receive())
    secs = now() - t
    assert total == BLOCKS * MIB
    report(name, "throughput", (total / MIB) / secs, "MiB/s")
    gw.exit()


def args_p2c(spec=None, name="args-p2c"):
    gw = execnet.makegateway(spec)
    ch = gw.remote_exec(SINK)
    block = random_block()
    t = now()
    inflight = 0
    total = 0
    for _ in range(BLOCKS):
        ch.send(block)
        inflight += 1
        if inflight == 4:
            total += ch.receive()
            inflight -= 1
    for _ in range(inflight):
        total += ch.receive()
    secs = now() - t
    assert total == BLOCKS * MIB
    report(name, "throughput", BLOCKS / secs, "MiB/s")
    gw.exit()


def fanout(n):
    group = execnet.Group()
    t = now()
    gws = [group.makegateway() for _ in range(n)]
    start = now() - t
    t = now()
    chans = [gw.remote_exec(GETPID) for gw in gws]
    pids = [ch.receive() for ch in chans]
    call_all = now() - t
    report_fanout(n, start, call_all, pids)
    group.terminate()


def ssh_spec():
    """The ssh target of cargo xtask bench --ssh, with the same options as ours. execnet
    always passes -C (compression); a wrapper ssh first on PATH drops it, for fairness."""
    wrapper_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), "mitogen-bench-ssh-%d" % os.getpid())
    os.makedirs(wrapper_dir, exist_ok=True)
    wrapper = os.path.join(wrapper_dir, "ssh")
    real = "/usr/bin/ssh"
    with open(wrapper, "w") as f:
        f.write('#!/bin/sh\nfor a; do shift; [ "$a" = -C ] || set -- "$@" "$a"; done\nexec %s "$@"\n' % real)
    os.chmod(wrapper, 0o755)
    os.environ["PATH"] = wrapper_dir + ":" + os.environ["PATH"]
    user, host = os.environ["MITOGEN_BENCH_SSH"].split("@", 1)
    opts = "-i %s -o IdentitiesOnly=yes -o Compression=no -o UserKnownHostsFile=%s -l %s %s" % (
        os.environ["MITOGEN_BENCH_SSH_KEY"],
        os.environ["MITOGEN_BENCH_SSH_KNOWN_HOSTS"],
        user,
        host,
    )
    return "ssh=%s//python=python3" % opts


WORKLOADS = {
    "ssh-lifecycle": lambda: lifecycle(ssh_spec(), "ssh-lifecycle"),
    "ssh-roundtrip": lambda: roundtrip(False, ssh_spec(), "ssh-roundtrip"),
    "ssh-stream-c2p": lambda: stream_c2p(ssh_spec(), "ssh-stream-c2p"),
    "ssh-args-p2c": lambda: args_p2c(ssh_spec(), "ssh-args-p2c"),
    "lifecycle": lifecycle,
    "roundtrip": lambda: roundtrip(False),
    "roundtrip-via": lambda: roundtrip(True),
    "stream-c2p": stream_c2p,
    "args-p2c": args_p2c,
    "fanout-50": lambda: fanout(50),
    "fanout-200": lambda: fanout(200),
}

if __name__ == "__main__":
    # Workloads execnet has no equivalent for (sudo) print no RESULT lines.
    WORKLOADS.get(sys.argv[1], lambda: None)()
