"""Netlink: the only package that speaks it.

rtnetlink for links, addresses, routes, rules and neighbours (routing.py); ctnetlink for conntrack
and sock_diag for listening sockets (conntrack.py); the clsact qdisc and BPF filters (tc.py,
imported by its users only); rtnetlink's groups and nfnetlink's nftables events (events.py); the
xt extensions of nftables rules (nftrules.py, imported by its user only); all over one small
codec over `socket` and `struct` (codec.py) instead of pyroute2: importing pyroute2 cost more than
the rest of a start, and every request went through an asyncio loop (docs/design.md, "Why our own
netlink"). Requests can be batched into one `sendmsg`.

Every kernel error leaves this package as `OSError(errno, message)` (`NetlinkError`); bytes that
do not parse as `Malformed`, an `OSError` too. Callers treat ENOENT-like errors ("already gone")
as success where that is right, never here (but for tc.py, whose ensure/detach/remove calls
return whether they changed anything: "already there" and "already gone" are answers there).
"""

from nswrap.netlink.codec import Malformed, NetlinkError
from nswrap.netlink.conntrack import PROTO_NUMBERS, Conntrack, Flow, FlowsTruncated, listeners, listening
from nswrap.netlink.events import Event, Monitor
from nswrap.netlink.routing import Routing
from nswrap.objects import LinkInfo

__all__ = ["PROTO_NUMBERS", "Conntrack", "Event", "Flow", "FlowsTruncated", "LinkInfo", "Malformed", "Monitor",
           "NetlinkError", "Routing", "listeners", "listening"]
