#!/usr/bin/env python3
"""An emulated network of hosts on this machine: one network namespace per host, linked by a user-space switch.

The kernel here has no netem, so delay is emulated in user space: the switch process holds one TUN device
per namespace, reads every IP packet a host sends, and writes it into the destination host's TUN device
after the link's one-way delay. Each host's link to the switch has a rate in both directions (serialization
time per packet, cut-through at the switch: an uncontended packet waits only for its sender's link) and a
drop-tail queue that holds at most `queue_s` seconds of traffic, like tc's tbf `latency`.

TCP segmentation offload keeps Python fast enough: the TUN devices take virtio-net headers (IFF_VNET_HDR +
TUNSETOFFLOAD), so the kernel hands the switch TCP super-packets of up to 64 KiB, made of MTU-sized (1500)
segments, and the receiving kernel accepts them as they are. TCP still counts its window in 1448-byte
segments, so congestion control sees the same network as with small packets.

Sub-commands (all as root): `switch` (the switch itself; the bench starts it), `echo` and `probe` (measure
the emulated round trip time and bandwidth from inside the namespaces). `EmulatedNetwork` builds and
removes everything."""

from __future__ import annotations

import argparse
import fcntl
import heapq
import json
import os
import re
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

NETNS_PREFIX = "petalbench-"  # every namespace a run makes is petalbench-<pid>-<host>
DEVICE_PREFIX = "pb"  # its TUN devices are pb<pid>-<index> (interface names have at most 15 characters)
SUBNET = "10.77.0"  # host i has address 10.77.0.<i + 1>/24, inside its own namespace only
PROBE_PORT = 5201

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
VNET_HDR_BYTES = 10  # struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
READ_BYTES = 1 << 17  # larger than the largest super-packet (64 KiB + headers)
READS_PER_WAKEUP = 256  # bounded, so one busy host cannot starve the others' deliveries


@dataclass(frozen=True)
class LinkShape:
    """Every host's link to the switch: `rate_bps` each way (None: unlimited), `delay_s` one way through the
    switch (so a round trip between two hosts takes 2 x delay_s), `queue_s` of traffic at most in a queue."""

    rate_bps: float | None
    delay_s: float
    queue_s: float = 0.1


# ---------------------------------------------------------------- the switch


def open_tun(name: str) -> int:
    """Create TUN device `name` in this namespace (it disappears when the fd closes); return its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR))
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    return fd


class Switch:
    """Forwards packets between TUN devices by destination IPv4 address, after each link's delay and rate."""

    def __init__(self, fds: list[int], addresses: list[str], shape: LinkShape):
        self.fds = fds
        self.port_of_address = {socket.inet_aton(a): port for port, a in enumerate(addresses)}
        self.shape = shape
        self.uplink_free = [0.0] * len(fds)  # when each host's link towards the switch is next idle
        self.downlink_free = [0.0] * len(fds)  # when the switch's link towards each host is next idle
        self.due: list[tuple[float, int, int, bytes]] = []  # (delivery time, sequence, port, packet)
        self.sequence = 0
        self.dropped = 0

    def run(self, control) -> None:
        """Forward until `control` (a text stream of `shape RATE_BPS DELAY_S QUEUE_S` lines) reaches EOF."""
        readers = {fd: port for port, fd in enumerate(self.fds)}
        while True:
            self.deliver_due()
            timeout = max(0.0, self.due[0][0] - time.monotonic()) if self.due else None
            readable, _, _ = select.select([control, *self.fds], [], [], timeout)
            for source in readable:
                if source is control:
                    if not self.command(control.readline()):
                        return
                else:
                    self.receive(readers[source])

    def command(self, line: str) -> bool:
        """Apply one control line; False at EOF. Answers each command with `ok` once it applies."""
        if not line:
            return False
        name, *values = line.split()
        if name == "shape":
            rate, delay, queue = (float(v) for v in values)
            self.shape = LinkShape(rate or None, delay, queue)
        elif name == "stats":
            print(json.dumps({"dropped": self.dropped}), flush=True)
        print("ok", flush=True)
        return True

    def receive(self, source: int) -> None:
        """Read what host `source` sent and schedule each packet's delivery."""
        for _ in range(READS_PER_WAKEUP):
            try:
                packet = os.read(self.fds[source], READ_BYTES)
            except BlockingIOError:
                return
            self.schedule(source, packet)

    def schedule(self, source: int, packet: bytes) -> None:
        ip = VNET_HDR_BYTES
        is_ipv4 = len(packet) >= ip + 20 and packet[ip] >> 4 == 4
        target = self.port_of_address.get(packet[ip + 16 : ip + 20]) if is_ipv4 else None
        if target is None or target == source:
            return  # IPv6 router solicitations and the like: nothing else is on this network
        now, shape = time.monotonic(), self.shape
        if shape.rate_bps is None:
            deliver = now + shape.delay_s
        else:
            wire_s = len(packet) * 8 / shape.rate_bps
            sent = max(now, self.uplink_free[source]) + wire_s
            if sent - now > shape.queue_s + wire_s:
                self.dropped += 1  # the sender's queue is full: drop tail, as a real link would
                return
            self.uplink_free[source] = sent
            deliver = max(sent + shape.delay_s, self.downlink_free[target] + wire_s)
            self.downlink_free[target] = deliver
        self.sequence += 1
        heapq.heappush(self.due, (deliver, self.sequence, target, packet))

    def deliver_due(self) -> None:
        now = time.monotonic()
        while self.due and self.due[0][0] <= now:
            _, _, target, packet = heapq.heappop(self.due)
            try:
                os.write(self.fds[target], packet)
            except OSError:
                self.dropped += 1  # the device is down (the namespace is going away)


def run_switch(devices: list[str], addresses: list[str], shape: LinkShape) -> None:
    """Create the TUN devices, say `ready`, forward until stdin closes (so the switch dies with its parent)."""
    fds = [open_tun(name) for name in devices]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    Switch(fds, addresses, shape).run(sys.stdin)


# ---------------------------------------------------------------- the network


class EmulatedNetwork:
    """Hosts in namespaces petalbench-<pid>-<host>, linked by one switch; `close()` removes everything.

    Use as a context manager. Leftovers of earlier runs whose process is gone are removed first."""

    def __init__(self, hosts: list[str], shape: LinkShape):
        self.hosts = hosts
        self.shape = shape
        self.tag = f"{os.getpid()}"
        self.netns = {host: f"{NETNS_PREFIX}{self.tag}-{host}" for host in hosts}
        self.devices = {host: f"{DEVICE_PREFIX}{self.tag}-{i}" for i, host in enumerate(hosts)}
        self.addresses = {host: f"{SUBNET}.{i + 1}" for i, host in enumerate(hosts)}
        self.switch: subprocess.Popen | None = None

    def __enter__(self) -> EmulatedNetwork:
        require_root_and_netns()
        remove_leftovers()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        for netns in self.netns.values():
            _ip("netns", "add", netns)
        self.switch = subprocess.Popen(
            [sys.executable, __file__, "switch", "--devices", *self.devices.values()]
            + ["--addresses", *self.addresses.values(), *_shape_args(self.shape)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.switch.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the network switch did not start (exit code {self.switch.poll()})")
        for host in self.hosts:
            netns, device = self.netns[host], self.devices[host]
            _ip("link", "set", device, "netns", netns)
            _ip("-n", netns, "addr", "add", f"{self.addresses[host]}/24", "dev", device)
            _ip("-n", netns, "link", "set", device, "up")
            _ip("-n", netns, "link", "set", "lo", "up")

    def set_shape(self, shape: LinkShape) -> None:
        """Change every link's rate and delay (applies to packets sent from now on)."""
        self._control(f"shape {shape.rate_bps or 0} {shape.delay_s} {shape.queue_s}")
        self.shape = shape

    def dropped_packets(self) -> int:
        return json.loads(self._control("stats")[0])["dropped"]

    def _control(self, line: str) -> list[str]:
        assert self.switch is not None and self.switch.stdin is not None and self.switch.stdout is not None
        self.switch.stdin.write(line + "\n")
        self.switch.stdin.flush()
        answers = []
        for _ in range(10):
            answer = self.switch.stdout.readline().strip()
            if answer == "ok":
                return answers
            if not answer:
                raise RuntimeError(f"the network switch stopped (exit code {self.switch.poll()})")
            answers.append(answer)
        raise RuntimeError(f"the network switch answered {answers} to {line!r}")

    def command(self, host: str, argv: list[str]) -> list[str]:
        """`argv` run inside `host`'s namespace."""
        return ["ip", "netns", "exec", self.netns[host], *argv]

    def close(self) -> None:
        """Stop every process left in the namespaces (by PID), the switch, and delete the namespaces."""
        for netns in self.netns.values():
            _kill_netns_processes(netns)
        if self.switch is not None:
            _stop(self.switch)
            self.switch = None
        for netns in self.netns.values():
            if netns in list_netns():
                _ip("netns", "del", netns)

    # ---- measuring what the emulation gives

    def measure(self, source: str, target: str, pings: int = 20, transfer_s: float = 2.0) -> dict[str, float]:
        """Round trip time (UDP echo, ms) and TCP goodput (Mbit/s) from `source` to `target`."""
        echo = subprocess.Popen(
            self.command(target, [sys.executable, __file__, "echo", "--host", self.addresses[target]]),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            if echo.stdout.readline().strip() != "ready":
                raise RuntimeError("the probe's echo server did not start")
            probe = [sys.executable, __file__, "probe", "--host", self.addresses[target], "--pings", str(pings)]
            probe += ["--bytes", str(int(max(4e6, (self.shape.rate_bps or 1e9) / 8 * transfer_s)))]
            out = subprocess.run(self.command(source, probe), capture_output=True, text=True, timeout=120, check=True)
            return json.loads(out.stdout)
        finally:
            _stop(echo)


def _shape_args(shape: LinkShape) -> list[str]:
    return ["--rate", str(shape.rate_bps or 0), "--delay", str(shape.delay_s), "--queue", str(shape.queue_s)]


def require_root_and_netns() -> None:
    if os.geteuid() != 0:
        raise PermissionError("the emulated network needs root (network namespaces and TUN devices)")
    if not os.path.exists("/dev/net/tun"):
        raise RuntimeError("the emulated network needs /dev/net/tun (TUN devices)")
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"the emulated network needs `ip netns` (Debian's iproute2): {e}") from e


def list_netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def owned_netns(pid: int | None = None) -> list[str]:
    """Namespaces made by run `pid` (any run when None)."""
    run = r"\d+" if pid is None else str(pid)
    pattern = re.compile(rf"^{NETNS_PREFIX}{run}-")
    return [netns for netns in list_netns() if pattern.match(netns)]


def owned_devices(pid: int | None = None) -> list[str]:
    """TUN devices of run `pid` (any run when None) still in this namespace."""
    run = r"\d+" if pid is None else str(pid)
    pattern = re.compile(rf"^{DEVICE_PREFIX}{run}-\d+$")
    return [name for name in os.listdir("/sys/class/net") if pattern.match(name)]


def remove_leftovers() -> None:
    """Delete namespaces of earlier runs whose process no longer exists (a run killed with SIGKILL)."""
    for netns in owned_netns():
        pid = int(netns[len(NETNS_PREFIX) :].split("-")[0])
        if not Path(f"/proc/{pid}").exists():
            _kill_netns_processes(netns)
            _ip("netns", "del", netns)


def _kill_netns_processes(netns: str) -> None:
    """SIGKILL each process still inside `netns` (all started by this run), by PID."""
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
    for pid in (int(p) for p in out.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


# ---------------------------------------------------------------- probes, run inside the namespaces


def run_echo(host: str, port: int) -> None:
    """UDP echo and a TCP sink on `port` (the sink answers the byte count once the sender closes)."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((host, port))
    tcp = socket.create_server((host, port))
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select([udp, tcp], [], [])
        if udp in readable:
            data, sender = udp.recvfrom(2048)
            udp.sendto(data, sender)
        if tcp in readable:
            connection, _ = tcp.accept()
            with connection:
                received = 0
                while chunk := connection.recv(1 << 20):
                    received += len(chunk)
                connection.sendall(struct.pack("!Q", received))


def run_probe(host: str, port: int, pings: int, size: int) -> dict[str, float]:
    """RTT of `pings` small UDP packets, then goodput of one `size`-byte TCP transfer (minus one RTT)."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(5)
    rtts = []
    for i in range(pings):
        start = time.perf_counter()
        udp.sendto(i.to_bytes(4, "big"), (host, port))
        while udp.recv(2048) != i.to_bytes(4, "big"):
            pass
        rtts.append(time.perf_counter() - start)
    rtt = statistics.median(rtts)
    with socket.create_connection((host, port), timeout=60) as connection:
        block = b"\0" * (1 << 20)
        start = time.perf_counter()
        for offset in range(0, size, len(block)):
            connection.sendall(block[: size - offset])
        connection.shutdown(socket.SHUT_WR)
        received = struct.unpack("!Q", connection.recv(8))[0]
        seconds = time.perf_counter() - start - rtt  # the count comes back half an RTT after the last byte
    return {
        "rtt_ms": rtt * 1000,
        "rtt_min_ms": min(rtts) * 1000,
        "rtt_max_ms": max(rtts) * 1000,
        "mbit_s": received * 8 / seconds / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    switch = commands.add_parser("switch", help="run the switch (stdin: control lines; EOF stops it)")
    switch.add_argument("--devices", nargs="+", required=True)
    switch.add_argument("--addresses", nargs="+", required=True)
    switch.add_argument("--rate", type=float, default=0, help="bits/s each way per link (0: unlimited)")
    switch.add_argument("--delay", type=float, default=0, help="one-way delay, s")
    switch.add_argument("--queue", type=float, default=0.1, help="longest queue, s of traffic")
    echo = commands.add_parser("echo", help="UDP echo + TCP sink for `probe`")
    echo.add_argument("--host", required=True)
    echo.add_argument("--port", type=int, default=PROBE_PORT)
    probe = commands.add_parser("probe", help="measure RTT and goodput to an `echo`; prints JSON")
    probe.add_argument("--host", required=True)
    probe.add_argument("--port", type=int, default=PROBE_PORT)
    probe.add_argument("--pings", type=int, default=20)
    probe.add_argument("--bytes", type=int, default=4_000_000)
    args = parser.parse_args()
    if args.command == "switch":
        run_switch(args.devices, args.addresses, LinkShape(args.rate or None, args.delay, args.queue))
    elif args.command == "echo":
        run_echo(args.host, args.port)
    else:
        print(json.dumps(run_probe(args.host, args.port, args.pings, args.bytes)))


if __name__ == "__main__":
    main()
