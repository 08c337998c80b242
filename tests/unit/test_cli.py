"""The command line: exit codes, one-line errors, the fast paths. Nothing here changes the host.

Most cases run in-process (cli.main); a few run `python -m nswrap` as a real process, to see what
a user sees: the exit status, stderr, and no traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from nswrap import cli
from nswrap.errors import EXIT_USAGE, QUOTED, UsageError, cut, listed, quoted
from nswrap.precheck import check_ready_fd
from tests.unit.clirun import clean_env, invoke, nswrap, one_line_usage_error, python

BAD_INPUT = [
    (["--ports", "53,70000", "--", "true"], "70000"),
    (["--ports", "5-3", "--", "true"], "5-3"),
    (["--ports", "53/sctp", "--", "true"], "53/sctp"),
    (["--ports", "\u0665\u0663", "--", "true"], "invalid port spec"),
    (["--ports", "9" * 5000, "--", "true"], "invalid port spec"),
    (["--ports", "53"], "no command"),
    (["--ports", "53", "--", ""], "empty command name"),
    (["exec", "abc", "--", ""], "empty command name"),
    (["-p", "53", "--address", "::1", "--", "true"], "::1"),
    (["-p", "53", "--address", "0.0.0.0", "--", "true"], "leave --address out"),
    (["-p", "53", "--subnet", "224.0.0.0/30", "--", "true"], "multicast"),
    (["--", "true"], "no ports"),
    (["--bogus", "--", "true"], "--bogus"),
    (["status"], "no such command 'status'"),
    (["-p", "53", "--uplink", "this-name-is-too-long", "--", "true"], "this-name-is-too-long"),
    (["-p", "53", "--uplink", 'eth0"', "--", "true"], "eth0\""),
    (["-p", "53", "--uplink", "eth0=nope", "--", "true"], "nope"),
    (["-p", "53", "--uplink", "eth0=255.255.255.255", "--", "true"], "255.255.255.255 is the broadcast address"),
    (["-p", "53", "--uplink", "eth0=ff02::1", "--", "true"], "ff02::1 is a multicast address"),
    (["-p", "53", "--subnet", "198.18.0.1/30", "--", "true"], "198.18.0.1/30"),
    (["-p", "53", "--mark-mask", "0x5", "--", "true"], "0x5"),
    (["-p", "53", "--mark-mask", "0", "--", "true"], "mark mask"),
    (["-p", "53", "--address", "example.org", "--", "true"], "example.org"),
    (["-p", "53", "--user", "", "--", "true"], "empty user"),
    (["-p", "53", "--user", "0:4294967296", "--", "true"], "4294967296"),
    (["-p", "53", "--stop-timeout", "inf", "--", "true"], "--stop-timeout inf"),
    (["-p", "53", "--stop-timeout", "nan", "--", "true"], "--stop-timeout nan"),
    (["-p", "53", "--stop-timeout", "-1", "--", "true"], "-1"),
    (["-p", "53", "--stop-timeout", "soon", "--", "true"], "'--stop-timeout'"),
    (["-p", "53", "--udp-timeout", "9", "--", "true"], "--udp-timeout 9: 10 to 86400 seconds"),
    (["-p", "53", "--udp-timeout", "86401", "--", "true"], "--udp-timeout 86401"),
    (["-p", "53", "--udp-timeout", "20s", "--", "true"], "'--udp-timeout'"),
    (["-p", "53", "--firewall", "maybe", "--", "true"], "maybe"),
    (["-p", "53", "--helper", "tftp", "--", "true"], "udp port 69"),
    (["-p", "53", "--ready-fd", "-1", "--", "true"], "--ready-fd -1"),
    (["-p", "53", "--ready-fd", "x", "--", "true"], "'x'"),
    (["exec"], "Missing argument 'instance'"),
    (["doctor", "--ports", "0"], "port 0"),
]


@pytest.mark.parametrize("args, culprit", BAD_INPUT)
def test_bad_input_exits_2_with_one_line(capsys, args, culprit):
    one_line_usage_error(invoke(capsys, *args), culprit)


def test_bad_input_exits_2_with_one_line_as_a_process():
    one_line_usage_error(nswrap("--ports", "53,70000", "--stop-timeout", "inf", "--", "true"), "70000")


@pytest.mark.parametrize(
    "env, culprits",
    [
        ({"NSWRAP_USER": ""}, ["NSWRAP_USER ''", "empty user"]),
        ({"NSWRAP_PORTS": "53 70000"}, ["NSWRAP_PORTS", "70000"]),
        ({"NSWRAP_STOP_TIMEOUT": "soon"}, ["NSWRAP_STOP_TIMEOUT", "soon"]),
        ({"NSWRAP_STOP_TIMEOUT": "inf"}, ["NSWRAP_STOP_TIMEOUT", "inf"]),
        ({"NSWRAP_NO_OUTBOUND": "maybe"}, ["NSWRAP_NO_OUTBOUND", "maybe"]),
        ({"NSWRAP_FIREWALL": "bogus"}, ["NSWRAP_FIREWALL", "bogus"]),
        ({"NSWRAP_UPLINK": "eth0=not-an-address"}, ["NSWRAP_UPLINK", "not-an-address"]),
        ({"NSWRAP_MARK_MASK": "0x5"}, ["NSWRAP_MARK_MASK", "0x5"]),
        ({"NSWRAP_UDP_TIMEOUT": "5"}, ["NSWRAP_UDP_TIMEOUT", "--udp-timeout 5"]),
        ({"NSWRAP_UDP_TIMEOUT": "long"}, ["NSWRAP_UDP_TIMEOUT", "long"]),
        ({"NSWRAP_VERBOSE": "vv"}, ["NSWRAP_VERBOSE", "vv"]),
    ],
)
def test_bad_values_from_the_environment_exit_2_naming_the_variable(capsys, monkeypatch, env, culprits):
    for name, value in {"NSWRAP_PORTS": "53", **env}.items():
        monkeypatch.setenv(name, value)
    one_line_usage_error(invoke(capsys, "--", "true"), *culprits)


def test_an_empty_nswrap_user_is_refused_as_a_process():
    """click takes an empty variable for an unset one: nswrap must not run the server as root then."""
    one_line_usage_error(nswrap("-p", "53", "--", "true", env={"NSWRAP_USER": ""}), "NSWRAP_USER ''")


def test_run_is_the_default_subcommand(capsys):
    assert invoke(capsys, "run", "--ports", "53,70000", "--", "true").returncode == EXIT_USAGE
    version = invoke(capsys, "--version")
    assert version.returncode == 0 and version.stdout.startswith("nswrap, version ")
    help_ = invoke(capsys, "run", "--help")
    assert help_.returncode == 0 and "--ports" in help_.stdout and "NSWRAP_PORTS" in help_.stdout
    top = invoke(capsys, "--help")
    assert top.returncode == 0 and all(word in top.stdout for word in ("run", "cleanup", "list", "exec", "doctor"))


def test_help_is_a_fast_path():
    """--help and a usage error import nothing that talks to the kernel (lazy imports in cli.py)."""
    done = nswrap_with_importtime("--help")
    assert done.returncode == 0 and "Usage: nswrap" in done.stdout
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    heavy = {"nswrap.instance", "nswrap.precheck", "nswrap.readiness", "nswrap.transaction", "nswrap.netlink",
             "nswrap.datapath", "nswrap.sync", "nswrap.nft", "nswrap.state",
             "nswrap.supervise", "nswrap.commands", "nswrap.doctor"}
    assert "nswrap.cli" in imported and not heavy & imported, heavy & imported


def nswrap_with_importtime(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([python(), "-X", "importtime", "-m", "nswrap", *args], capture_output=True, text=True,
                          timeout=30, env=clean_env())


def unprivileged(*args: str):
    """`nswrap *args` as a user without capabilities (setpriv to nobody when the tests run as root)."""
    if os.geteuid() != 0:
        return nswrap(*args)
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop root")
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                           python(), "-m", "nswrap", *args], capture_output=True, text=True, timeout=30, env=clean_env())


def test_unprivileged_run_fails_with_125_and_one_line():
    done = unprivileged("--ports", "53", "--", "true")
    assert done.returncode == 125, done.stderr
    assert done.stderr.startswith("nswrap: not permitted") and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize("args, what, code", [(["list"], "nswrap list needs root", 1),
                                              (["--ports", "53", "--dry-run"], "--dry-run needs root", 125),
                                              (["exec", "abcdef", "--", "true"], "nswrap exec needs root", 1)])
def test_commands_that_read_roots_state_need_root(capsys, monkeypatch, args, what, code):
    """--dry-run exits as the start would (125, as test_unprivileged_run_fails_with_125_and_one_line)."""
    monkeypatch.setattr(os, "geteuid", lambda: 65534)  # checked before anything is read
    done = invoke(capsys, *args)
    assert done.returncode == code and done.stdout == ""
    assert done.stderr == f"nswrap: {what}: nswrap's state (/run/nswrap) and the kernel's tables are root's only\n"


# --- --ready-fd ----------------------------------------------------------------------------------


def test_ready_fd_must_be_open_for_writing():
    read_end, write_end = os.pipe()
    try:
        check_ready_fd(None)
        check_ready_fd(write_end)
        with pytest.raises(UsageError, match=f"invalid --ready-fd {read_end}: open for reading only") as raised:
            check_ready_fd(read_end)
        assert raised.value.code == EXIT_USAGE
    finally:
        os.close(read_end)
        os.close(write_end)
    with pytest.raises(UsageError, match=f"invalid --ready-fd {read_end}: no such open file descriptor"):
        check_ready_fd(read_end)  # closed now
    with pytest.raises(UsageError, match="no such open file descriptor"):
        check_ready_fd(999_999)


# --- shell completion (in-process: click's bash_complete protocol) ---------------------------------


def complete(capsys, monkeypatch, words: str) -> list[str]:
    split = words.split(" ")
    with monkeypatch.context() as m:
        m.setenv("_NSWRAP_COMPLETE", "bash_complete")
        m.setenv("COMP_WORDS", words)
        m.setenv("COMP_CWORD", str(len(split) - 1))
        done = invoke(capsys)
    assert done.returncode == 0 and not done.stderr, done
    return done.stdout.splitlines()


@pytest.mark.parametrize(
    "words, expected",
    [
        ("nswrap --po", ["plain,--ports"]),  # no `run` yet: the default command's options still complete
        ("nswrap --no", ["plain,--no-outbound"]),
        ("nswrap --ver", ["plain,--version", "plain,--verbose"]),
        ("nswrap l", ["plain,list"]),
        ("nswrap c", ["plain,cleanup"]),
        ("nswrap -p 53 --up", ["plain,--uplink"]),
        ("nswrap run --sto", ["plain,--stop-timeout"]),
        ("nswrap --firewall ", ["plain,auto", "plain,off"]),
        ("nswrap -p 53 --helper ", ["plain,tftp", "plain,none"]),
        ("nswrap doctor --fi", ["plain,--firewall"]),
        ("nswrap --config ", ["file,"]),
    ],
)
def test_shell_completion(capsys, monkeypatch, words, expected):
    assert complete(capsys, monkeypatch, words) == expected
    monkeypatch.setenv("NSWRAP_CONFIG", "/nonexistent.toml")  # a broken config file must not break completion
    assert complete(capsys, monkeypatch, words) == expected


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F _nswrap_completion nswrap"),
                                           ("zsh", "#compdef nswrap"), ("fish", "complete --no-files --command nswrap")])
def test_shell_completion_scripts(capsys, monkeypatch, shell, marker):
    monkeypatch.setenv("_NSWRAP_COMPLETE", f"{shell}_source")
    done = invoke(capsys)
    assert done.returncode == 0 and marker in done.stdout, done


def test_nothing_imports_cli():
    """Imports flow one way: cli -> the rest."""
    import pathlib

    for source in (pathlib.Path(cli.__file__).parent).glob("*.py"):
        if source.name not in ("cli.py", "__main__.py"):
            assert "nswrap.cli" not in source.read_text() and "from nswrap import cli" not in source.read_text(), source


# --- a long value is quoted as a bounded prefix -----------------------------------------------------

HUGE = "x" * 1_000_000


def test_quoted_shows_a_bounded_prefix_and_the_length():
    assert quoted("eth0") == "'eth0'" and quoted("a'b") == repr("a'b") and quoted(["53"]) == "['53']"
    assert quoted("y" * QUOTED) == repr("y" * QUOTED)
    assert quoted(HUGE) == repr("x" * QUOTED) + "… (1000000 characters)"
    assert quoted([HUGE]) == "['" + "x" * (QUOTED - 2) + "… (1000004 characters)"
    assert cut("abc", 3) == "abc" and cut("abcd", 3) == "abc… (4 characters)"


@pytest.mark.parametrize(
    "args, env, culprit",
    [
        (["--ports", HUGE, "--", "true"], {}, "invalid port spec 'xxx"),
        (["--ports", "53", "--uplink", "eth0=" + HUGE, "--", "true"], {}, "invalid uplink 'eth0=xx"),
        (["--ports", "53", "--address", HUGE, "--", "true"], {}, "invalid address 'xxx"),
        (["--ports", "53", "--subnet", HUGE, "--", "true"], {}, "invalid subnet 'xxx"),
        (["--ports", "53", "--mark-mask", HUGE, "--", "true"], {}, "invalid mark mask 'xxx"),
        (["--ports", "53", "--user", HUGE, "--", "true"], {}, "invalid --user 'xxx"),
        (["--ports", "53", "--ready-fd", "9" * 4000, "--", "true"], {}, "invalid --ready-fd 99999999999999999999…"),
        (["--ports", "53", "--stop-timeout", HUGE, "--", "true"], {}, "'--stop-timeout': 'xxx"),  # click's own message
        (["--ports", "53", "--firewall", HUGE, "--", "true"], {}, "'--firewall': 'xxx"),
        (["--ports", "53", "--", "true"], {"NSWRAP_READY_FD": HUGE}, "NSWRAP_READY_FD: 'xxx"),
        (["--ports", "53", "--", "true"], {"NSWRAP_NO_OUTBOUND": HUGE}, "NSWRAP_NO_OUTBOUND: 'xxx"),
        (["--ports", "53", "--", "true"], {"NSWRAP_HELPER": "tftp " + HUGE}, "NSWRAP_HELPER: 'xxx"),
        (["--" + HUGE, "--", "true"], {}, "No such option '--xxx"),
    ],
)
def test_a_megabyte_value_is_quoted_as_a_short_prefix(capsys, monkeypatch, args, env, culprit):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    done = invoke(capsys, *args)
    one_line_usage_error(done, culprit, "characters)")
    assert len(done.stderr) < 1200, done.stderr[:300]


@pytest.mark.parametrize(
    "text, culprit",
    [
        (f'firewall = "{HUGE}"\nports = ["53"]\ncommand = ["true"]\n', "key 'firewall' in config file"),  # click's message
        (f'user = "{HUGE}"\nports = ["53"]\ncommand = ["true"]\n', "invalid --user 'xxx"),
        (f'ports = ["{HUGE}"]\ncommand = ["true"]\n', "invalid port spec 'xxx"),
        (f'stop-timeout = "{HUGE}"\n', "not string 'xxx"),
        (f'ports = [1, {", ".join(["2"] * 100_000)}, true]\n', "not array ['1', '2',"),
        (f'{HUGE} = 1\n', "unknown key 'xxx"),
    ],
)
def test_a_megabyte_value_from_a_config_file_is_quoted_as_a_short_prefix(capsys, tmp_path, text, culprit):
    """A root-only file read through a delegated --config: its secrets stay off stderr but for
    a prefix (the key names the line)."""
    path = str(tmp_path / "big.toml")
    with open(path, "w") as f:
        f.write(text)
    done = invoke(capsys, "--config", path)
    one_line_usage_error(done, path, culprit, "characters)")
    assert len(done.stderr) < 1200, done.stderr[:300]


def test_listed_shows_the_first_few_and_how_many_more():
    assert listed([]) == "" and listed(["53/udp"]) == "53/udp" and listed(range(5)) == "0, 1, 2, 3, 4"
    assert listed(range(10_000)) == "0, 1, 2, 3, 4 … and 9995 more"
    assert listed(iter(range(7)), shown=2) == "0, 1 … and 5 more"


def test_a_bare_nswrap_prints_its_usage_without_a_prefix(capsys):
    done = invoke(capsys)
    assert done.returncode == EXIT_USAGE and done.stderr.startswith("Usage: nswrap ") and "nswrap: Usage" not in done.stderr
