"""The deployment examples under examples/ are well-formed (no root, no network, no Docker).

- ``Dockerfile``: instruction structure, FROM the documented base, exec-form (JSON) ENTRYPOINT
  and CMD, nswrap as the entrypoint, every COPY source present in the build context (the
  repository root; ``dist/nswrap_*_all.deb`` is what scripts/build-deb writes there first).
- ``compose.yaml`` and ``kubernetes/pod.yaml``: YAML parses (PyYAML, from the ``test`` extra);
  the server gets NET_ADMIN and SYS_ADMIN, sits on two networks (compose: two networks with
  documentation subnets; Kubernetes: the default one plus a Multus attachment defined in the
  same file) and is started with nswrap's arguments.
- ``nswrap@.service``: ``systemd-analyze verify`` accepts it without a single warning (it does
  not need systemd as PID 1; the ExecStart/ExecStopPost binary is pointed at a stub, as verify
  insists that it exists), and a structural check in Python pins what the unit is about:
  Type=notify, KillMode=mixed, ExecStopPost=nswrap cleanup.
"""

from __future__ import annotations

import ipaddress
import json
import pathlib
import shlex
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
DOCUMENTATION_NETS = [ipaddress.ip_network(n)
                      for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]
CAPABILITIES = {"NET_ADMIN", "SYS_ADMIN"}
BUILT_DEB = "dist/nswrap_*_all.deb"  # scripts/build-deb's result, in the build context


def load_yaml(name: str) -> list:
    """All documents of examples/<name>."""
    yaml = pytest.importorskip("yaml", reason="PyYAML (the test extra) parses the examples")
    return list(yaml.safe_load_all((EXAMPLES / name).read_text()))


def assert_nswrap_arguments(args: list[str]) -> None:
    """*args* follow ``ENTRYPOINT ["nswrap"]``: options with --ports, then ``--`` and a server."""
    assert all(isinstance(a, str) for a in args), args
    assert "--ports" in args[: args.index("--")] and args[args.index("--") + 1 :], args


# -- Dockerfile -----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped, continuation lines joined."""
    instructions, pending = [], ""
    for line in (EXAMPLES / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not pending):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def exec_form(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    """The JSON array of the last *keyword* instruction (Docker only honours the last one)."""
    values = [rest for kw, rest in instructions if kw == keyword]
    assert values, f"no {keyword}"
    parsed = json.loads(values[-1])
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), parsed
    return parsed


def test_dockerfile_structure():
    instructions = dockerfile_instructions()
    known = {"FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "ENTRYPOINT", "CMD", "LABEL",
             "STOPSIGNAL", "USER", "EXPOSE", "HEALTHCHECK", "SHELL", "VOLUME", "ONBUILD"}
    assert {kw for kw, _ in instructions} <= known, instructions
    first = next(rest for kw, rest in instructions if kw != "ARG")
    assert [kw for kw, _ in instructions if kw != "ARG"][0] == "FROM"
    assert first.split()[0] == "debian:bookworm-slim"

    entrypoint = exec_form(instructions, "ENTRYPOINT")
    assert entrypoint[0] == "nswrap", entrypoint
    assert_nswrap_arguments(entrypoint[1:] + exec_form(instructions, "CMD"))

    for kw, rest in instructions:
        if kw == "COPY":  # the build context is the repository root
            *sources, _dest = shlex.split(rest)
            for source in sources:
                if source == BUILT_DEB:  # made by scripts/build-deb before `docker build`
                    assert "./scripts/build-deb" in (EXAMPLES / "Dockerfile").read_text(), "say how to make it"
                    continue
                assert (REPO / source).exists(), f"COPY {source}: not in the build context"


# -- compose.yaml ---------------------------------------------------------------------------------


def test_compose_two_networks():
    [compose] = load_yaml("compose.yaml")
    networks = compose["networks"]
    assert len(networks) == 2, networks
    subnets = {}
    for name, network in networks.items():
        [config] = network["ipam"]["config"]
        subnet = ipaddress.ip_network(config["subnet"])
        assert any(subnet.subnet_of(doc) for doc in DOCUMENTATION_NETS), subnet
        assert ipaddress.ip_address(config["gateway"]) in subnet
        subnets[name] = subnet

    [server] = [s for s in compose["services"].values() if "build" in s]
    assert (REPO / "examples" / server["build"]["context"] / server["build"]["dockerfile"]
            ).resolve() == EXAMPLES / "Dockerfile"
    assert CAPABILITIES <= set(server["cap_add"])
    assert set(server["networks"]) == set(networks)
    for name, attachment in server["networks"].items():
        assert ipaddress.ip_address(attachment["ipv4_address"]) in subnets[name]
    assert_nswrap_arguments(server["command"])


# -- kubernetes/pod.yaml --------------------------------------------------------------------------


def test_kubernetes_pod_with_a_multus_network():
    documents = load_yaml("kubernetes/pod.yaml")
    by_kind = {d["kind"]: d for d in documents}
    assert set(by_kind) == {"NetworkAttachmentDefinition", "Pod"}, documents
    attachment, pod = by_kind["NetworkAttachmentDefinition"], by_kind["Pod"]

    cni = json.loads(attachment["spec"]["config"])
    for address in cni["ipam"]["addresses"]:
        interface = ipaddress.ip_interface(address["address"])
        assert any(interface.network.subnet_of(doc) for doc in DOCUMENTATION_NETS), address
        assert ipaddress.ip_address(address["gateway"]) in interface.network
    networks = pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"]
    assert attachment["metadata"]["name"] in [n.strip() for n in networks.split(",")]

    [container] = pod["spec"]["containers"]
    assert CAPABILITIES <= set(container["securityContext"]["capabilities"]["add"])
    assert not container["securityContext"].get("privileged")
    assert_nswrap_arguments(container["args"])


# -- nswrap@.service ------------------------------------------------------------------------------

UNIT = EXAMPLES / "nswrap@.service"
# Keys the template may use, per section (a typo is a key systemd would ignore with a warning).
UNIT_KEYS = {
    "Unit": {"Description", "Documentation", "Wants", "Requires", "After", "Before",
             "ConditionPathExists", "PartOf", "BindsTo"},
    "Service": {"Type", "NotifyAccess", "EnvironmentFile", "Environment", "ExecStartPre",
                "ExecStart", "ExecStopPost", "KillMode", "TimeoutStartSec", "TimeoutStopSec",
                "Restart", "RestartSec", "RestartPreventExitStatus", "SuccessExitStatus"},
    "Install": {"WantedBy", "RequiredBy", "Alias"},
}


def unit_entries() -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values]}} of the template (keys may repeat in systemd units)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, line in enumerate(UNIT.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert current is not None and sep, f"{UNIT.name}:{number}: not a key=value in a section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_structure():
    entries = unit_entries()
    assert set(entries) == set(UNIT_KEYS)
    for section, keys in entries.items():
        unknown = set(keys) - UNIT_KEYS[section]
        assert not unknown, f"[{section}]: unknown keys {unknown}"
    service = entries["Service"]
    assert service["Type"] == ["notify"]
    assert service["KillMode"] == ["mixed"], "SIGTERM to nswrap only: it forwards it to the server"
    [start] = service["ExecStart"]
    assert start.split()[0].endswith("/nswrap") and "%i" in service["EnvironmentFile"][0]
    assert [shlex.split(v)[1:] for v in service["ExecStopPost"]] == [["cleanup"]]
    assert entries["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze not installed (Debian package systemd; run scripts/setup)")
    stub = tmp_path / "nswrap"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    # verify insists that ExecStart's binary exists: point it at a stub, change nothing else.
    (tmp_path / UNIT.name).write_text(UNIT.read_text().replace("/usr/local/bin/nswrap", str(stub)))
    done = subprocess.run([analyze, "verify", str(tmp_path / "nswrap@example.service")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done
