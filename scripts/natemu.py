"""Home networks behind NAT, in network namespaces: for the NAT tests and `scripts/bench --targets relay`.

    public (198.51.100.1 on lo)  --veth--  router-i (203.0.113.<4i+2>)  --veth--  home-i (10.0.i.2)
                                           nftables: masquerade out of the WAN
                                           side, drop new connections into it

`public` holds the nodes everyone can dial (bootstrap, relays, clients) and routes between the routers; each home
holds a server. Nothing routes to 10.0.0.0/8 from `public`, and a router lets in only what belongs to a connection
a home host opened (unsolicited packets are dropped, not refused), as a home router does. Namespaces are
`petalbench-<pid>-nat-<name>` (so `scripts/netemu.remove_leftovers` and `owned_netns` see them) and are removed on
exit with every process still inside them.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from scripts.netemu import NETNS_PREFIX, _ip, _kill_netns_processes, list_netns, require_root_and_netns

PUBLIC_IP = "198.51.100.1"


def router_rules(wan: str, forward: tuple[int, str] | None = None) -> str:
    """nftables rules of a home router whose WAN side is device `wan`; `forward` = (port, home ip): a port
    forwarded to a home host (what a volunteer would have to configure; the benchmark's direct case)."""
    prerouting = ""
    if forward is not None:
        port, home_ip = forward
        prerouting = f'chain prerouting {{ type nat hook prerouting priority dstnat; iifname "{wan}" '
        prerouting += f"tcp dport {port} dnat to {home_ip}; }}"
    return f"""
table ip petal_nat {{
    {prerouting}
    chain postrouting {{ type nat hook postrouting priority srcnat; oifname "{wan}" masquerade; }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{wan}" ct state established,related accept
        iifname "{wan}" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{wan}" ct state established,related accept
        iifname "{wan}" ct status dnat accept
        iifname "{wan}" drop
    }}
}}
"""


def put_home_behind(router_netns: str, wan: str, home_netns: str, index: int) -> str:
    """Make `home_netns` a home network behind `router_netns` (LAN 10.0.<index>.0/24, masquerading out of `wan`,
    dropping new inbound connections); returns the home host's address."""
    lan, home_ip = f"10.0.{index}.1", f"10.0.{index}.2"
    _ip("-n", router_netns, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", home_netns)
    _ip("-n", router_netns, "addr", "add", f"{lan}/24", "dev", "lan")
    _ip("-n", router_netns, "link", "set", "lan", "up")
    _ip("-n", home_netns, "link", "set", "lo", "up")
    _ip("-n", home_netns, "addr", "add", f"{home_ip}/24", "dev", "eth0")
    _ip("-n", home_netns, "link", "set", "eth0", "up")
    _ip("-n", home_netns, "route", "add", "default", "via", lan)
    _run(["ip", "netns", "exec", router_netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    set_router_rules(router_netns, router_rules(wan))
    return home_ip


def set_router_rules(router_netns: str, rules: str) -> None:
    """Replace the router's rules (the table is created empty first, so deleting it always works)."""
    _run(
        ["ip", "netns", "exec", router_netns, "nft", "-f", "-"],
        stdin="table ip petal_nat {}\ndelete table ip petal_nat\n",
    )
    _run(["ip", "netns", "exec", router_netns, "nft", "-f", "-"], stdin=rules)


class NatNetwork:
    """`public` and `homes` home networks, each behind its own masquerading router."""

    def __init__(self, homes: int):
        self.tag = f"{os.getpid()}-nat"
        names = ["public"] + [f"router{i}" for i in range(homes)] + [f"home{i}" for i in range(homes)]
        self.netns = {name: f"{NETNS_PREFIX}{self.tag}-{name}" for name in names}
        self.homes = homes

    def home_ip(self, i: int) -> str:
        return f"10.0.{i}.2"

    def router_ip(self, i: int) -> str:
        return f"203.0.113.{4 * i + 2}"

    def __enter__(self) -> NatNetwork:
        require_root_and_netns()
        if shutil.which("nft") is None:
            raise RuntimeError("the NAT emulation needs nftables (Debian's `nftables`; scripts/setup installs it)")
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def command(self, name: str, argv: list[str]) -> list[str]:
        """`argv` run inside namespace `name` (`ip netns exec` execs, so the PID is the command's)."""
        return ["ip", "netns", "exec", self.netns[name], *argv]

    def _build(self) -> None:
        for netns in self.netns.values():
            _ip("netns", "add", netns)
            _ip("-n", netns, "link", "set", "lo", "up")
        public = self.netns["public"]
        _ip("-n", public, "addr", "add", f"{PUBLIC_IP}/32", "dev", "lo")
        _run(self.command("public", ["sysctl", "-qw", "net.ipv4.ip_forward=1"]))  # the internet: routers reach routers
        for i in range(self.homes):
            router, home = self.netns[f"router{i}"], self.netns[f"home{i}"]
            wan_gateway = f"203.0.113.{4 * i + 1}"
            _ip("-n", public, "link", "add", f"isp{i}", "type", "veth", "peer", "name", "wan", "netns", router)
            _ip("-n", public, "addr", "add", f"{wan_gateway}/30", "dev", f"isp{i}")
            _ip("-n", public, "link", "set", f"isp{i}", "up")
            _ip("-n", router, "addr", "add", f"{self.router_ip(i)}/30", "dev", "wan")
            _ip("-n", router, "link", "set", "wan", "up")
            _ip("-n", router, "route", "add", "default", "via", wan_gateway)
            put_home_behind(router, "wan", home, i)

    def close(self) -> None:
        existing = list_netns()
        for netns in self.netns.values():
            if netns in existing:
                _kill_netns_processes(netns)
        for netns in self.netns.values():
            if netns in existing:
                _ip("netns", "del", netns)  # its veth ends go with it


def _run(argv: list[str], stdin: str | None = None) -> None:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
