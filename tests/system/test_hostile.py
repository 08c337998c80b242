"""A hostile local user and hostile state (issue 12), tried as the attacker would.

The attacker is `nobody` (`setpriv --reuid=65534 --regid=65534 --clear-groups`, no capabilities)
in the lab host's network namespace, where nswrap runs. Forged state is planted as root, as a bug
or a compromised file would leave it. Each test shows nswrap does not care, or does not act:

- the old abstract socket names (the setup lock and an instance's liveness) held by a user stop
  nothing: starts, `cleanup` and `list` work as if they were free;
- /run/nswrap and everything in it is root's only, 0700/0600 even when nswrap starts under
  `umask 000`;
- a forged record or allocation (an id of `../..`, a sysctl key leading out of /proc/sys, a zero
  mark mask, a FIFO) is reported and skipped: no file written or deleted outside, the conntrack
  table not flushed, `cleanup` does not hang, and starts still work;
- a local user reaches the server only through published ports of the host's addresses, never
  through the server's private address;
- `cleanup` leaves alone what merely looks like nswrap's (links `nsw-*`, a table `nswrap-mine`, a
  rule of protocol 110 elsewhere).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab import diff_states, wait_until
from tests.system.common import NSWRAP, UDPECHO, nswrap, output, start
from tests.system.udpmany import COMMAND as UDPMANY, unanswered

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
RUN = Path("/run/nswrap")
PORT = 5353


def serve(lab, tmp_path, *args, name="nswrap", port=PORT):
    server = [*UDPMANY, "serve", "--tag", str(tmp_path), str(port)]
    proc = start(lab, tmp_path, *args, "--ports", str(port), "--", *server, name=name)
    wait_until(lambda: "ready" in output(tmp_path, name) or proc.poll() is not None, 30, what=f"{name}: the server is ready")
    assert proc.poll() is None, output(tmp_path, name, "err")
    return proc


def instance_id(lab, pid: int) -> str:
    listed = nswrap(lab, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (found,) = [row["id"] for row in json.loads(listed.stdout)["instances"] if row["pid"] == pid]
    return found


def live_ids(lab) -> list[str]:
    return [row["id"] for row in json.loads(nswrap(lab, "list", "--json").stdout)["instances"]]


def kill_hard(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def state_dir(lab) -> Path:
    """/run/nswrap/<this network namespace's cookie> (state.py's layout), computed independently."""
    cookie = lab.exec(lab.host, [sys.executable, "-c", "import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM);"
                                 " print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), 'little'))"]).stdout.strip()
    return RUN / f"c{cookie}"


# --- the old abstract socket names ----------------------------------------------------------------

HOLDER = """
import socket, sys, time
held = []
for name in sys.argv[1:]:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
        s = socket.socket(socket.AF_UNIX, kind)
        s.bind("\\0" + name)
        if kind != socket.SOCK_DGRAM:
            s.listen()
        held.append(s)
print("held", flush=True)
time.sleep(120)
"""


def test_a_user_holding_the_old_lock_and_liveness_names_stops_nothing(lab, tmp_path):
    before = lab.state()
    dead = serve(lab, tmp_path, name="dead")
    dead_id = instance_id(lab, dead.pid)
    kill_hard(dead)  # leftovers to sweep
    holder = lab.spawn(lab.host, [*NOBODY, sys.executable, "-c", HOLDER, "nswrap/setup-lock", f"nswrap/instance/{dead_id}"],
                       stdout=(tmp_path / "holder.out").open("w"), stderr=(tmp_path / "holder.err").open("w"))
    wait_until(lambda: "held" in output(tmp_path, "holder") or holder.poll() is not None, 20, what="the user holds the names")
    assert holder.poll() is None, output(tmp_path, "holder", "err")

    assert dead_id not in live_ids(lab), "a user's socket does not make a dead instance alive"
    done = nswrap(lab, "cleanup", timeout=60)  # the user holds the names 120 s: waiting for them would time out
    assert done.returncode == 0, done.stderr
    assert f"{dead_id}.json" in done.stdout, done.stdout  # the dead instance's record is removed
    assert not diff_states(before, lab.state()), diff_states(before, lab.state())

    proc = serve(lab, tmp_path)
    assert unanswered(lab, (lab.paths[2], lab.paths6[2]), [PORT]) == []
    assert lab.stop(proc) == 128 + signal.SIGTERM
    lab.stop(holder)


def test_the_state_directory_is_roots_only(lab, tmp_path):
    proc = serve(lab, tmp_path)
    directory = state_dir(lab)
    files = sorted(p.name for p in directory.iterdir())
    assert f"{instance_id(lab, proc.pid)}.json" in files
    for path in [RUN, directory]:
        st = path.lstat()
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700, path
    for target in [RUN, directory, *(directory / name for name in files)]:
        done = lab.exec(lab.host, [*NOBODY, "cat" if target.is_file() else "ls", str(target)], check=False)
        assert done.returncode != 0 and "Permission denied" in done.stderr, (target, done.stdout, done.stderr)
    assert lab.stop(proc) == 128 + signal.SIGTERM


def test_state_is_private_even_under_umask_000(lab, tmp_path):
    """nswrap creates /run/nswrap itself (a fresh tmpfs on /run, in a mount namespace of its own)
    under `umask 000`: directories 0700, files 0600, all root's."""
    script = 'mount -t tmpfs -o mode=0755 tmpfs /run && umask 000 && exec "$@"'
    proc = lab.spawn(lab.host, ["unshare", "--mount", "sh", "-c", script, "sh", *NSWRAP, "--ports", str(PORT), "--",
                                *UDPMANY, "serve", str(PORT)],
                     stdout=(tmp_path / "nswrap.out").open("w"), stderr=(tmp_path / "nswrap.err").open("w"))
    wait_until(lambda: "ready" in output(tmp_path) or proc.poll() is not None, 30, what="the server is ready")
    assert proc.poll() is None, output(tmp_path, stream="err")
    run = Path(f"/proc/{proc.pid}/root/run/nswrap")  # /run as nswrap's mount namespace sees it
    found = {}
    for root, dirs, names in os.walk(run):
        for name in [*dirs, *names]:
            st = os.lstat(os.path.join(root, name))
            found[os.path.relpath(os.path.join(root, name), run)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid)
    st = run.lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, 0)
    assert any(name.endswith(".json") for name in found), found
    wrong = {name: (oct(mode), uid) for name, (kind, mode, uid) in found.items()
             if uid != 0 or mode != (0o700 if kind == stat.S_IFDIR else 0o600)}
    assert not wrong, f"not 0700/0600 root's: {wrong}"
    assert lab.stop(proc) == 128 + signal.SIGTERM


# --- forged state ---------------------------------------------------------------------------------


def templates(lab, tmp_path) -> tuple[dict, dict]:
    """A real record and allocation of this nswrap (read while an instance serves), to forge from."""
    proc = serve(lab, tmp_path, name="template")
    directory = state_dir(lab)
    record = json.loads((directory / f"{instance_id(lab, proc.pid)}.json").read_text())
    allocation = json.loads((directory / "datapath.json").read_text())
    assert lab.stop(proc) == 128 + signal.SIGTERM
    return record, allocation


FORGED = ["id-dotdot", "sysctl-key-in-allocation", "sysctl-key-in-old-record", "zero-mark-mask", "mark-zero-in-allocation",
          "old-record-marks-0", "fifo"]


@pytest.fixture
def canaries(lab):
    """Files a forged entry would overwrite or delete if it were acted on; and an unrelated flow
    in the conntrack table (a forged zero mark would flush the whole table)."""
    token = secrets.token_hex(4)
    files = {Path(f"/tmp/nswrap-canary-{token}"): "1\n", RUN / "...json": "canary\n", RUN / "...live": "canary\n"}
    for path, text in files.items():
        assert not path.exists()
        path.write_text(text)
    lab.exec(lab.host, ["conntrack", "-I", "-p", "udp", "-s", "192.0.2.50", "-d", "192.0.2.10", "--sport", "1111",
                        "--dport", "2222", "--timeout", "600"])
    try:
        yield token, files
    finally:
        for path in files:
            path.unlink(missing_ok=True)
        lab.exec(lab.host, ["conntrack", "-D", "-p", "udp", "-s", "192.0.2.50"], check=False)


@pytest.mark.parametrize("forged", FORGED)
def test_forged_state_is_reported_and_never_acted_on(lab, tmp_path, canaries, forged):
    token, files = canaries
    record, allocation = templates(lab, tmp_path)
    before = lab.state()
    directory = state_dir(lab)
    directory.mkdir(mode=0o700, exist_ok=True)  # the last instance removed it: as nswrap would make it
    cookie = directory.name[1:]
    fake = secrets.token_hex(3)
    escape = f"../../../tmp/nswrap-canary-{token}"  # from /proc/sys: /tmp/...
    planted: list[Path] = []

    def plant(path: Path, content: dict | None) -> None:
        if content is None:
            os.mkfifo(path, 0o600)
        else:
            path.write_text(json.dumps(content))
            path.chmod(0o600)
        planted.append(path)

    try:
        if forged == "id-dotdot":
            plant(directory / f"{fake}.json", {**record, "id": "../.."})
        elif forged == "sysctl-key-in-allocation":
            plant(directory / "datapath.json", {**allocation, "sysctls": [{"key": escape, "original": "0", "ours": "1"}]})
        elif forged == "sysctl-key-in-old-record":
            plant(RUN / f"{fake}.json", {"id": fake, "netns": f"cookie:{cookie}", "changed": {escape: "0"}})
        elif forged == "zero-mark-mask":
            plant(directory / f"{fake}.json", {**record, "id": fake, "mark_mask": 0})
            plant(directory / "datapath.json", {**allocation, "mark_mask": 0})
        elif forged == "mark-zero-in-allocation":  # mark 0 under the mask: "every unmarked flow"
            uplinks = [{**u, "index": 0} for u in allocation["uplinks"]]
            plant(directory / "datapath.json", {**allocation, "uplinks": uplinks})
        elif forged == "old-record-marks-0":
            plant(RUN / f"{fake}.json", {"id": fake, "netns": f"cookie:{cookie}", "changed": {}, "marks": [0], "mark_mask": 0})
        elif forged == "fifo":
            plant(directory / f"{fake}.json", None)
            plant(directory / f"{fake}.live", None)
            plant(directory / "datapath.json", None)

        done = nswrap(lab, "cleanup", timeout=60)  # a FIFO opened for reading would block: the timeout fails it
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
        reported = [p for p in planted if str(p) in done.stderr]
        if forged != "old-record-marks-0":  # the old version had no marks in its records: nothing to validate
            assert reported, f"cleanup did not report {[str(p) for p in planted]}:\n{done.stderr}"
        for path, text in files.items():
            assert path.read_text() == text, f"{path} was written or deleted"
        flows = lab.exec(lab.host, ["conntrack", "-L", "-p", "udp", "-s", "192.0.2.50"], check=False).stdout
        assert "dport=2222" in flows, "the conntrack table was flushed"
        assert not diff_states(before, lab.state()), diff_states(before, lab.state())

        proc = serve(lab, tmp_path)  # and starts still work
        assert unanswered(lab, (lab.paths[2], lab.paths6[2]), [PORT]) == []
        assert lab.stop(proc) == 128 + signal.SIGTERM
        for path, text in files.items():
            assert path.read_text() == text, f"{path} was written or deleted"
        assert "dport=2222" in lab.exec(lab.host, ["conntrack", "-L", "-p", "udp", "-s", "192.0.2.50"], check=False).stdout
    finally:
        for path in planted:
            path.unlink(missing_ok=True)
        if directory.exists() and not [n for n in os.listdir(directory) if n.endswith(".live")]:
            shutil.rmtree(directory)  # this lab's own (no instance is left), about to go with its namespace


# --- the server's private address -----------------------------------------------------------------


def private_addresses(lab) -> dict[int, str]:
    """The server's end of the veth, read from the host's end (ip -json): the next address."""
    import ipaddress

    links = json.loads(lab.exec(lab.host, ["ip", "-json", "addr", "show"]).stdout)
    (veth,) = [link for link in links if link["ifname"].startswith("nsw-")]
    return {4 if a["family"] == "inet" else 6: str(ipaddress.ip_address(a["local"]) + 1)
            for a in veth["addr_info"] if a.get("scope") == "global"}


def socat_answers(lab, user: list[str], proto: str, address: str, port: int) -> subprocess.Popen:
    family = "6" if ":" in address else "4"
    where = f"[{address}]" if family == "6" else address
    options = ",connect-timeout=2" if proto == "TCP" else ""
    argv = ["ip", "netns", "exec", lab.host, *user, "socat", "-T2", "-", f"{proto}{family}:{where}:{port}{options}"]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


@pytest.mark.parametrize("user", ["nobody", "root"])
def test_local_users_reach_the_server_only_through_published_ports(lab, tmp_path, user):
    """Published: udp 5353 and tcp 5354. The server also listens on udp 7777 and tcp 7778."""
    listen = " & ".join(f"socat TCP6-LISTEN:{p},ipv6only=0,fork,reuseaddr EXEC:cat" for p in (5354, 7778))
    server = ["sh", "-c", f"{listen} & exec {' '.join(UDPMANY)} serve --tag {tmp_path} 5353 7777"]
    proc = start(lab, tmp_path, "--ports", "5353,5354/tcp", "--", *server)
    wait_until(lambda: "ready" in output(tmp_path) or proc.poll() is not None, 30, what="the server is ready")
    as_user = NOBODY if user == "nobody" else []

    def answers(cases):
        probes = {case: socat_answers(lab, as_user, *case) for case in cases}
        results = {}
        for case, probe in probes.items():
            out, _ = probe.communicate("ping\n", timeout=30)
            results[case] = "ping" in out
        return results

    # the method works: the published ports on the host's own addresses answer this user
    published = [(proto, address, port) for address in ("192.0.2.10", "2001:db8:2::10")
                 for proto, port in (("UDP", 5353), ("TCP", 5354))]
    wait_until(lambda: all(answers(published).values()), 15, what="published ports answer the local user")
    private = private_addresses(lab)
    around = (("UDP", 7777), ("TCP", 7778), ("UDP", 5353), ("TCP", 5354))  # unpublished, and published ones
    refused = [(proto, private[v], port) for v in (4, 6) for proto, port in around]
    refused += [("UDP", "192.0.2.10", 7777), ("TCP", "192.0.2.10", 7778)]
    got = answers(refused)
    assert not any(got.values()), f"reached the server around its published ports: {[c for c, ok in got.items() if ok]}"
    assert lab.stop(proc) == 128 + signal.SIGTERM


# --- look-alikes -----------------------------------------------------------------------------------

LOOK_ALIKES = """
ip link add nsw-foreign type veth peer name nsw-abcdef
nft add table inet nswrap-mine
nft add chain inet nswrap-mine c '{ type filter hook forward priority 5; }'
nft add table ip nswrap-mine
ip rule add priority 7000 lookup 7000 protocol 110
ip route add 203.0.113.200/32 dev eth2 table 7000 protocol 110
"""
REMOVE_LOOK_ALIKES = """
ip link del nsw-foreign 2>/dev/null || true
nft delete table inet nswrap-mine 2>/dev/null || true
nft delete table ip nswrap-mine 2>/dev/null || true
ip rule del priority 7000 2>/dev/null || true
ip route flush table 7000 2>/dev/null || true
"""


def test_cleanup_leaves_alone_what_only_looks_like_nswraps(lab, tmp_path):
    lab.exec(lab.host, ["sh", "-ec", LOOK_ALIKES])
    try:
        baseline = lab.state()
        done = nswrap(lab, "cleanup")
        assert (done.returncode, done.stdout.strip()) == (0, "nothing to clean up"), done.stdout + done.stderr
        assert not diff_states(baseline, lab.state()), diff_states(baseline, lab.state())
        dead = serve(lab, tmp_path, name="dead")  # a start sweeps; a dead instance's leftovers ...
        kill_hard(dead)
        proc = serve(lab, tmp_path)
        assert lab.stop(proc) == 128 + signal.SIGTERM
        done = nswrap(lab, "cleanup")  # ... and cleanup after it
        assert done.returncode == 0, done.stderr
        assert not diff_states(baseline, lab.state()), diff_states(baseline, lab.state())
    finally:
        lab.exec(lab.host, ["sh", "-c", REMOVE_LOOK_ALIKES])


def test_a_foreign_table_of_our_name_is_replaced_with_a_warning(lab, tmp_path):
    """Someone's own `inet nswrap` table (no version element: not nswrap's) is not silently taken."""
    lab.exec(lab.host, ["nft", "add table inet nswrap; add chain inet nswrap theirs"])
    proc = serve(lab, tmp_path)
    try:
        line = next(x for x in output(tmp_path, stream="err").splitlines() if "did not make" in x)
        assert line == "nswrap: replacing a table 'inet nswrap' that nswrap did not make (it has no version element)"
        listed = json.loads(lab.exec(lab.host, ["nft", "-j", "list", "table", "inet", "nswrap"]).stdout)["nftables"]
        chains = [o["chain"]["name"] for o in listed if "chain" in o]
        assert "theirs" not in chains and chains, chains
        assert unanswered(lab, (lab.paths[2],), [PORT]) == []
    finally:
        assert lab.stop(proc) == 128 + signal.SIGTERM


# A client in c1 with one published UDP flow up (it got its echo), then waiting for anything else
# on that socket: "UP", then "GOT <data>" or "NOTHING".
VICTIM = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("", 40000)); s.connect((sys.argv[1], 5353)); s.settimeout(0.5)
for _ in range(10):
    s.send(b"ping")
    try:
        if s.recv(100) == b"ping": break
    except socket.timeout:
        pass
else:
    sys.exit("no echo")
print("UP", flush=True)
s.settimeout(3)
try:
    print("GOT", s.recv(100), flush=True)
except socket.timeout:
    print("NOTHING", flush=True)
"""
# c3, a LAN peer on eth2, poses as the server: its address, port 5353, to the victim's flow.
FORGER = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5353))
for _ in range(5):
    s.sendto(b"INJECT", (sys.argv[2], 40000))
"""


def global_address6(lab, ns: str, dev: str) -> str:
    shown = json.loads(lab.exec(ns, ["ip", "-j", "-6", "addr", "show", "dev", dev, "scope", "global"]).stdout)
    return shown[0]["addr_info"][0]["local"]


def server_address6(lab) -> str:
    """The server's IPv6 address: its veth's host end's (::1 of the instance's /64) plus one (the
    reply direction of its flows, on either datapath)."""
    links = json.loads(lab.exec(lab.host, ["ip", "-j", "link", "show"]).stdout)
    (veth,) = [link["ifname"] for link in links if link["ifname"].startswith("nsw-")]
    return str(ipaddress.ip_address(global_address6(lab, lab.host, veth)) + 1)


@pytest.mark.parametrize("router", [False, True], ids=["forwarding-off", "host-already-forwards"])
def test_a_lan_peer_cannot_forge_the_servers_reply(lab, tmp_path, router):
    """Conntrack takes any packet with a flow's reply addresses and ports as its reply, whatever
    interface it arrives on: a peer that puts the server's address on its own interface must not
    get a datagram through the host, reverse-NATed to look like the host's answer (IPv6: no
    rp_filter), whether nswrap turned forwarding on (a guarded uplink) or the host forwards anyway."""
    forwarding = "net.ipv6.conf.all.forwarding"
    before = lab.exec(lab.host, ["sysctl", "-n", forwarding]).stdout.strip()
    if router:
        lab.exec(lab.host, ["sysctl", "-qw", f"{forwarding}=1"])
    try:
        proc = start(lab, tmp_path, "--ports", "5353", "--", *UDPECHO, "serve", "5353")
        wait_until(lambda: "ready" in output(tmp_path), 20, what="server ready")
        victim = lab.spawn(lab.ns("c1"), [sys.executable, "-c", VICTIM, "2001:db8:1::10"],
                           stdout=subprocess.PIPE, text=True)
        assert victim.stdout.readline().strip() == "UP"
        server, client = server_address6(lab), global_address6(lab, lab.ns("c1"), "eth0")
        c3 = lab.ns("c3")
        lab.exec(c3, ["ip", "-6", "addr", "add", f"{server}/128", "dev", "eth0", "nodad"])
        try:
            lab.exec(c3, [sys.executable, "-c", FORGER, server, client])
        finally:
            lab.exec(c3, ["ip", "-6", "addr", "del", f"{server}/128", "dev", "eth0"])
        assert victim.communicate(timeout=15)[0].strip() == "NOTHING"
        assert lab.stop(proc) == 128 + signal.SIGTERM
    finally:
        lab.exec(lab.host, ["sysctl", "-qw", f"{forwarding}={before}"])
