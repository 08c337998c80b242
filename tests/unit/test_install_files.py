"""The install and the deployment examples agree with each other (no root, no network, no Docker).

- One path: scripts/install's defaults (/opt/nswrap, linked as /usr/local/bin/nswrap) are what
  examples/nswrap@.service runs (the Debian package installs it with /usr/bin/nswrap instead:
  tests/unit/test_debian.py); the script is executable bash that parses (``bash -n``).
- examples/Dockerfile installs the Debian package scripts/build-deb writes (COPY of
  dist/nswrap_*_all.deb, apt-get install of that file), never pip or scripts/install, and no
  PATH of its own hides /usr/bin.
- examples/unbound.conf passes ``unbound-checkconf``, listens on every address of both families,
  needs no trust anchor file (its inline anchors are the root's KSK-2017 and KSK-2024 DS records;
  compared with Debian's dns-root-data where that is installed), and says it is an open resolver.
- examples/dns.toml and the unit's .env example run unbound with the config where their own
  install line puts it (/etc/nswrap/unbound.conf).
- Containers without unmasking host paths: compose.yaml and kubernetes/pod.yaml set the sysctls
  nswrap asks for when /proc/sys is read-only (net.ipv4.ip_forward=1,
  net.ipv4.conf.all.src_valid_mark=1; pod.yaml also net.ipv6.conf.all.forwarding=1), add only
  NET_ADMIN and SYS_ADMIN, and neither unconfine AppArmor nor /proc (no security_opt, no
  appArmorProfile, not privileged); the Dockerfile's `docker run` line does the same. pod.yaml's
  header names exactly its sysctls for the kubelet's --allowed-unsafe-sysctls (none of them is in
  Kubernetes' safe set).
- The second network's gateway: NSWRAP_UPLINK gives the second interface the gateway of the
  second network (compose: its ipam gateway; Kubernetes: the Multus attachment's).

These are structural checks: no Docker engine or Kubernetes cluster runs here.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.unit.test_examples import dockerfile_instructions

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
INSTALL = REPO / "scripts" / "install"
CONTAINER_SYSCTLS = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.src_valid_mark": "1"}
IPV6_SYSCTL = {"net.ipv6.conf.all.forwarding": "1"}
# Kubernetes' safe sysctls (kubelet pkg/kubelet/sysctl/safe_sysctls.go, up to 1.32): any other
# needs the node's --allowed-unsafe-sysctls.
K8S_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range", "net.ipv4.ip_unprivileged_port_start", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem",
}
# The root zone's key-signing keys as DS records (IANA root-anchors.xml; Debian's dns-root-data).
ROOT_DS = {
    ". DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D",
    ". DS 38696 8 2 683D2D0ACB8C9B712A1948B27F741219298D0A450D612C483AF444A4C0FB2B16",
}


def load_yaml(name: str) -> list:
    yaml = pytest.importorskip("yaml", reason="PyYAML (the test extra) parses the examples")
    return list(yaml.safe_load_all((EXAMPLES / name).read_text()))


def install_default(variable: str) -> str:
    """The default scripts/install gives *variable* (``X=${VARIABLE:-default}``)."""
    match = re.search(rf"\$\{{{variable}:-([^}}]+)\}}", INSTALL.read_text())
    assert match, f"scripts/install has no default for {variable}"
    return match.group(1)


def uplink_gateways(value: str) -> dict[str, str]:
    """NSWRAP_UPLINK's ``IFACE=GATEWAY`` items (whitespace-separated, as nswrap reads them)."""
    return dict(item.split("=", 1) for item in value.split() if "=" in item)


# -- one path -------------------------------------------------------------------------------------


def test_install_script_is_executable_bash():
    assert INSTALL.stat().st_mode & 0o111, "scripts/install is not executable"
    assert INSTALL.read_text().startswith("#!/usr/bin/env bash\n")
    bash = shutil.which("bash")
    assert bash
    done = subprocess.run([bash, "-n", str(INSTALL)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_unit_runs_the_installed_command():
    command = f"{install_default('NSWRAP_BINDIR')}/nswrap"
    assert install_default("NSWRAP_PREFIX") == "/opt/nswrap"
    lines = (EXAMPLES / "nswrap@.service").read_text().splitlines()
    execs = [line.partition("=")[2].split()[0] for line in lines if line.startswith(("ExecStart=", "ExecStopPost="))]
    assert execs and set(execs) == {command}, execs


def test_dockerfile_installs_the_debian_package():
    instructions = dockerfile_instructions()
    copies = [shlex.split(rest) for kw, rest in instructions if kw == "COPY"]
    assert copies == [["dist/nswrap_*_all.deb", "/tmp/"]], copies
    runs = [rest for kw, rest in instructions if kw == "RUN"]
    [install] = [r for r in runs if "nswrap_" in r]
    words = shlex.split(install)
    start = next(i for i, w in enumerate(words) if w == "apt-get" and words[i + 1] == "install")
    command = words[start:words.index("&&", start)]
    assert "/tmp/nswrap_*_all.deb" in command and "-y" in command, command
    assert "./scripts/build-deb" in (EXAMPLES / "Dockerfile").read_text(), "the header says how to make the .deb"
    everything = " ".join(runs)
    for never in ("pip", "scripts/install", "venv", "PIP_"):
        assert never not in everything, f"the image must not use {never}: Debian's packages only"
    for kw, rest in instructions:
        if kw == "ENV" and "PATH" in rest:
            assert "/usr/bin" in rest, f"ENV {rest} hides /usr/bin"
    entrypoint = json.loads(next(rest for kw, rest in reversed(instructions) if kw == "ENTRYPOINT"))
    assert entrypoint[0] in ("nswrap", "/usr/bin/nswrap"), entrypoint


# -- unbound --------------------------------------------------------------------------------------

UNBOUND_CONF = EXAMPLES / "unbound.conf"


def unbound_settings() -> list[tuple[str, str]]:
    """(key, value) of every active line of examples/unbound.conf, quotes kept off."""
    settings = []
    for line in UNBOUND_CONF.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.endswith(":"):
            key, _, value = line.partition(":")
            settings.append((key.strip(), value.strip().strip('"')))
    return settings


def test_unbound_conf_checks():
    if not shutil.which("unbound-checkconf"):
        pytest.skip("unbound-checkconf not installed (package unbound; run scripts/setup)")
    done = subprocess.run(["unbound-checkconf", str(UNBOUND_CONF)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_unbound_conf_serves_every_address_without_a_trust_anchor_file():
    settings = unbound_settings()
    values = lambda key: [v for k, v in settings if k == key]  # noqa: E731
    assert set(values("interface")) == {"0.0.0.0", "::0"}
    assert values("do-ip6") == ["yes"]
    assert {"0.0.0.0/0 allow", "::/0 allow"} <= set(values("access-control"))
    assert "OPEN RESOLVER" in UNBOUND_CONF.read_text(), "the open resolver must be said"
    assert values("chroot") == [""] and values("pidfile") == [""]
    for key in ("auto-trust-anchor-file", "trust-anchor-file", "root-key-sentinel"):
        assert not values(key), f"{key}: a file that must exist first"
    assert set(values("trust-anchor")) == ROOT_DS
    debian = Path("/usr/share/dns/root.ds")  # dns-root-data, if installed: the same anchors
    if debian.exists():
        assert {" ".join(line.replace(" IN ", " ").split()) for line in debian.read_text().splitlines()
                if line.strip()} == ROOT_DS


def test_config_examples_use_the_installed_unbound_conf():
    """dns.toml and the unit's .env example run unbound -c FILE, and their install line puts
    examples/unbound.conf exactly there."""
    toml_text = (EXAMPLES / "dns.toml").read_text()
    command = tomllib.loads(toml_text)["command"]
    conf = command[command.index("-c") + 1]
    unit = (EXAMPLES / "nswrap@.service").read_text()
    [args] = [line.split("NSWRAP_ARGS=", 1)[1] for line in unit.splitlines() if "NSWRAP_ARGS=" in line]
    server = args.split()[args.split().index("--") + 1:]
    assert server[:2] == ["unbound", "-d"] and server[server.index("-c") + 1] == conf
    for text in (toml_text, unit):
        installs = [shlex.split(line.lstrip("# "))for line in text.splitlines()
                    if "install " in line and "examples/unbound.conf" in line]
        assert installs, "no line installing examples/unbound.conf"
        for argv in installs:
            target = argv[argv.index("-t") + 1]
            assert conf == str(Path(target) / "unbound.conf"), (argv, conf)


# -- containers -----------------------------------------------------------------------------------


def test_compose_without_unconfined_and_with_the_gateway():
    [compose] = load_yaml("compose.yaml")
    [service] = [s for s in compose["services"].values() if "build" in s]
    assert set(service["cap_add"]) == {"NET_ADMIN", "SYS_ADMIN"}
    assert not service.get("privileged") and "security_opt" not in service, service
    sysctls = {k: str(v) for k, v in service["sysctls"].items()}
    assert sysctls == CONTAINER_SYSCTLS, sysctls

    # The second network (the one that is not first by priority) gets its gateway.
    attached = sorted(service["networks"].items(), key=lambda kv: (-kv[1].get("priority", 0), kv[0]))
    (first, _), (second, _) = attached
    gateways = uplink_gateways(service["environment"]["NSWRAP_UPLINK"])
    [gateway] = [config["gateway"] for config in compose["networks"][second]["ipam"]["config"]]
    assert gateways == {"eth1": gateway}, (gateways, second)
    assert "eth0" in service["environment"]["NSWRAP_UPLINK"].split(), "eth0 must stay an uplink"


def test_kubernetes_without_unconfined_and_with_the_gateway():
    by_kind = {d["kind"]: d for d in load_yaml("kubernetes/pod.yaml")}
    pod, attachment = by_kind["Pod"], by_kind["NetworkAttachmentDefinition"]
    [container] = pod["spec"]["containers"]
    security = container["securityContext"]
    assert set(security["capabilities"]["add"]) == {"NET_ADMIN", "SYS_ADMIN"}
    assert not security.get("privileged") and "appArmorProfile" not in security, security
    assert "appArmorProfile" not in pod["spec"].get("securityContext", {})
    sysctls = {s["name"]: s["value"] for s in pod["spec"]["securityContext"]["sysctls"]}
    assert sysctls == {**CONTAINER_SYSCTLS, **IPV6_SYSCTL}, sysctls
    unsafe = set(sysctls) - K8S_SAFE_SYSCTLS
    header = (EXAMPLES / "kubernetes" / "pod.yaml").read_text()
    [allowed] = re.findall(r"--allowed-unsafe-sysctls=(\S+)", header)
    assert set(allowed.split(",")) == unsafe, "the kubelet flag in the header must name them all"

    [address] = json.loads(attachment["spec"]["config"])["ipam"]["addresses"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert uplink_gateways(env["NSWRAP_UPLINK"]) == {"net1": address["gateway"]}
    assert ipaddress.ip_address(address["gateway"]) in ipaddress.ip_interface(address["address"]).network
    assert "eth0" in env["NSWRAP_UPLINK"].split()


def test_dockerfile_run_line_without_unconfined():
    """The `docker run` the Dockerfile's header shows: the two capabilities, the sysctls, and no
    security option."""
    header = [line.lstrip("# ").rstrip() for line in (EXAMPLES / "Dockerfile").read_text().splitlines()
              if line.startswith("#")]
    start = next(i for i, line in enumerate(header) if line.startswith("docker run"))
    command = ""
    for line in header[start:]:  # the first `docker run`, with its continuation lines
        command += " " + line.removesuffix("\\")
        if not line.endswith("\\"):
            break
    argv = shlex.split(command, comments=True)
    assert "--security-opt" not in argv and "--privileged" not in argv, argv
    caps = {argv[i + 1] for i, a in enumerate(argv) if a == "--cap-add"}
    sysctls = dict(argv[i + 1].split("=") for i, a in enumerate(argv) if a == "--sysctl")
    assert caps == {"NET_ADMIN", "SYS_ADMIN"} and sysctls == CONTAINER_SYSCTLS, argv
