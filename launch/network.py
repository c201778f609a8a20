"""The network address each side of torch.distributed uses on this node.

A GPU run's default group is `cpu:gloo,cuda:nccl`, and megatron adds groups of its own over
gloo: both backends open sockets, each choosing its interface its own way.

- gloo (object collectives and barriers, checkpoint planning, megatron's *_GLOO groups; every
  collective of a CPU run): the interface named by GLOO_SOCKET_IFNAME; unset, the address this
  host's name resolves to, which on many machines is a loopback address (Debian's
  `127.0.1.1 <hostname>` line): ranks on other nodes then cannot connect and the job hangs at
  its first gloo collective. Unset, megamor's launcher sets it to the first interface that
  NCCL_SOCKET_IFNAME selects on the node (NCCL's variable is the one cluster docs tell users to
  set), so the two sides use the same network.
- NCCL (tensor collectives): the interfaces NCCL_SOCKET_IFNAME selects (a list of name
  prefixes, `=` for exact names, `^` to exclude); unset, NCCL's own choice (InfiniBand first,
  then the first interface that is neither loopback nor docker).

`describe()` is the line the preflight (and each node's first rank) prints; `problem()` says why
a multi-node job cannot work with this choice.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Callable, Mapping, Optional


def ipv4_by_interface() -> dict[str, list[str]]:
    """Interface name -> its IPv4 addresses, on this node."""
    import psutil

    return {name: [a.address for a in addrs if a.family == socket.AF_INET]
            for name, addrs in psutil.net_if_addrs().items()}


def nccl_selects(spec: str, names: list[str]) -> list[str]:
    """The interfaces NCCL_SOCKET_IFNAME=`spec` selects among `names` (NCCL's rules)."""
    exclude = spec.startswith("^")
    spec = spec[1:] if exclude else spec
    exact = spec.startswith("=")
    spec = spec[1:] if exact else spec
    wanted = [w for w in spec.split(",") if w]

    def match(name: str) -> bool:
        return name in wanted if exact else any(name.startswith(w) for w in wanted)
    return [n for n in names if match(n) != exclude]


def _loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def gloo_default(env: Mapping[str, str], addrs: Optional[dict[str, list[str]]] = None) -> Optional[str]:
    """GLOO_SOCKET_IFNAME for this node when the user set none: the first interface (with an
    IPv4 address, not loopback) that NCCL_SOCKET_IFNAME selects; None without that variable."""
    spec = env.get("NCCL_SOCKET_IFNAME")
    if env.get("GLOO_SOCKET_IFNAME") or not spec:
        return None
    addrs = ipv4_by_interface() if addrs is None else addrs
    picked = [n for n in nccl_selects(spec, sorted(addrs)) if addrs[n]]
    usable = [n for n in picked if not all(_loopback(a) for a in addrs[n])]
    return (usable or picked or [None])[0]


def gloo_side(env: Mapping[str, str], addrs: Optional[dict[str, list[str]]] = None,
              resolve: Optional[Callable[[str], str]] = None) -> tuple[str, str, bool]:
    """(address(es), how they were chosen, whether other nodes can reach them) for gloo.
    Raises ValueError naming GLOO_SOCKET_IFNAME when it names no usable interface here."""
    names, how = env.get("GLOO_SOCKET_IFNAME"), "GLOO_SOCKET_IFNAME"
    if not names:
        names, how = gloo_default(env, addrs), "GLOO_SOCKET_IFNAME from NCCL_SOCKET_IFNAME"
    if names:
        addrs = ipv4_by_interface() if addrs is None else addrs
        found = []
        for name in names.split(","):
            if name not in addrs:
                raise ValueError(f"GLOO_SOCKET_IFNAME={names}: this node "
                                 f"({socket.gethostname()}) has no interface {name!r} (it has "
                                 f"{', '.join(sorted(addrs))})")
            if not addrs[name]:
                raise ValueError(f"GLOO_SOCKET_IFNAME={names}: interface {name!r} has no IPv4 "
                                 f"address on {socket.gethostname()}")
            found.append(f"{name} {addrs[name][0]}")
        reachable = not all(_loopback(f.split()[1]) for f in found)
        return ", ".join(found), how, reachable
    host = socket.gethostname()
    try:
        addr = resolve(host) if resolve else socket.getaddrinfo(
            host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)[0][4][0]
    except (OSError, ValueError):
        return "127.0.0.1", f"hostname {host} does not resolve: loopback", False
    return addr, f"hostname {host}", not _loopback(addr)


def nccl_side(env: Mapping[str, str], addrs: Optional[dict[str, list[str]]] = None) -> str:
    spec = env.get("NCCL_SOCKET_IFNAME")
    if not spec:
        return "NCCL's choice (InfiniBand first; NCCL_SOCKET_IFNAME unset)"
    addrs = ipv4_by_interface() if addrs is None else addrs
    picked = nccl_selects(spec, sorted(addrs))
    if not picked:
        raise ValueError(f"NCCL_SOCKET_IFNAME={spec} selects no interface on "
                         f"{socket.gethostname()} (it has {', '.join(sorted(addrs))})")
    return ", ".join(f"{n} {addrs[n][0] if addrs[n] else '(no IPv4)'}" for n in picked) + \
        f" (NCCL_SOCKET_IFNAME={spec})"


def describe(env: Mapping[str, str], cuda: bool, addrs=None, resolve=None) -> str:
    """One line: the addresses gloo (and NCCL, on GPU runs) use on this node."""
    addr, how, _ = gloo_side(env, addrs, resolve)
    line = f"gloo {addr} ({how})"
    if cuda:
        line += f"; nccl {nccl_side(env, addrs)}"
    return line


def problem(env: Mapping[str, str], nodes: int, addrs=None, resolve=None) -> Optional[str]:
    """Why gloo cannot connect the nodes of a multi-node job with this choice, or None."""
    if nodes < 2:
        return None
    addr, how, reachable = gloo_side(env, addrs, resolve)
    if reachable:
        return None
    return (f"gloo would bind to a loopback address ({addr}; {how}), which the other "
            f"{nodes - 1} node(s) cannot reach: set GLOO_SOCKET_IFNAME (or NCCL_SOCKET_IFNAME, which "
            f"megamor also gives gloo) to the interface the nodes share, e.g. "
            f"GLOO_SOCKET_IFNAME=eth0")
