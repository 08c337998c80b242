"""Containers without unmasked host paths (issue 13): /proc/sys read-only, the sysctls preset.

A container runtime gives its PID 1 a mount namespace where /proc/sys is read-only, and sets
`--sysctl` values in the container's network namespace before starting it. Here the "container"
is nswrap started in a mount namespace of its own (`unshare --mount`) inside the lab host's
network namespace (the runtime would have attached its networks the same way: the lab's uplinks
and clients are the container's networks). Before /proc/sys is made read-only (a read-only bind
mount onto itself), the presets are written, as `docker run --sysctl ...` does:

    net.ipv4.ip_forward=1  net.ipv4.conf.all.src_valid_mark=1  net.ipv6.conf.all.forwarding=1

With all three, nswrap needs to write nothing and serves every path of the lab, IPv4 and IPv6.
Without an IPv4 one, it changes nothing and exits 125 with one line naming exactly the `--sysctl`
flags to add. Without the IPv6 one it serves IPv4 and says, in one line, which flag IPv6 needs.
"""

from __future__ import annotations

import re
import signal

import pytest

from tests.lab import diff_states, wait_until
from tests.system.common import NSWRAP, datapath, output
from tests.system.udpmany import COMMAND as UDPMANY, unanswered

PRESETS = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.src_valid_mark": "1", "net.ipv6.conf.all.forwarding": "1"}
PORT = 5353

# The container's entrypoint: the runtime's presets, /proc/sys read-only (checked by writing a
# value back unchanged: that must fail), then nswrap.
ENTRYPOINT = """\
for setting in $PRESETS; do sysctl -qw "$setting" || exit 96; done
mount -o bind,ro /proc/sys /proc/sys || exit 97
v=$(cat /proc/sys/net/ipv4/ip_forward)
if (printf %s "$v" > /proc/sys/net/ipv4/ip_forward) 2>/dev/null; then echo "/proc/sys is writable" >&2; exit 98; fi
exec "$@"
"""


@pytest.fixture
def container(lab, tmp_path):
    """run(presets, *nswrap_args) -> the container's process (nswrap, once the entrypoint exec'd it).
    The presets are the namespace's settings, not nswrap's: they are put back afterwards."""
    saved = {key: lab.exec(lab.host, ["sysctl", "-n", key]).stdout.strip() for key in PRESETS}

    def run(presets: dict[str, str], *args: str):
        env = {"PRESETS": " ".join(f"{k}={v}" for k, v in presets.items()), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        return lab.spawn(lab.host, ["env", *(f"{k}={v}" for k, v in env.items()), "unshare", "--mount",
                                    "sh", "-c", ENTRYPOINT, "entrypoint", *NSWRAP, *args],
                         stdout=(tmp_path / "nswrap.out").open("w"), stderr=(tmp_path / "nswrap.err").open("w"))

    yield run
    lab.stop_all()
    # ip_forward first: writing it resets every interface's IPv4 forwarding
    lab.exec(lab.host, ["sysctl", "-qw", *(f"{k}={v}" for k, v in saved.items())])


def preset_state(lab, presets: dict[str, str]) -> dict:
    """The host as the runtime leaves it for the container: presets written (then put back)."""
    if not presets:
        return lab.state()
    saved = {key: lab.exec(lab.host, ["sysctl", "-n", key]).stdout.strip() for key in presets}
    lab.exec(lab.host, ["sysctl", "-qw", *(f"{k}={v}" for k, v in presets.items())])
    state = lab.state()
    lab.exec(lab.host, ["sysctl", "-qw", *(f"{k}={v}" for k, v in saved.items())])
    return state


def test_with_the_sysctls_preset_it_writes_nothing_and_serves_every_path(lab, tmp_path, container):
    before = preset_state(lab, PRESETS)
    proc = container(PRESETS, "--ports", str(PORT), "--", *UDPMANY, "serve", "--tag", str(tmp_path), str(PORT))
    wait_until(lambda: "ready" in output(tmp_path) or proc.poll() is not None, 30, what="the server is ready")
    assert proc.poll() is None, output(tmp_path, stream="err")
    assert unanswered(lab, (*lab.paths, *lab.paths6), [PORT]) == []
    serving = lab.state()["sysctl"]
    changed = {k: (v, serving[k]) for k, v in before["sysctl"].items() if serving.get(k) != v}
    assert not changed, f"sysctls changed: {changed}"
    assert lab.stop(proc) == 128 + signal.SIGTERM
    err = output(tmp_path, stream="err")
    assert "sysctl" not in err and "read-only" not in err, err
    assert not diff_states(before, lab.state()), diff_states(before, lab.state())


def flags(text: str) -> set[str]:
    return set(re.findall(r"--sysctl ([a-z0-9_.]+=[0-9]+)", text))


IPV6 = "net.ipv6.conf.all.forwarding"
MISSING_IPV4 = {
    "none-preset": {},
    "ip_forward-only": {"net.ipv4.ip_forward": "1"},
    "src_valid_mark-and-ipv6-only": {"net.ipv4.conf.all.src_valid_mark": "1", IPV6: "1"},
}


@pytest.mark.parametrize("case", list(MISSING_IPV4))
def test_without_the_ipv4_presets_it_exits_naming_exactly_the_flags_to_add(lab, tmp_path, container, case):
    presets = MISSING_IPV4[case]
    before = preset_state(lab, presets)
    proc = container(presets, "-u", "eth0", "-u", "eth1", "--ports", str(PORT), "--", *UDPMANY, "serve", str(PORT))
    assert proc.wait(60) == 125, output(tmp_path, stream="err")
    said = [line for line in output(tmp_path, stream="err").splitlines() if line.strip()]
    missing = {f"{k}={v}" for k, v in PRESETS.items() if presets.get(k) != v}
    # one line for IPv4 (fatal), and one note for IPv6 if that is missing too (IPv4 alone could serve;
    # the fast path serves IPv6 without forwarding: no note)
    if datapath() == "bpf":
        missing.discard(f"{IPV6}=1")
    assert len(said) == 1 + (f"{IPV6}=1" in missing), said
    assert all(line.startswith("nswrap: ") and "read-only" in line for line in said), said
    assert flags(said[-1]) == {m for m in missing if m.startswith("net.ipv4.")}, said[-1]
    assert flags("\n".join(said)) == missing, said
    assert output(tmp_path) == "", "the server never started"
    assert not diff_states(before, lab.state()), diff_states(before, lab.state())


def test_without_the_ipv6_preset_it_serves_ipv4_and_names_the_flag(lab, tmp_path, container):
    presets = {k: v for k, v in PRESETS.items() if k != IPV6}
    before = preset_state(lab, presets)
    proc = container(presets, "-u", "eth0", "-u", "eth1", "--ports", str(PORT), "--", *UDPMANY, "serve", str(PORT))
    wait_until(lambda: "ready" in output(tmp_path) or proc.poll() is not None, 30, what="the server is ready")
    assert proc.poll() is None, output(tmp_path, stream="err")
    served = [p for p in (*lab.paths, *lab.paths6) if p.uplink in ("eth0", "eth1")]
    missed = unanswered(lab, served, [PORT])
    said = [line for line in output(tmp_path, stream="err").splitlines() if line.strip()]
    if datapath() == "bpf":  # the fast path needs no IPv6 forwarding: every path is served, nothing said
        assert missed == [] and said == [], (missed, said)
    else:
        assert missed == [p.name + f" port {PORT}" for p in served if ":" in p.address], missed
        (line,) = said
        assert "IPv6" in line and flags(line) == {f"{IPV6}=1"}, line
    changed = {k: v for k, v in lab.state()["sysctl"].items() if before["sysctl"].get(k, v) != v}
    assert not changed, f"sysctls changed: {changed}"
    assert lab.stop(proc) == 128 + signal.SIGTERM
    assert not diff_states(before, lab.state()), diff_states(before, lab.state())
