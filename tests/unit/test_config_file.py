"""Options from NSWRAP_* environment variables and from a --config TOML file. No root, no host change.

What the command line turned into is checked in-process: nswrap.run.run (and nswrap.doctor.doctor)
are replaced by a stub that records the Config it was given. Errors are checked black-box, in a
subprocess, like tests/unit/test_cli.py: exit 2 and one line on stderr naming the culprit.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import click
import pytest

from nswrap import cli
from nswrap.config import parse_ports, parse_uplink

EVERY_OPTION_TOML = """\
ports = ["53,69", "53/tcp"]
uplink = ["eth0", "eth1=198.51.100.1"]
subnet = "198.18.4.0/30"
mark-mask = "0x0f000000"
address = ["192.0.2.10", "198.51.100.10"]
firewall = "off"
no-outbound = true
helper = ["tftp"]
user = "nobody"
stop-timeout = 2.5
ready-fd = 3
dry-run = true
verbose = 2
command = ["unbound", "-d", "-c", "/etc/unbound/unbound.conf"]
"""

EVERY_OPTION_ENV = {
    "NSWRAP_PORTS": "53,69 53/tcp",
    "NSWRAP_UPLINK": "eth0 eth1=198.51.100.1",
    "NSWRAP_SUBNET": "198.18.4.0/30",
    "NSWRAP_MARK_MASK": "0x0f000000",
    "NSWRAP_ADDRESS": "192.0.2.10  198.51.100.10",
    "NSWRAP_FIREWALL": "off",
    "NSWRAP_NO_OUTBOUND": "1",
    "NSWRAP_HELPER": "tftp",
    "NSWRAP_USER": "nobody",
    "NSWRAP_STOP_TIMEOUT": "2.5",
    "NSWRAP_READY_FD": "3",
    "NSWRAP_DRY_RUN": "true",
    "NSWRAP_VERBOSE": "2",
}


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NSWRAP_")}


@pytest.fixture(autouse=True)
def no_ambient_nswrap_variables(monkeypatch):
    for name in list(os.environ):
        if name.startswith("NSWRAP_"):
            monkeypatch.delenv(name)


@pytest.fixture
def parsed(monkeypatch):
    """parsed(*args, env={...}) -> the Config `nswrap *args` would run (or doctor, for `doctor`)."""
    import nswrap.doctor
    import nswrap.run

    def parse(*args, env=None):
        seen = []
        monkeypatch.setattr(nswrap.run, "run", lambda config: seen.append(config) or 0)
        monkeypatch.setattr(nswrap.doctor, "doctor", lambda config: seen.append(config) or 0)
        with monkeypatch.context() as m:
            for name, value in (env or {}).items():
                m.setenv(name, value)
            with pytest.raises(SystemExit) as exited:
                cli.main(list(args))
        assert exited.value.code == 0
        [config] = seen
        return config

    return parse


def nswrap(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nswrap", *args], capture_output=True, text=True, timeout=30,
                          env={**clean_env(), **(env or {})})


def write(tmp_path, text, name="nswrap.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def assert_every_option(config):
    assert config.ports == parse_ports(["53,69", "53/tcp"])
    assert config.uplinks == (parse_uplink("eth0"), parse_uplink("eth1=198.51.100.1"))
    assert config.subnet == ipaddress.IPv4Network("198.18.4.0/30")
    assert config.mark_mask == 0x0F000000
    assert config.addresses == (ipaddress.IPv4Address("192.0.2.10"), ipaddress.IPv4Address("198.51.100.10"))
    assert config.firewall == "off" and config.outbound is False and config.helpers == ("tftp",)
    assert config.user == "nobody" and config.stop_timeout == 2.5 and config.ready_fd == 3
    assert config.dry_run is True and config.verbosity == 2


def test_every_run_option_from_the_environment(parsed):
    config = parsed("--", "true", env=EVERY_OPTION_ENV)
    assert_every_option(config)
    assert config.command == ("true",)


def test_every_run_option_from_a_config_file(parsed, tmp_path):
    config = parsed("--config", write(tmp_path, EVERY_OPTION_TOML))
    assert_every_option(config)
    assert config.command == ("unbound", "-d", "-c", "/etc/unbound/unbound.conf")


def test_a_unit_file_needs_only_the_config_file(parsed, tmp_path):
    """`nswrap --config FILE` (the default run command) and NSWRAP_CONFIG alone both work."""
    path = write(tmp_path, 'ports = "53,53/tcp"\ncommand = ["unbound", "-d"]\n')
    for config in (parsed("--config", path), parsed(f"--config={path}"), parsed("run", "--config", path),
                   parsed(env={"NSWRAP_CONFIG": path})):
        assert config.ports == parse_ports(["53,53/tcp"]) and config.command == ("unbound", "-d")


def test_toml_numbers_for_ports_and_mark_mask(parsed, tmp_path):
    config = parsed("--config", write(tmp_path, 'ports = [53, "53/tcp"]\nmark-mask = 0xf0000000\nstop-timeout = 5\n'
                                                'command = ["true"]\n'))
    assert config.ports == parse_ports(["53", "53/tcp"]) and config.mark_mask == 0xF0000000
    assert config.stop_timeout == 5.0


def test_command_line_wins_over_environment_wins_over_file(parsed, tmp_path):
    path = write(tmp_path, 'ports = ["1"]\nstop-timeout = 1\nno-outbound = true\nuplink = ["eth1"]\n'
                           'command = ["from-file"]\n')
    env = {"NSWRAP_CONFIG": path, "NSWRAP_PORTS": "2", "NSWRAP_STOP_TIMEOUT": "2", "NSWRAP_NO_OUTBOUND": "0"}

    file = parsed(env={"NSWRAP_CONFIG": path})
    assert (file.ports, file.stop_timeout, file.outbound, file.command) == (parse_ports(["1"]), 1.0, False, ("from-file",))

    environment = parsed(env=env)
    assert (environment.ports, environment.stop_timeout, environment.outbound) == (parse_ports(["2"]), 2.0, True)
    assert environment.uplinks == (parse_uplink("eth1"),), "what the environment does not set still comes from the file"

    flags = parsed("--ports", "3", "--stop-timeout", "3", "--uplink", "eth2", "--", "from-flags", env=env)
    assert (flags.ports, flags.stop_timeout, flags.uplinks) == (parse_ports(["3"]), 3.0, (parse_uplink("eth2"),))
    assert flags.command == ("from-flags",)
    # --config on the command line wins over NSWRAP_CONFIG as well
    other = write(tmp_path, 'ports = ["4"]\n', name="other.toml")
    assert parsed("--config", other, "--", "true", env={"NSWRAP_CONFIG": path}).ports == parse_ports(["4"])


def test_doctor_reads_the_same_file_and_variables(parsed, tmp_path):
    path = write(tmp_path, EVERY_OPTION_TOML)  # keys doctor has no use for (command, user...) are ignored
    config = parsed("doctor", "--config", path)
    assert config.ports == parse_ports(["53,69", "53/tcp"]) and config.firewall == "off"
    assert config.uplinks == (parse_uplink("eth0"), parse_uplink("eth1=198.51.100.1"))
    config = parsed("doctor", env={"NSWRAP_PORTS": "123", "NSWRAP_MARK_MASK": "0xff"})
    assert config.ports == parse_ports(["123"]) and config.mark_mask == 0xFF
    assert parsed("doctor").ports == parse_ports(["53,53/tcp"])  # its own default stays


def test_every_option_has_a_variable_and_a_key():
    """A new option of `run` cannot be forgotten: NSWRAP_<LONG_NAME> and the TOML key <long-name>."""
    keys = cli.config_keys()
    for command in (cli.run, cli.doctor, cli.cleanup):
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                long_name = next(o for o in param.opts if o.startswith("--"))[2:]
                assert param.envvar == "NSWRAP_" + long_name.upper().replace("-", "_"), param.name
                assert param.show_envvar, param.name
                if command is cli.run and long_name != "config":
                    assert keys[long_name][0] == param.name
    assert set(keys) == {"command", "ports", "uplink", "subnet", "mark-mask", "address", "firewall", "no-outbound",
                         "helper", "user", "stop-timeout", "ready-fd", "dry-run", "verbose"}


def one_line_usage_error(done, *culprits):
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("nswrap: "), done.stderr
    assert done.stdout == ""
    for culprit in culprits:
        assert culprit in done.stderr, (culprit, done.stderr)


@pytest.mark.parametrize(
    "text, culprits",
    [
        ('prots = ["53"]\n', ["unknown key 'prots'"]),
        ('[run]\nports = ["53"]\n', ["unknown key 'run'"]),
        ('stop_timeout = 5\n', ["unknown key 'stop_timeout'"]),  # keys are the long options: stop-timeout
        ('stop-timeout = "5s"\n', ["'stop-timeout'", "number"]),
        ('ports = [true]\n', ["'ports'", "list of strings"]),
        ('uplink = [["eth0"]]\n', ["'uplink'", "list of strings"]),
        ('no-outbound = "yes"\n', ["'no-outbound'", "true or false"]),
        ('ready-fd = 3.5\n', ["'ready-fd'", "integer"]),
        ('verbose = true\n', ["'verbose'", "integer"]),
        ('command = "unbound -d"\nports = ["53"]\ncommand = ["x"]\n', ["not valid TOML"]),  # a key given twice
        ('ports = [\n', ["not valid TOML"]),
        ('firewall = "bogus"\n', ["'firewall'", "bogus"]),
        ('ports = ["70000"]\ncommand = ["true"]\n', ["'ports'", "70000"]),
        ('mark-mask = "0x5"\nports = ["53"]\ncommand = ["true"]\n', ["'mark-mask'", "0x5"]),
    ],
)
def test_bad_config_files_exit_2_naming_the_key_and_the_file(tmp_path, text, culprits):
    path = write(tmp_path, text)
    one_line_usage_error(nswrap("--config", path), path, *culprits)


def test_a_missing_or_unreadable_config_file_exits_2_naming_it(tmp_path):
    missing = str(tmp_path / "missing.toml")
    one_line_usage_error(nswrap("--config", missing), missing, "No such file")
    one_line_usage_error(nswrap("-p", "53", "--", "true", env={"NSWRAP_CONFIG": missing}), missing)
    one_line_usage_error(nswrap("doctor", "--config", str(tmp_path)), str(tmp_path), "directory")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"ports = ['\xff']\n")
    one_line_usage_error(nswrap("--config", str(binary)), str(binary))


@pytest.mark.parametrize(
    "env, culprits",
    [
        ({"NSWRAP_PORTS": "53 70000"}, ["NSWRAP_PORTS", "70000"]),
        ({"NSWRAP_STOP_TIMEOUT": "soon"}, ["NSWRAP_STOP_TIMEOUT", "soon"]),
        ({"NSWRAP_NO_OUTBOUND": "maybe"}, ["NSWRAP_NO_OUTBOUND", "maybe"]),
        ({"NSWRAP_FIREWALL": "bogus"}, ["NSWRAP_FIREWALL", "bogus"]),
        ({"NSWRAP_UPLINK": "eth0=not-an-address"}, ["NSWRAP_UPLINK", "not-an-address"]),
        ({"NSWRAP_VERBOSE": "vv"}, ["NSWRAP_VERBOSE", "vv"]),
    ],
)
def test_bad_values_from_the_environment_exit_2_naming_the_variable(env, culprits):
    one_line_usage_error(nswrap("--", "true", env={"NSWRAP_PORTS": "53", **env}), *culprits)


def test_a_bad_value_on_the_command_line_still_names_the_option():
    one_line_usage_error(nswrap("-p", "53", "--stop-timeout", "soon", "--", "true"), "'--stop-timeout'", "soon")
    one_line_usage_error(nswrap("-p", "53", "--stop-timeout", "-1", "--", "true"), "-1")


def test_the_example_config_file(parsed):
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "dns.toml")
    config = parsed("--config", example)
    assert config.ports == parse_ports(["53", "53/tcp"]) and config.stop_timeout == 5.0
    assert config.command == ("unbound", "-d", "-c", "/etc/unbound/unbound.conf")
