#!/usr/bin/env python3
"""Write the manual page nswrap(8), in roff, from nswrap's click commands: the same docstrings,
usage lines and option help that ``nswrap --help`` prints, so the page cannot drift from it.

    python3 scripts/manpage.py > nswrap.8          # the nswrap importable from sys.path
    man ./nswrap.8

debian/rules runs it on the freshly built package (PYTHONPATH=the package's tree) with Debian's
python3; the date is SOURCE_DATE_EPOCH's (dpkg-buildpackage sets it from debian/changelog), so the
page is reproducible. Sections: NAME, SYNOPSIS, DESCRIPTION (the group's help), COMMANDS (each
command's help), OPTIONS (every option of every command, as --help shows it, default and
variable included), EXIT STATUS (nswrap.errors' codes), ENVIRONMENT (every NSWRAP_* variable an
option reads), FILES, SEE ALSO.
"""

from __future__ import annotations

import datetime
import inspect
import os
import sys

import click

import nswrap
from nswrap import __version__, errors
from nswrap.cli import cli

PROG = "nswrap"
SECTION = "8"  # a system administration command: it needs root


def escape(text: str) -> str:
    """Plain text as roff: backslashes and minus signs escaped, no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def paragraphs(help_text: str) -> list[str]:
    """A click help text as roff paragraphs: click's \\b blocks kept as they are (no filling)."""
    out = []
    for block in inspect.cleandoc(help_text).split("\n\n"):
        if block.startswith("\b\n"):
            out.append(".PP\n.nf\n.RS 4\n" + escape(block[2:]) + "\n.RE\n.fi")
        else:
            out.append(".PP\n" + escape(" ".join(block.split())))
    return out


def commands() -> list[tuple[str, click.Command, click.Context]]:
    """(name, command, context) of every subcommand, in the group's order."""
    group_ctx = group_context()
    return [(name, command, click.Context(command, parent=group_ctx, info_name=name, **command.context_settings))
            for name, command in cli.commands.items()]


def group_context() -> click.Context:
    return click.Context(cli, info_name=PROG, **cli.context_settings)  # -h as well as --help


def usage(command: click.Command, ctx: click.Context) -> str:
    return " ".join(command.collect_usage_pieces(ctx))


def options(command: click.Command, ctx: click.Context) -> list[str]:
    """Each option as --help shows it: .TP, its flags and metavar in bold/italics, its help."""
    out = []
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option):  # arguments: the usage line names them
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        flags, help_text = record
        out.append(".TP\n" + "\\fB" + escape(flags) + "\\fR\n" + escape(" ".join(help_text.split()) or "(no description)"))
    return out


def environment() -> list[str]:
    """Every variable an option reads, with the options (and commands) it stands for."""
    by_variable: dict[str, tuple[str, list[str]]] = {}
    for name, command, ctx in commands():
        for param in command.get_params(ctx):
            if isinstance(param, click.Option) and isinstance(param.envvar, str):
                long_name = max(param.opts, key=len)
                by_variable.setdefault(param.envvar, (long_name, []))[1].append(name)
    out = []
    for variable, (long_name, names) in sorted(by_variable.items()):
        out.append(f".TP\n\\fB{escape(variable)}\\fR\n" + escape(f"The same as {long_name} ({', '.join(names)})."))
    out.append(".PP\n" + escape(
        "A repeatable option takes whitespace-separated values in its variable "
        "(NSWRAP_UPLINK=\"eth0 eth1=198.51.100.1\"). The command line wins over the environment, "
        "which wins over the --config file."))
    out.append(".TP\n\\fBNOTIFY_SOCKET\\fR\n" + escape(
        "Set by systemd for Type=notify: nswrap sends READY=1 (and MAINPID) once the server listens on "
        "every published port. It is not passed on to the server."))
    out.append(".TP\n\\fB_NSWRAP_COMPLETE\\fR\n" + escape(
        "Shell completion (click's): eval \"$(_NSWRAP_COMPLETE=bash_source nswrap)\"; zsh_source and "
        "fish_source for the others. The Debian package installs the bash one."))
    return out


def exit_status() -> list[str]:
    rows = [
        ("the server's", "The server exited with this status; 128+N if it died of signal N (also when a "
                         "signal interrupted the setup)."),
        (str(errors.EXIT_USAGE), "Usage error: a bad option value, an unknown flag, a bad config file key or "
                                 "value, no command."),
        (str(errors.EXIT_FAILED), "nswrap itself failed before the server started (not root, no such uplink, "
                                  "a port another instance publishes, mark bits in use...); everything already "
                                  "applied is rolled back."),
        (str(errors.EXIT_NOT_EXECUTABLE), "The command is not executable."),
        (str(errors.EXIT_NOT_FOUND), "The command was not found."),
    ]
    out = [f".TP\n\\fB{escape(code)}\\fR\n{escape(text)}" for code, text in rows]
    out.append(".PP\n" + escape(
        "nswrap doctor exits 0 if nswrap would work, 1 if not; nswrap list and nswrap exec exit 1 when "
        "not run as root; nswrap cleanup exits 0, or 125 when not run as root."))
    return out


FILES = [
    ("/run/nswrap/", "Records of the live instances, per network namespace (root's, 0700); removed with "
                     "the last instance."),
    ("/etc/nswrap/NAME.env", "What the systemd unit nswrap@NAME.service runs: NSWRAP_ARGS, or NSWRAP_CONFIG "
                             "naming a TOML file, or any NSWRAP_* variable."),
    ("/lib/systemd/system/nswrap@.service", "The systemd template unit (Type=notify, nswrap cleanup after "
                                            "every stop); installed, never enabled."),
    ("/usr/share/doc/nswrap/", "README.md (the packet path, lifecycle, coexistence, what nswrap changes on "
                               "the host, limits) and the changelog."),
]
SEE_ALSO = ["nft(8)", "ip(8)", "ip-rule(8)", "conntrack(8)", "iptables(8)", "systemd.service(5)", "systemd.exec(5)"]


def page(date: datetime.date) -> str:
    description = (cli.help or "").strip()
    # the package's docstring: "nswrap: <what it does>."
    summary = " ".join((nswrap.__doc__ or "").split()).removeprefix(f"{PROG}: ").rstrip(".")
    lines = [
        f'.TH {PROG.upper()} {SECTION} "{date.isoformat()}" "{PROG} {__version__}" "System Administration"',
        ".SH NAME",
        f"{PROG} \\- {escape(summary[0].lower() + summary[1:])}",
        ".SH SYNOPSIS",
    ]
    group_ctx = group_context()
    lines.append(f"\\fB{PROG}\\fR {escape('[OPTIONS] -- COMMAND [ARG...]')}")
    for name, command, ctx in commands():
        lines += [".br", f"\\fB{PROG} {escape(name)}\\fR {escape(usage(command, ctx))}"]
    lines.append(".br")
    lines.append(f"\\fB{PROG}\\fR " + escape(" | ".join(max(p.opts, key=len) for p in cli.get_params(group_ctx))))
    lines += [".SH DESCRIPTION", *paragraphs(description)]
    lines.append(".SH COMMANDS")
    for name, command, ctx in commands():
        lines.append(f".SS {PROG} {escape(name)} {escape(usage(command, ctx))}")
        lines += paragraphs(command.help or command.short_help or "")
    lines.append(".SH OPTIONS")
    lines.append(".SS " + escape(f"{PROG} (before a command name)"))
    lines += options(cli, group_ctx)
    for name, command, ctx in commands():
        found = options(command, ctx)
        if found:
            lines.append(f".SS {PROG} {escape(name)}")
            lines += found
    lines += [".SH EXIT STATUS", *exit_status()]
    lines += [".SH ENVIRONMENT", *environment()]
    lines.append(".SH FILES")
    lines += [f".TP\n\\fI{escape(path)}\\fR\n{escape(text)}" for path, text in FILES]
    lines += [".SH SEE ALSO", ", ".join(f"\\fB{escape(ref.split('(')[0])}\\fR({ref.split('(')[1]}" for ref in SEE_ALSO)]
    lines.append(".PP\n" + escape("/usr/share/doc/nswrap/README.md.gz, or README.md in nswrap's repository."))
    return "\n".join(lines) + "\n"


def build_date() -> datetime.date:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch else datetime.datetime.now(datetime.UTC)
    return when.date()


def main() -> None:
    if len(sys.argv) > 1:
        sys.exit("usage: scripts/manpage.py > nswrap.8 (no arguments; the date is SOURCE_DATE_EPOCH's)")
    sys.stdout.write(page(build_date()))


if __name__ == "__main__":
    main()
