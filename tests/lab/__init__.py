"""A simulated multihomed host built from throwaway network namespaces.

This package deliberately does not import nswrap: it is the independent
test bench (and oracle) the nswrap system tests, ``scripts/demo`` and the
benchmarks run on. Pure standard library; needs root, ``ip`` (iproute2),
``nft``, ``sysctl`` and, for the DNS helpers, ``unbound`` and ``dig``.

Topology (every box is its own network namespace, named
``nswt-<6 hex>-<role>``)::

     c1 (203.0.113.2/26) ── r1 ──  host eth0  192.0.2.10/24 + 192.0.2.11/24 (secondary)   default via 192.0.2.1   metric 100
     c2 (203.0.113.130/26) ─ r2 ── host eth1  198.51.100.10/24                            default via 198.51.100.1 metric 200
     c3 (203.0.113.66/26) ──────── host eth2  203.0.113.65/26   (no gateway: c3 is on the same subnet)

- r1: eth0 192.0.2.1/24 (toward host), eth1 203.0.113.1/26 (toward c1).
  r2: eth0 198.51.100.1/24 (toward host), eth1 203.0.113.129/26 (toward c2).
  Routers forward, know only their two connected subnets and are
  anti-spoofing ISPs: their nft forward hook drops packets arriving from
  the host side whose source is not in their host-facing subnet.
- c1 default via 203.0.113.1, c2 default via 203.0.113.129,
  c3 default via 203.0.113.65.
- IPv6 alongside: host eth0 2001:db8:1::10 + ::11 (default via the
  link-local fe80::1, as with router advertisements), eth1 2001:db8:2::10
  (default via 2001:db8:2::1), eth2 2001:db8:3::65 (no gateway).
- host: strict reverse path filtering (all, default and every uplink
  rp_filter=1), ip_forward=0.

Without help, a UDP server bound to 0.0.0.0 on the host answers c1 asking
192.0.2.11 from 192.0.2.10 (dig ignores the reply), and c2's query never
reaches it (rp_filter drops it: the best route back is via eth0; and if it
did get through, the reply would leave via eth0 and r1 would drop it).

Modules, by concern:

- ``topology``: :class:`Lab` (builds the host, runs commands and processes
  in it, deletes it), :class:`Path`, :func:`missing_requirements`;
- ``processes``: processes started in the lab, tracked with their process
  groups until they are gone;
- ``snapshot``: the state of the host namespace, and :func:`diff_states`;
- ``dns``: an unbound config and dig as the client;
- ``wait``: :func:`wait_until`, polling with a deadline;
- ``shell``: :func:`run` (the one subprocess call) and :class:`LabError`.

Everything a test or a script needs is importable from ``tests.lab``.
"""

from tests.lab.dns import TEST_ANSWER, TEST_NAME, dig, dig_from, unbound_conf, wait_answered
from tests.lab.processes import group_members
from tests.lab.shell import LabError, netns_names, run
from tests.lab.snapshot import diff_states, snapshot
from tests.lab.topology import BASELINE_SYSCTLS, NS_PREFIX, ROLES, Lab, Path, missing_requirements, netns_cookie
from tests.lab.wait import wait_until

__all__ = [
    "BASELINE_SYSCTLS",
    "NS_PREFIX",
    "ROLES",
    "TEST_ANSWER",
    "TEST_NAME",
    "Lab",
    "LabError",
    "Path",
    "diff_states",
    "dig",
    "dig_from",
    "group_members",
    "missing_requirements",
    "netns_cookie",
    "netns_names",
    "run",
    "snapshot",
    "unbound_conf",
    "wait_answered",
    "wait_until",
]
