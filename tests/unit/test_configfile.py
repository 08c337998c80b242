"""The TOML config file (configfile.py) and option precedence: command line > NSWRAP_* > file.

What a command line turns into is checked in-process: the actions behind `run`, `--dry-run` and
`doctor` are replaced by a stub that records the Config they were given. No root, no host change.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pathlib
import re
import threading
import time

import click
import pytest

import nswrap.commands
import nswrap.doctor
import nswrap.instance
from nswrap import cli, configfile
from nswrap.config import parse_ports, parse_uplink
from nswrap.errors import UsageError
from tests.unit.clirun import invoke, one_line_usage_error

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

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
udp-timeout = 300
ready-fd = 3
take-over = true
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
    "NSWRAP_UDP_TIMEOUT": "300",
    "NSWRAP_READY_FD": "3",
    "NSWRAP_TAKE_OVER": "1",
    "NSWRAP_DRY_RUN": "true",
    "NSWRAP_VERBOSE": "2",
}


def write(tmp_path: pathlib.Path, text: str | bytes, name: str = "nswrap.toml") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


# --- configfile.read -----------------------------------------------------------------------------


def read(path: str) -> dict:
    return configfile.read(path, cli.config_keys())


def test_every_key_is_read_with_its_kind(tmp_path):
    values = read(write(tmp_path, EVERY_OPTION_TOML))
    assert values == {
        "ports": ["53,69", "53/tcp"], "uplinks": ["eth0", "eth1=198.51.100.1"], "subnet": "198.18.4.0/30",
        "mark_mask": "0x0f000000", "addresses": ["192.0.2.10", "198.51.100.10"], "firewall": "off",
        "no_outbound": True, "helpers": ["tftp"], "user": "nobody", "stop_timeout": 2.5, "ready_fd": 3,
        "take_over": True, "udp_timeout": 300, "dry_run": True, "verbose": 2,
        "command": ["unbound", "-d", "-c", "/etc/unbound/unbound.conf"],
    }


def test_toml_numbers_and_single_strings(tmp_path):
    """As README says: a repeatable option takes one string too, ports and mark-mask TOML integers."""
    values = read(write(tmp_path, 'ports = [53, "53/tcp"]\nmark-mask = 0xf0000000\nstop-timeout = 5\nuplink = "eth0"\n'))
    assert values == {"ports": ["53", "53/tcp"], "mark_mask": "4026531840", "stop_timeout": 5, "uplinks": ["eth0"]}
    assert read(write(tmp_path, "ports = 53\n")) == {"ports": ["53"]}
    assert read(write(tmp_path, f"mark-mask = {(1 << 64) - 1}\n")) == {"mark_mask": str((1 << 64) - 1)}  # config.py refuses it
    assert read(write(tmp_path, "")) == {}


@pytest.mark.parametrize(
    "text, culprits",
    [
        ('prots = ["53"]\n', ["unknown key 'prots'", "known: address, command,"]),
        ('[run]\nports = ["53"]\n', ["unknown key 'run'"]),
        ("stop_timeout = 5\n", ["unknown key 'stop_timeout'"]),  # keys are the long options: stop-timeout
        ("config = 'other.toml'\n", ["unknown key 'config'"]),
        ('stop-timeout = "5s"\n', ["'stop-timeout' must be a number, not string '5s'"]),
        ("stop-timeout = true\n", ["'stop-timeout' must be a number, not boolean True"]),
        ("ports = [true]\n", ["'ports' must be a list of strings, not array [True]"]),
        ("ports = true\n", ["'ports'", "list of strings"]),
        ("ports = 5.3\n", ["'ports'", "float"]),
        ('uplink = [["eth0"]]\n', ["'uplink' must be a list of strings"]),
        ("uplink = {name = 'eth0'}\n", ["'uplink'", "table"]),
        ('no-outbound = "yes"\n', ["'no-outbound' must be true or false"]),
        ("no-outbound = 1\n", ["'no-outbound' must be true or false, not integer 1"]),
        ("ready-fd = 3.5\n", ["'ready-fd' must be an integer, not float 3.5"]),
        ("verbose = true\n", ["'verbose' must be an integer, not boolean"]),
        ("firewall = 1979-05-27\n", ["'firewall' must be a string, not date/time"]),
        ("mark-mask = true\n", ["'mark-mask' must be a string, not boolean"]),
        ('command = "unbound -d"\n', ["'command' must be a list of strings", "not string 'unbound -d'"]),
        ("command = [53]\n", ["'command' must be a list of strings", "not array [53]"]),
        ("ready-fd = 0x" + "f" * 5000 + "\n", ["'ready-fd': an integer out of range"]),  # str() or float() of it would raise
        ("mark-mask = 0x" + "f" * 5000 + "\n", ["'mark-mask': an integer out of range"]),
        ("stop-timeout = -1" + "0" * 20 + "\n", ["'stop-timeout': an integer out of range"]),
        ("ports = [53, 0o" + "7" * 30 + "]\n", ["'ports': an integer out of range"]),
        ('command = "unbound -d"\nports = ["53"]\ncommand = ["x"]\n', ["not valid TOML"]),  # a key given twice
        ("ports = [\n", ["not valid TOML"]),
    ],
)
def test_bad_files_are_one_usage_error_naming_the_file_and_the_key(tmp_path, text, culprits):
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as raised:
        read(path)
    assert raised.value.code == 2 and path in str(raised.value)
    for culprit in culprits:
        assert culprit in str(raised.value)


def test_a_byte_order_mark_is_fine(tmp_path):
    """Windows editors start UTF-8 files with one."""
    assert read(write(tmp_path, b'\xef\xbb\xbfports = ["53"]\n')) == {"ports": ["53"]}


def test_not_utf8_is_refused(tmp_path):
    path = write(tmp_path, b"ports = ['\xff']\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        read(path)


def test_missing_file_and_directory_are_refused(tmp_path):
    with pytest.raises(UsageError, match="cannot read config file .*missing.toml: No such file or directory"):
        read(str(tmp_path / "missing.toml"))
    with pytest.raises(UsageError, match="not a regular file"):
        read(str(tmp_path))


def test_dev_zero_is_not_a_regular_file():
    """An endless file: refused before a single byte is read."""
    with pytest.raises(UsageError, match="config file /dev/zero: not a regular file"):
        read("/dev/zero")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: outcome.append(pytest.raises(UsageError, read, str(fifo)).value), daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "reading a FIFO blocked"
    assert "not a regular file" in str(outcome[0])


def test_files_larger_than_1_mib_are_refused(tmp_path):
    line = "# " + "x" * 1021 + "\n"  # 1 KiB
    exactly = write(tmp_path, line * 1024, "exactly.toml")
    assert os.path.getsize(exactly) == configfile.MAX_SIZE and read(exactly) == {}
    larger = write(tmp_path, line * 1024 + "\n", "larger.toml")
    with pytest.raises(UsageError, match="larger than 1024 KiB"):
        read(larger)
    huge = tmp_path / "sparse.toml"
    with open(huge, "wb") as f:
        f.truncate(1 << 40)  # a sparse terabyte: read only up to the limit
    with pytest.raises(UsageError, match="larger than"):
        read(str(huge))


HOSTILE_NESTING = {
    "array": "ports = " + "[" * 100_000 + "]" * 100_000 + "\n",
    "inline table": "ports = " + "{a = " * 50_000 + "1" + "}" * 50_000 + "\n",
    "unclosed": "ports = " + "[" * 200_000 + "\n",
    "dotted key": "a" + ".a" * 200_000 + " = 1\n",  # n parts cost tomllib n² time and memory
    "quoted dotted key": ".".join(['"a"'] * 100_000) + " = 1\n",
    "table header": "[" + ".".join(["a"] * 100_000) + "]\n",
}


@pytest.mark.parametrize("shape", HOSTILE_NESTING)
def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path, shape):
    """Under the size cap, and refused before tomllib recurses (or spends gigabytes) on it."""
    path = write(tmp_path, HOSTILE_NESTING[shape])
    assert os.path.getsize(path) < configfile.MAX_SIZE
    with pytest.raises(UsageError, match=f"^config file {path}: nested too deeply") as raised:
        read(path)
    assert raised.value.code == 2


def test_deep_nesting_exits_2_with_one_line(capsys, tmp_path):
    path = write(tmp_path, HOSTILE_NESTING["array"])
    one_line_usage_error(invoke(capsys, "--config", path), path, "nested too deeply")


@pytest.mark.parametrize(
    "text",
    [
        "x = " + "[" * configfile.MAX_DEPTH + "]" * configfile.MAX_DEPTH,
        ".".join(["a"] * configfile.MAX_DEPTH) + " = 1",
        'x = "' + "[" * 100 + '"',  # brackets and dots in strings and comments are text
        "x = '" + "{" * 100 + "'",
        'x = """\n' + "[" * 100 + '\n"""',
        "x = '''\n" + "[" * 100 + "\n'''",
        'x = "\\"' + "[" * 100 + '"',  # an escaped quote does not end the string
        "# " + "[" * 100,
        'x = "' + "a." * 100 + '"',
        'ports = ["53"]  # ' + "a." * 100,
    ],
)
def test_what_is_not_nesting_is_not_counted(text):
    assert not configfile.too_deep(text)


@pytest.mark.parametrize(
    "text",
    [
        "x = " + "[" * (configfile.MAX_DEPTH + 1) + "]" * (configfile.MAX_DEPTH + 1),
        ".".join(["a"] * (configfile.MAX_DEPTH + 1)) + " = 1",
        " . ".join(['"a"'] * (configfile.MAX_DEPTH + 1)) + " = 1",
        'x = "a" # "\ny = ' + "[" * 100,  # after a string and a comment, counting goes on
        'x = "unclosed\ny = ' + "[" * 100,  # a string left open ends with its line
    ],
)
def test_nesting_past_the_limit_is_too_deep(text):
    assert configfile.too_deep(text)


@pytest.mark.parametrize(
    "text",
    ["a" * configfile.MAX_SIZE, "[]" * (configfile.MAX_SIZE // 2), '"' + '\\"' * (configfile.MAX_SIZE // 2),
     '"""' + '\\"""' * (configfile.MAX_SIZE // 4), "a " * (configfile.MAX_SIZE // 2), "a." * (configfile.MAX_SIZE // 2)],
)
def test_the_nesting_check_takes_linear_time(text):
    """1 MiB of the text most likely to make a regular expression backtrack: well under a second."""
    began = time.process_time()
    configfile.too_deep(text)
    assert time.process_time() - began < 2


def test_numbers_tomllib_cannot_read_are_one_line(tmp_path):
    """Python refuses int() of more than 4300 digits; tomllib lets that ValueError through."""
    path = write(tmp_path, "ports = " + "9" * 5000 + "\n")
    with pytest.raises(UsageError, match=f"^config file {path}: not valid TOML: a number too long"):
        read(path)


# --- the command line, environment and file together (in-process) --------------------------------


@pytest.fixture
def parsed(monkeypatch, capsys):
    """parsed(*args, env={...}) -> the Config `nswrap *args` would act on."""

    def parse(*args: str, env: dict[str, str] | None = None):
        seen = []

        def record(config):
            seen.append(config)
            return 0

        monkeypatch.setattr(nswrap.instance, "run", record)
        monkeypatch.setattr(nswrap.commands, "dry_run", record)
        monkeypatch.setattr(nswrap.doctor, "doctor", record)
        with monkeypatch.context() as m:
            for name, value in (env or {}).items():
                m.setenv(name, value)
            done = invoke(capsys, *args)
        assert done.returncode == 0, done
        [config] = seen
        return config

    return parse


def assert_every_option(config):
    assert config.ports == parse_ports(["53,69", "53/tcp"])
    assert config.uplinks == (parse_uplink("eth0"), parse_uplink("eth1=198.51.100.1"))
    assert config.subnet == ipaddress.IPv4Network("198.18.4.0/30")
    assert config.mark_mask == 0x0F000000
    assert config.addresses == (ipaddress.IPv4Address("192.0.2.10"), ipaddress.IPv4Address("198.51.100.10"))
    assert config.firewall == "off" and config.outbound is False and config.helpers == ("tftp",)
    assert config.user == "nobody" and config.stop_timeout == 2.5 and config.ready_fd == 3
    assert config.udp_timeout == 300
    assert config.dry_run is True and config.take_over is True
    assert logging.getLogger("nswrap").level == logging.DEBUG  # verbose = 2


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


def test_toml_numbers_reach_the_config(parsed, tmp_path):
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


def test_the_example_config_file(parsed):
    config = parsed("--config", str(EXAMPLES / "dns.toml"))
    assert config.ports == parse_ports(["53", "53/tcp"]) and config.stop_timeout == 5.0
    assert config.command[:2] == ("unbound", "-d")


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
                         "helper", "user", "stop-timeout", "udp-timeout", "ready-fd", "take-over", "dry-run", "verbose",
                         "ipv6-forwarding", "datapath"}



def test_the_reference_names_each_keys_type():
    """docs/reference.md's sentence on TOML types names every number, integer and boolean key."""
    text = " ".join((ROOT / "docs" / "reference.md").read_text().split())
    sentence = text[text.index("Each key takes one TOML type"):].split("the others a string")[0]
    said = {kind: set(re.findall(r"`([a-z-]+)`", keys)) for keys, kind in
            re.findall(r"((?:`[a-z-]+`(?:, | and )?)+) (a number|an integer|true or false)", sentence)}
    kinds = {"number": "a number", "int": "an integer", "bool": "true or false"}
    wanted: dict[str, set[str]] = {word: set() for word in kinds.values()}
    for key, (_, kind) in cli.config_keys().items():
        if kind in kinds:
            wanted[kinds[kind]].add(key)
    assert said == wanted

# --- errors through the command line (in-process: exit 2, one line) -------------------------------


@pytest.mark.parametrize(
    "text, culprits",
    [
        ('prots = ["53"]\n', ["unknown key 'prots'"]),
        ('stop-timeout = "5s"\n', ["'stop-timeout'", "number"]),
        ('firewall = "bogus"\n', ["firewall", "bogus"]),
        ('ports = ["70000"]\ncommand = ["true"]\n', ["'ports'", "70000"]),
        ('mark-mask = "0x5"\nports = ["53"]\ncommand = ["true"]\n', ["'mark-mask'", "0x5"]),
        ('stop-timeout = -1\nports = ["53"]\ncommand = ["true"]\n', ["'stop-timeout'", "-1"]),
        ('stop-timeout = inf\nports = ["53"]\ncommand = ["true"]\n', ["'stop-timeout'", "inf"]),
        ('stop-timeout = nan\nports = ["53"]\ncommand = ["true"]\n', ["'stop-timeout'", "nan"]),
        ('ports = []\ncommand = ["true"]\n', ["'ports'", "no ports"]),
        ('user = ""\nports = ["53"]\ncommand = ["true"]\n', ["'user'", "--user ''", "empty user"]),
        ('ready-fd = -1\nports = ["53"]\ncommand = ["true"]\n', ["'ready-fd'", "--ready-fd -1"]),
        ('udp-timeout = 5\nports = ["53"]\ncommand = ["true"]\n', ["'udp-timeout'", "--udp-timeout 5: 10 to 86400"]),
        ('udp-timeout = "20"\nports = ["53"]\ncommand = ["true"]\n', ["'udp-timeout'", "integer"]),
        ('udp-timeout = 20.5\nports = ["53"]\ncommand = ["true"]\n', ["'udp-timeout'", "integer"]),
        ('ports = ["53"]\ncommand = [""]\n', ["'command'", "empty command name"]),
        ('ports = ["53"]\ncommand = []\n', ["'command'", "empty command"]),
        ('ports = ["53"]\ncommand = ["true", "-x\\u0000y"]\n', ["'command'", "a NUL byte in argument 1 of the command"]),
        ('ports = ["53"]\ncommand = ["tr\\u0000ue"]\n', ["'command'", "a NUL byte in the command name"]),
        ('ports = ["53"]\ncommand = "true"\n', ["'command'", "list of strings"]),
    ],
)
def test_bad_config_files_exit_2_naming_the_key_and_the_file(capsys, tmp_path, text, culprits):
    path = write(tmp_path, text)
    one_line_usage_error(invoke(capsys, "--config", path), path, *culprits)


@pytest.mark.parametrize(
    "text, culprits",
    [
        ('helper = ["tftp"]\n', ["--helper tftp", "udp port 69"]),
    ],
)
def test_values_config_checks_as_a_whole_exit_2(capsys, tmp_path, text, culprits):
    """Checked by Config itself: the option is named (the file is not, unlike the keys above)."""
    path = write(tmp_path, text + 'ports = ["53"]\ncommand = ["true"]\n')
    one_line_usage_error(invoke(capsys, "--config", path), *culprits)


def test_unreadable_config_files_exit_2_naming_them(capsys, tmp_path, monkeypatch):
    missing = str(tmp_path / "missing.toml")
    one_line_usage_error(invoke(capsys, "--config", missing), missing, "No such file")
    one_line_usage_error(invoke(capsys, "doctor", "--config", str(tmp_path)), str(tmp_path), "regular file")
    one_line_usage_error(invoke(capsys, "--config", "/dev/zero"), "/dev/zero", "not a regular file")
    monkeypatch.setenv("NSWRAP_CONFIG", missing)
    one_line_usage_error(invoke(capsys, "-p", "53", "--", "true"), missing)
