"""Two home networks behind NAT and a public one, built from network namespaces (root, ``ip`` and ``nft`` needed).

::

    ns "pub" 5.77.0.1 ──┐ (and 5.77.0.11-13, for more public peers)
    ns "r1"  5.77.0.2 ──┤ bridge in ns "wan" (the "internet": 5.77.0.0/24)
    ns "r2"  5.77.0.3 ──┘
    ns "a"   10.78.1.2 ── lan ── r1 10.78.1.1   (r1 and r2 are home routers: they masquerade what leaves through
    ns "b"   10.78.2.2 ── lan ── r2 10.78.2.1    their WAN side and forward nothing inbound that no one inside opened)

The "internet" uses a globally routable range (5.77.0.0/24) so that peers classify it as public, as they would on
the real internet; no namespace here has a route out of this topology, so nothing is ever sent outside it. Each
router's nftables ruleset is a typical home NAT's: masquerade on the WAN side, a forward chain that accepts
outbound connections and their replies only, with no port forwards, and unsolicited packets to the router itself
dropped without an answer (``stealth``; a router that answers them with a TCP reset defeats hole punching: measured,
every punch failed so). Hosts "a" and "b" can dial "pub" but not each
other, nor be dialled by "pub". Every namespace is deleted by ``close`` (deleting a namespace deletes the veth ends in
it and their peers, and the bridge).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from bench.common import Worker

WAN = "5.77.0"
# {public}: the public peer's address, {homes}: the routers' WAN addresses. The counters split what the home network
# sends out: to the public peer, to the other home network (a direct or hole-punched connection) and to anyone else
ROUTER_RULES = """
table ip nat {{
  chain postrouting {{ type nat hook postrouting priority srcnat; oifname "wan0" masquerade; }}
}}
table ip filter {{
  counter to_public {{}}
  counter to_homes {{}}
  counter to_others {{}}
  chain input {{
    type filter hook input priority filter;
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    iifname "lan0" ip daddr {public} counter name to_public
    iifname "lan0" ip daddr {{ {homes} }} counter name to_homes
    iifname "lan0" ip daddr != {{ {public}, {homes} }} counter name to_others
    ct state established,related accept
    iifname "lan0" oifname "wan0" accept
  }}
}}
"""


# one more public peer, a bare hivemind DHT node on an address of namespace "pub": argv = a join address, the listen
# address. It prints "ADDRESS <its join address>". With the public peer, three of them make the four public peers that
# libp2p needs to learn a peer's outside address, which p2pd's hole punching waits for (``peer/swarm/nat.py``)
PUBLIC_NODE = """
import sys, time, hivemind
dht = hivemind.DHT(initial_peers=[sys.argv[1]], host_maddrs=[sys.argv[2]], start=True)
print("ADDRESS", [str(a) for a in dht.get_visible_maddrs()][0], flush=True)
time.sleep(3600)
"""


class NatTopology:
    """The namespaces above, named with this process's pid so that concurrent runs do not collide."""

    PUBLIC_IP = f"{WAN}.1"
    # more public hosts, all in namespace "pub" (libp2p learns a peer's outside address from 4 public peers)
    MORE_PUBLIC_IPS = (f"{WAN}.11", f"{WAN}.12", f"{WAN}.13")
    ROUTER_WAN = {"r1": f"{WAN}.2", "r2": f"{WAN}.3"}
    HOSTS = {"a": ("r1", "10.78.1"), "b": ("r2", "10.78.2")}

    def __init__(self) -> None:
        self.tag = f"bswnat{os.getpid() % 100000}"
        self.created: list[str] = []

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def prefix(self, name: str) -> list[str]:
        """Command prefix that runs a program inside namespace ``name`` (``pub``, ``r1``, ``r2``, ``a``, ``b``)."""
        return ["ip", "netns", "exec", self.ns(name)]

    def start_public_nodes(self, join: str, logdir: Path) -> tuple[list[Worker], list[str]]:
        """A ``PUBLIC_NODE`` on each of ``MORE_PUBLIC_IPS``, joining ``join``: the workers (the caller stops them) and
        their join addresses."""
        nodes: list[Worker] = []
        try:
            for ip in self.MORE_PUBLIC_IPS:
                nodes.append(Worker(["-c", PUBLIC_NODE, join, f"/ip4/{ip}/tcp/0"], logdir / f"node-{ip}.log",
                                    prefix=tuple(self.prefix("pub"))))  # fmt: skip
            return nodes, [node.wait_line("ADDRESS", timeout=60) for node in nodes]
        except BaseException:
            for node in nodes:
                node.stop(timeout=5)
            raise

    def host_ip(self, name: str) -> str:
        return self.PUBLIC_IP if name == "pub" else self.ROUTER_WAN.get(name) or f"{self.HOSTS[name][1]}.2"

    def __enter__(self) -> NatTopology:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        for name in ("wan", "pub", "r1", "r2", "a", "b"):
            _run("ip", "netns", "add", self.ns(name))
            self.created.append(self.ns(name))
            _run("ip", "-n", self.ns(name), "link", "set", "lo", "up")
        wan = self.ns("wan")
        _run("ip", "-n", wan, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", wan, "link", "set", "br0", "up")
        for i, name in enumerate(("pub", "r1", "r2")):
            self._veth(wan, f"p{i}", self.ns(name), "wan0", f"{self.host_ip(name)}/24")
            _run("ip", "-n", wan, "link", "set", f"p{i}", "master", "br0")
        for ip in self.MORE_PUBLIC_IPS:
            _run("ip", "-n", self.ns("pub"), "addr", "add", f"{ip}/24", "dev", "wan0")
        for host, (router, subnet) in self.HOSTS.items():
            self._veth(self.ns(router), "lan0", self.ns(host), "eth0", f"{subnet}.2/24")
            _run("ip", "-n", self.ns(router), "addr", "add", f"{subnet}.1/24", "dev", "lan0")
            _run("ip", "-n", self.ns(host), "route", "add", "default", "via", f"{subnet}.1")
            _run("ip", "netns", "exec", self.ns(router), "sysctl", "-qw", "net.ipv4.ip_forward=1")
            rules = ROUTER_RULES.format(public=self.PUBLIC_IP, homes=", ".join(self.ROUTER_WAN.values()))
            _run("ip", "netns", "exec", self.ns(router), "nft", "-f", "-", stdin=rules)
        self.stealth(True)

    def stealth(self, on: bool) -> None:
        """Whether the routers drop unsolicited packets to themselves (on, as built: a home router) or answer them
        (off: processes run in the routers' namespaces as public hosts, bench scenario nat's direct arm). Dropped at
        input, before conntrack confirms the packet. With resets every punch failed; our reading (not verified): the
        reset closes the punching peer's attempt, and the answered packet leaves a conntrack entry for that address
        pair, so the masquerade maps the inside peer's own packet to that pair to another port."""
        for router in self.ROUTER_WAN:
            _run(*self.prefix(router), "nft", "flush", "chain", "ip", "filter", "input")
            if on:
                _run(*self.prefix(router), "nft", "add", "rule", "ip", "filter", "input", "iifname", "wan0", "ct",
                     "state", "{", "new,", "invalid", "}", "drop")  # fmt: skip

    def _veth(self, ns_a: str, dev_a: str, ns_b: str, dev_b: str, address_b: str) -> None:
        """A veth pair from ``ns_a`` (``dev_a``, no address) to ``ns_b`` (``dev_b`` with ``address_b``), both up."""
        temp = f"{self.tag[-9:]}t"  # created in this namespace with a unique name, then moved and renamed
        _run("ip", "link", "add", temp + "0", "type", "veth", "peer", "name", temp + "1")
        for dev, ns, final in ((temp + "0", ns_a, dev_a), (temp + "1", ns_b, dev_b)):
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "link", "set", dev, "name", final)
            _run("ip", "-n", ns, "link", "set", final, "up")
        _run("ip", "-n", ns_b, "addr", "add", address_b, "dev", dev_b)

    def can_connect(self, src: str, dst_ip: str, port: int, timeout: float = 2.0) -> bool:
        """Whether a TCP connection from namespace ``src`` to ``dst_ip:port`` is established (a listener runs in the
        namespace that owns ``dst_ip`` for the duration)."""
        owner = next(n for n in ("pub", "r1", "r2", "a", "b") if self.host_ip(n) == dst_ip)
        listener = subprocess.Popen(
            [*self.prefix(owner), "python3", "-c", _LISTEN.format(ip=dst_ip, port=port, timeout=timeout + 3)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert listener.stdout.readline().strip() == b"ready"
            done = subprocess.run(
                [*self.prefix(src), "python3", "-c", _CONNECT.format(ip=dst_ip, port=port, timeout=timeout)],
                capture_output=True,
                timeout=timeout + 5,
            )
            return done.returncode == 0
        finally:
            listener.kill()
            listener.wait()

    def sent_bytes(self, router: str) -> dict[str, int]:
        """Bytes the home network behind ``router`` sent out so far: ``{"to_public": ..., "to_homes": ...,
        "to_others": ...}``."""
        done = subprocess.run([*self.prefix(router), "nft", "-j", "list", "counters", "table", "ip", "filter"],
                              capture_output=True, text=True, check=True)  # fmt: skip
        counters = [item["counter"] for item in json.loads(done.stdout)["nftables"] if "counter" in item]
        return {c["name"]: int(c["bytes"]) for c in counters}

    def close(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()


_LISTEN = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("{ip}", {port})); s.listen()
print("ready", flush=True); s.settimeout({timeout}); s.accept()
"""
_CONNECT = """
import socket
socket.create_connection(("{ip}", {port}), timeout={timeout}).close()
"""


def unavailable() -> str | None:
    """Why this topology cannot be built here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian package {package})"
    probe = f"bswnatprobe{os.getpid() % 100000}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode:
        return f"network namespaces are not allowed here: {done.stderr.strip()}"
    try:
        rules = subprocess.run(["ip", "netns", "exec", probe, "nft", "-f", "-"], capture_output=True, text=True,
                               input=ROUTER_RULES.format(public=NatTopology.PUBLIC_IP,
                                                         homes=", ".join(NatTopology.ROUTER_WAN.values())))  # fmt: skip
        if rules.returncode:
            return f"nftables rules cannot be loaded in a namespace here: {rules.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*args: str, stdin: str | None = None) -> None:
    done = subprocess.run(list(args), input=stdin, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
