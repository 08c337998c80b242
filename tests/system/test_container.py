"""nswrap as the entrypoint of a container attached to two networks.

The "container" is a process started with fresh PID, mount, UTS and network namespaces
(`unshare`, as a container runtime does), inside the lab's host namespace. Like `docker network
connect`, the test then moves one end of a veth pair per network into the container's network
namespace and configures addresses and the default route from outside (`nsenter --net`); the
container's entrypoint waits for both interfaces and the default route, then execs nswrap, which
execs nothing more than a stock unbound bound to 0.0.0.0.

     client a (203.0.113.2, on a's lo) ── a: eth0 192.0.2.1/24 ══ net0 192.0.2.10/24    ┐ container:
     client b (203.0.113.130, on b's lo) ─ b: eth0 198.51.100.1/24 ══ net1 198.51.100.10/24 ┘ default via net0

a and b are the networks' gateways and their clients at once (the client address sits on the
gateway's lo; b's own address 198.51.100.1 is a client on net1's subnet), and forward nothing.
Without nswrap the answer to b's client leaves through net0 (the container's only default route)
and a drops it; with nswrap it leaves through net1. As after `docker network connect`, net1 has no
default route, so nswrap needs its gateway (`--uplink net1=198.51.100.1`, here NSWRAP_UPLINK) to
answer b's remote client; without it nswrap serves net1's own subnet only and warns.

SIGTERM to the container's PID 1 (nswrap) stops it promptly with unbound's status 0, and nothing
is left: no process, no record, the container's network namespace (its veths' peers vanish). The
lab host namespace is only the container's surroundings: the `lab` fixture checks that it is
unchanged, and the namespaces a and b are deleted in a `finally`.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.lab import TEST_ANSWER, TEST_NAME, netns_cookie, unbound_conf, wait_until
from tests.system.common import NSWRAP, processes_running

# name: (gateway/client-side address, client address on the gateway's lo, container address, container ifname)
NETWORKS = {
    "a": ("192.0.2.1/24", "203.0.113.2", "192.0.2.10", "net0"),
    "b": ("198.51.100.1/24", "203.0.113.130", "198.51.100.10", "net1"),
}

# The entrypoint: /sys shows the container's own interfaces only once sysfs is mounted from inside
# its network namespace; then wait (bounded: 30 s) until net0 and net1 are up and the default route
# is there (the test adds it last), and exec the server.
ENTRYPOINT = """\
mount -t sysfs sysfs /sys || exit 97
i=0
until [ "$(cat /sys/class/net/net0/operstate 2>/dev/null)" = up ] \
   && [ "$(cat /sys/class/net/net1/operstate 2>/dev/null)" = up ] \
   && [ -n "$(ip -4 route show default)" ]; do
    i=$((i + 1)); [ "$i" -le 600 ] || exit 98
    sleep 0.05
done
echo networks attached
exec "$@"
"""


def dig_from_client(lab, gateway_ns: str, source: str, address: str, tcp: bool = False) -> str | None:
    """Ask *address* from *source* (a client address in *gateway_ns*); dig ignores answers from any
    other source address, so an answer means it came from *address*."""
    argv = ["dig", "-b", source, f"@{address}", TEST_NAME, "A", "+short", "+tries=1", "+time=1"]
    if tcp:
        argv.append("+tcp")
    try:
        done = lab.exec(gateway_ns, argv, check=False, timeout=10)
    except subprocess.TimeoutExpired:
        return None
    answer = [line for line in done.stdout.splitlines() if line.strip() and not line.startswith(";")]
    return "\n".join(answer) if done.returncode == 0 and answer else None


def attach_networks(lab, pid: int, namespaces: dict[str, str]) -> None:
    """What `docker network connect` does, twice: a veth per network, its inner end moved into the
    container (by pid), addresses and routes configured from outside; the default route last."""
    for name, (gateway_cidr, client, _address, ifname) in NETWORKS.items():
        ns = namespaces[name]
        lab.exec(ns, ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", ifname, "netns", str(pid)])
        lab.exec(ns, ["ip", "-batch", "-"], input="\n".join([
            "link set lo up",
            "link set eth0 up",
            f"addr add {gateway_cidr} dev eth0",
            f"addr add {client}/32 dev lo",
        ]) + "\n")
    inside = ["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-batch", "-"]
    script = ["link set lo up"]
    for _gateway, _client, address, ifname in NETWORKS.values():
        script += [f"addr add {address}/24 dev {ifname}", f"link set {ifname} up"]
    script.append(f"route add default via {NETWORKS['a'][0].split('/')[0]} dev net0")
    done = subprocess.run(inside, input="\n".join(script) + "\n", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def networks(lab):
    """Two gateway namespaces, the lab's own: it deletes them (and reports them if left behind)."""
    return {name: lab.add_namespace(f"net{name}", "client") for name in NETWORKS}


def start_container(lab, tmp_path: Path, server: list[str], name: str, env: dict[str, str]):
    """The container: its PID 1 runs ENTRYPOINT, which execs *server*. Returns (unshare process,
    the container's PID 1 as seen from outside)."""
    proc = lab.spawn(
        lab.host,
        ["unshare", "--pid", "--mount", "--uts", "--net", "--fork", "--mount-proc",
         "sh", "-c", ENTRYPOINT, "entrypoint", *server],
        stdout=(tmp_path / f"{name}.out").open("w"),
        stderr=(tmp_path / f"{name}.err").open("w"),
        env={**{k: v for k, v in os.environ.items() if not k.startswith("NSWRAP_")}, **env},
    )

    def pid1():
        try:  # `ip netns exec` execs unshare, which forks the container's PID 1
            unshare = psutil.Process(proc.pid)
            children = unshare.children() if unshare.name() == "unshare" else []
        except psutil.NoSuchProcess:
            return None
        return children[0] if children else None

    return proc, wait_until(pid1, 10, what="the container's PID 1")


def nswrap_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("nswrap:")]


# How the container's entrypoint runs the server: (nswrap's arguments or None for none, its environment)
VARIANTS = {
    "control-without-nswrap": (None, {}),
    # What `docker network connect` gives: net1 has no default route, so nswrap knows no gateway
    # for it and serves only net1's own subnet there (and says so).
    "nswrap-default-uplinks": (["--ports", "53,53/tcp"], {}),
    # With net1's gateway given (here through the environment, as `docker run -e` would), both
    # networks' remote clients are served.
    "nswrap-gateway-for-net1": (["--ports", "53,53/tcp"], {"NSWRAP_UPLINK": "net0 net1=198.51.100.1"}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_container_on_two_networks_answers_both(lab, networks, tmp_path, variant):
    args, env = VARIANTS[variant]
    conf = unbound_conf(tmp_path)
    server = ["unbound", "-d", "-c", conf]
    if args is not None:
        server = [*NSWRAP, *args, "--", *server]
    proc, pid1 = start_container(lab, tmp_path, server, "container", env)
    err = lambda: (tmp_path / "container.err").read_text()  # noqa: E731

    attach_networks(lab, pid1.pid, networks)
    wait_until(lambda: "networks attached" in (tmp_path / "container.out").read_text() or proc.poll() is not None,
               30, what="the entrypoint saw both networks")
    assert proc.poll() is None, err()

    _, a_client, a_address, _ = NETWORKS["a"]
    b_gateway, b_client, b_address, _ = NETWORKS["b"]
    b_local = b_gateway.split("/")[0]  # a client on net1's own subnet
    ask = lambda net, client, address, tcp=False: dig_from_client(lab, networks[net], client, address, tcp)  # noqa: E731
    try:
        assert wait_until(lambda: ask("a", a_client, a_address), 30) == TEST_ANSWER
    except TimeoutError:
        pytest.fail(f"network a: no answer within 30 s; the container's stderr:\n{err()}")
    if args is None:  # the bug nswrap is for: the answer to network b leaves through net0, and a drops it
        assert ask("b", b_client, b_address) is None
    else:
        assert "nswrap" in pid1.cmdline()[:3], pid1.cmdline()  # python -m nswrap is the container's PID 1
        for tcp in (False, True):
            assert ask("a", a_client, a_address, tcp) == TEST_ANSWER, err()
            assert ask("b", b_local, b_address, tcp) == TEST_ANSWER, err()
        if env:
            for tcp in (False, True):
                assert ask("b", b_client, b_address, tcp) == TEST_ANSWER, err()
            assert nswrap_lines(err()) == [], err()
        else:
            assert nswrap_lines(err()) == ["nswrap: uplink net1 has no gateway: it serves only clients on its own subnets "
                                           "(give one with --uplink net1=GATEWAY to serve the others)"]

    cookie = netns_cookie(["nsenter", f"--net=/proc/{pid1.pid}/ns/net"])
    pid1.send_signal(signal.SIGTERM)
    status = proc.wait(15)  # a hang guard: how fast it stops is the benchmark's
    # 0, not 137: the server stopped on the SIGTERM it was passed, not SIGKILLed by --stop-timeout
    assert status == 0, f"unshare passes on PID 1's status, the server's; stderr: {err()}"
    lab.stop(proc)  # nothing of its process group is left
    assert not processes_running(conf)
    # The container's network namespace died with its processes, and with it the veths' peers.
    for ns in networks.values():
        wait_until(lambda ns=ns: "eth0" not in lab.exec(ns, ["ip", "-o", "link", "show"]).stdout, 10,
                   what=f"{ns}: the container's veth is gone")
    if args is not None:
        assert not Path(f"/run/nswrap/c{cookie}").exists(), "nswrap's state for the container's namespace is left"
    assert "Traceback" not in err()
