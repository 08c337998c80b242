"""Command line: click only. Parse -> Config -> run; the one place that maps errors to exit codes.

Every option can also come from an ``NSWRAP_*`` environment variable and from a TOML file given
with ``--config`` (or ``NSWRAP_CONFIG``); the command line wins over the environment, which wins
over the file (click's own order: command line, envvar, ``default_map``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from nswrap import __version__, configfile
from nswrap.config import (
    DATAPATHS,
    DEFAULT_UDP_TIMEOUT,
    FIREWALL,
    IPV6_FORWARDING,
    Config,
    check_ready_fd_number,
    check_stop_timeout,
    check_udp_timeout,
    command_problem,
    parse_address,
    parse_mark_mask,
    parse_ports,
    parse_subnet,
    parse_uplink,
    parse_user,
    require_ports,
    resolve_helpers,
)
from nswrap.errors import EXIT_FAILED, EXIT_USAGE, NswrapError, UsageError, cut, quoted

log = logging.getLogger("nswrap")

CONFIG_META = "nswrap.config"  # ctx.meta key: path of the config file the defaults came from
COMMAND_META = "nswrap.command"  # ctx.meta key: the config file's `command`, if any


class DefaultRun(click.Group):
    """`nswrap [OPTIONS] -- COMMAND` means `nswrap run [OPTIONS] -- COMMAND`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-") and not ctx.resilient_parsing:
            # `nswrap status`: a command word nswrap does not have, not a server (that goes after --)
            raise click.UsageError(f"no such command {quoted(args[0])} (commands: {', '.join(sorted(self.commands))}; "
                                   f"a server goes after --: nswrap [OPTIONS] -- COMMAND [ARG...])")
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        elif not args and os.environ.get("NSWRAP_CONFIG") and not ctx.resilient_parsing:
            args = ["run"]  # a bare `nswrap` runs what the file says (e.g. a container's ENTRYPOINT)
        return super().parse_args(ctx, args)

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list:
        """`nswrap --po<TAB>` completes run's options too: with nothing before the word being
        completed, parse_args above has nothing to put `run` in front of."""
        results = super().shell_complete(ctx, incomplete)
        if incomplete.startswith("-"):
            run_command = self.commands["run"]
            run_ctx = click.Context(run_command, parent=ctx, info_name="run", resilient_parsing=True)
            seen = {item.value for item in results}
            results += [item for item in run_command.shell_complete(run_ctx, incomplete) if item.value not in seen]
        return results


def _complete_interfaces(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """--uplink values: this network namespace's interfaces."""
    try:
        names = sorted(os.listdir("/sys/class/net"))
    except OSError:
        return []
    return [name for name in names if name.startswith(incomplete) and name != "lo"]


class Option(click.Option):
    """click.Option whose own messages (`'…' is not a valid integer.`) quote a bad value as every
    nswrap message does: a bounded prefix (errors.quoted), whether from NSWRAP_* or the file."""

    def type_cast_value(self, ctx: click.Context, value: Any) -> Any:
        try:
            return super().type_cast_value(ctx, value)
        except click.BadParameter as e:
            message = e.message
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(item, str):
                    message = message.replace(repr(item), quoted(item))
            raise click.BadParameter(message, ctx=e.ctx, param=e.param) from None


def option(*decls: str, **attrs: Any) -> Callable:
    return click.option(*decls, cls=Option, **attrs)


def _env(name: str) -> dict:
    return {"envvar": f"NSWRAP_{name}", "show_envvar": True}


def _load_config(ctx: click.Context, param: click.Parameter, path: str | None) -> None:
    """Eager callback of --config: the file's values become the command's defaults."""
    if not path or ctx.resilient_parsing:
        return
    values = read_config(path)
    ctx.meta[CONFIG_META] = path
    if "command" in values:
        ctx.meta[COMMAND_META] = tuple(values.pop("command"))
    names = {p.name for p in ctx.command.params}
    ctx.default_map = {**(ctx.default_map or {}), **{k: v for k, v in values.items() if k in names}}


config_option = option(
    "--config", type=click.Path(), metavar="FILE", is_eager=True, expose_value=False, callback=_load_config, **_env("CONFIG"),
    help="Read options from this TOML file (keys named like the long options, plus `command`: a list of strings).",
)


def _shared(*decls: str, **attrs: Any) -> Callable[..., Callable]:
    """An option several commands have, declared once: each command may give its own help or
    default (`doctor --ports` has one: the ports you would publish)."""

    def declare(**own: Any) -> Callable:
        return option(*decls, **{**attrs, **own})

    return declare


ports_option = _shared(
    "-p", "--ports", "ports", multiple=True, metavar="SPEC", **_env("PORTS"),
    help="Published ports: PORT, OUTER:INNER, A-B or A-B:C-D, each optionally /udp (default) or /tcp; "
         "comma-separated, repeatable.",
)
uplink_option = _shared(
    "-u", "--uplink", "uplinks", multiple=True, metavar="IFACE[=GATEWAY]", **_env("UPLINK"),
    shell_complete=_complete_interfaces,
    help="Serve clients arriving on IFACE (repeatable). Default: every interface with a global address.",
)
mark_mask_option = _shared(
    "--mark-mask", default="0xf0000000", show_default=True, metavar="MASK", **_env("MARK_MASK"),
    help="fwmark bits nswrap may use.",
)
firewall_option = _shared(
    "--firewall", type=click.Choice(FIREWALL), default="auto", show_default=True, **_env("FIREWALL"),
    help="auto: where iptables (Docker, ufw) would drop the forwarded flows, add narrow accepts; off: refuse instead.",
)
ipv6_forwarding_option = _shared(
    "--ipv6-forwarding", type=click.Choice(IPV6_FORWARDING), default="auto", show_default=True, **_env("IPV6_FORWARDING"),
    help="How IPv6 clients are served: interface (per-interface forwarding, Linux >= 6.17); global "
         "(nswrap holds net.ipv6.conf.all.forwarding while it runs, router advertisements kept, nothing "
         "else forwarded); auto (interface where the kernel has it, else IPv6 only if the host "
         "forwards already); off.",
)
datapath_option = _shared(
    "--datapath", type=click.Choice(DATAPATHS), default="nft", show_default=True, **_env("DATAPATH"),
    help="bpf: published flows take a tc-BPF fast path (the host's netfilter, conntrack and forwarding "
         "skipped; docs/fastpath.md); nft: nftables and conntrack.",
)
verbose_option = _shared("-v", "--verbose", count=True, **_env("VERBOSE"))


@click.group(cls=DefaultRun, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nswrap")
def cli() -> None:
    """Run an unmodified UDP/TCP server so that every client, on every uplink and every address of
    this host, gets its answer from the address it asked, through the uplink it came in on.

    \b
      nswrap --ports 53,53/tcp -- unbound -d -c examples/unbound.conf
      nswrap --ports 123 --uplink eth0 --uplink eth1=198.51.100.1 -- \\
          chronyd -d 'pool 2.debian.pool.ntp.org iburst' allow
      nswrap --config /etc/nswrap/dns.toml

    Without a command name, the options go to `run`: its options are in `nswrap run --help`.
    """


@cli.command(context_settings={"allow_interspersed_args": False})
@config_option
@ports_option()
@uplink_option()
@option("--subnet", metavar="CIDR", **_env("SUBNET"),
              help="Internal subnet between host and server (default: a free /30 in 198.18.0.0/15).")
@mark_mask_option()
@option("-a", "--address", "addresses", multiple=True, metavar="ADDR", **_env("ADDRESS"),
              help="Publish only on this host address (repeatable). Default: every address of the host, and 127.0.0.1.")
@firewall_option()
@option("--no-outbound", is_flag=True, **_env("NO_OUTBOUND"), help="The server may not open connections of its own.")
@ipv6_forwarding_option()
@option("--helper", "helpers", multiple=True, type=click.Choice(["tftp", "none"]), **_env("HELPER"),
              help="Conntrack helper for a protocol whose server answers from a new port (tftp: udp 69 must be "
                   "published). Default: tftp when udp 69 is published; none: no helper.")
@option("--user", metavar="USER[:GROUP]", **_env("USER"),
              help="Run the server as this user (it may still bind ports below 1024).")
@option("--stop-timeout", type=float, default=10.0, show_default=True, metavar="SECONDS", **_env("STOP_TIMEOUT"),
              help="After forwarding SIGTERM/SIGINT, SIGKILL the server's processes after this long (0: never); "
                   "a server still running 0.5 s after SIGINT gets SIGTERM too.")
@option("--udp-timeout", type=int, default=DEFAULT_UDP_TIMEOUT, show_default=True, metavar="SECONDS",
              **_env("UDP_TIMEOUT"),
              help="Forget an answered UDP flow this long after its last packet; one value for every instance on the "
                   "host. Longer keeps quieter sessions, but lets a spoofed flood pin conntrack entries longer.")
@datapath_option()
@option("--ready-fd", type=int, metavar="N", **_env("READY_FD"),
              help="Write READY to fd N once the server listens on every published port.")
@option("--take-over", is_flag=True, **_env("TAKE_OVER"),
              help="Publish even where a host process serves a published port (its clients reach the server "
                   "from then on); without it, such a start is refused.")
@option("--dry-run", is_flag=True, **_env("DRY_RUN"),
              help="Print what a start would change here, as shell lines, and exit; change nothing.")
@verbose_option(help="-v: log each host change as a shell line; -vv: debug.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx, ports, uplinks, subnet, mark_mask, addresses, firewall, no_outbound, ipv6_forwarding, helpers, user,
        stop_timeout, udp_timeout, datapath, ready_fd, take_over, dry_run, verbose, command) -> None:
    """Run COMMAND in its own network namespace, publishing --ports on the uplinks.

    Every option may also be set in the environment (NSWRAP_PORTS, ...; a repeatable option takes
    whitespace-separated values there, e.g. NSWRAP_UPLINK="eth0 eth1=198.51.100.1") or in the
    --config file; the command line wins over the environment, the environment over the file.
    """
    from_file = not command and COMMAND_META in ctx.meta
    if from_file:
        command = ctx.meta[COMMAND_META]

    def start() -> int:
        if user is None and "NSWRAP_USER" in os.environ:  # click takes an empty variable for unset
            raise UsageError("invalid NSWRAP_USER '': empty user name (unset it to run the server as root)")
        problem = command_problem(command) if from_file else None  # Config checks it again, not naming the file
        if problem:
            raise UsageError(f"{problem} (from key 'command' in config file {ctx.meta.get(CONFIG_META)})")
        _parsed(ctx, "user", lambda u: u is None or parse_user(u), user)  # checked where they came from;
        _parsed(ctx, "ready_fd", check_ready_fd_number, ready_fd)  # Config checks them again
        published = _parsed(ctx, "ports", lambda p: require_ports(parse_ports(p)), ports)
        config = Config(
            command=tuple(command),
            ports=published,
            uplinks=_parsed(ctx, "uplinks", lambda us: tuple(parse_uplink(u) for u in us), uplinks),
            subnet=_parsed(ctx, "subnet", parse_subnet, subnet) if subnet else None,
            mark_mask=_parsed(ctx, "mark_mask", parse_mark_mask, mark_mask),
            dry_run=dry_run,
            user=user,
            stop_timeout=_parsed(ctx, "stop_timeout", check_stop_timeout, stop_timeout),
            udp_timeout=_parsed(ctx, "udp_timeout", check_udp_timeout, udp_timeout),
            ready_fd=ready_fd,
            addresses=_parsed(ctx, "addresses", lambda a: tuple(map(parse_address, a)), addresses),
            firewall=firewall,
            outbound=not no_outbound,
            helpers=_parsed(ctx, "helpers", lambda h: resolve_helpers(h, published), helpers),
            ipv6_forwarding=ipv6_forwarding,
            take_over=take_over,
            datapath=datapath,
        )
        if config.dry_run:
            from nswrap.commands import dry_run as print_plan

            return print_plan(config)
        from nswrap.instance import run as run_instance  # lazy: --help and usage errors stay fast

        return run_instance(config)

    _exit_with(start, verbose)


@cli.command()
@verbose_option(help="-vv: debug output and tracebacks.")
def cleanup(verbose) -> None:
    """Remove what dead nswrap instances left behind (never touches a live one); idempotent."""
    from nswrap.commands import cleanup as run_cleanup

    _exit_with(run_cleanup, verbose)


@cli.command()
@config_option
@ports_option(default=["53,53/tcp"], show_default=True, help="The ports you would publish.")
@uplink_option(help="The uplinks you would use.")
@mark_mask_option()
@firewall_option()
@ipv6_forwarding_option()
@datapath_option()
@verbose_option(help="-vv: tracebacks.")
@click.pass_context
def doctor(ctx, ports, uplinks, mark_mask, firewall, ipv6_forwarding, datapath, verbose) -> None:
    """Check whether nswrap would work on this host, one verdict per line; exit 0 only if it would.

    Reads the same NSWRAP_* variables and --config file as `run` (keys it has no use for are
    ignored), so it checks what the service would do.
    """

    def check() -> int:
        config = Config(
            command=(),
            ports=_parsed(ctx, "ports", parse_ports, ports),
            uplinks=_parsed(ctx, "uplinks", lambda us: tuple(parse_uplink(u) for u in us), uplinks),
            mark_mask=_parsed(ctx, "mark_mask", parse_mark_mask, mark_mask),
            firewall=firewall,
            dry_run=True,
            ipv6_forwarding=ipv6_forwarding,
            datapath=datapath,
        )
        from nswrap.doctor import doctor as run_doctor

        return run_doctor(config)

    _quiet_on_a_closed_pipe()
    _exit_with(check, verbose)


@cli.command("list")
@option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@option("--check", is_flag=True,
        help="Health check: exit 0 while an instance is live in this network namespace, 1 when none is.")
def list_(as_json, check) -> None:
    """List the live nswrap instances on this host (network namespace)."""
    from nswrap.commands import check_serving, list_instances

    _quiet_on_a_closed_pipe()
    _exit_with(check_serving if check else lambda: list_instances(as_json), 0)


@cli.command("exec", context_settings={"allow_interspersed_args": False})
@click.argument("instance", metavar="ID")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def exec_(instance, command) -> None:
    """Run COMMAND inside instance ID's network namespace (e.g. tcpdump -ni eth0, ss -ulpn)."""
    from nswrap.commands import exec_in

    command = tuple(command)
    if command[:1] == ("--",):  # `nswrap exec ID -- COMMAND`: click passes the separator on
        command = command[1:]
    _exit_with(lambda: exec_in(instance, command), 0)


# -- the config file ------------------------------------------------------------------------------


def config_keys() -> dict[str, tuple[str, str]]:
    """{TOML key: (parameter name, kind)}: every long option of `run` (but --config) and `command`.

    kind: "list" (a list of strings, or one string), "argv" (a list of strings: one string would be
    one program name, spaces and all), "str", "number", "int" or "bool".
    """
    keys = {"command": ("command", "argv")}
    for param in run.params:
        if not isinstance(param, click.Option) or param.name == "config":
            continue
        long_name = next(o for o in param.opts if o.startswith("--"))[2:]
        if param.multiple:
            kind = "list"
        elif param.is_flag and not param.count:
            kind = "bool"
        elif param.count or isinstance(param.type, click.types.IntParamType):
            kind = "int"
        elif isinstance(param.type, click.types.FloatParamType):
            kind = "number"
        else:
            kind = "str"
        keys[long_name] = (param.name, kind)
    return keys


def read_config(path: str) -> dict:
    """The TOML file at *path* as {parameter name: value}; click.UsageError (one line) if bad."""
    try:
        return configfile.read(path, config_keys())
    except UsageError as e:
        raise click.UsageError(str(e)) from None


def _origin(ctx: click.Context | None, name: str | None) -> str | None:
    """Where a parameter's value came from when not from the command line: NSWRAP_X, or the key in
    the config file; None for the command line (or when unknown)."""
    if ctx is None or name is None:
        return None
    source = ctx.get_parameter_source(name)
    param = next((p for p in ctx.command.params if p.name == name), None)
    if source is ParameterSource.ENVIRONMENT and param is not None and isinstance(param.envvar, str):
        return param.envvar
    if source is ParameterSource.DEFAULT_MAP and param is not None:
        key = next((o[2:] for o in param.opts if o.startswith("--")), name)
        return f"key {key!r} in config file {ctx.meta.get(CONFIG_META)}"
    return None


def _parsed(ctx: click.Context, name: str, parse, value):
    """parse(value), with a usage error naming the variable or file the value came from."""
    try:
        return parse(value)
    except UsageError as e:
        origin = _origin(ctx, name)
        if not origin:
            raise
        raise UsageError(f"{e} (from {origin})") from None


# -- running and exiting --------------------------------------------------------------------------


def _quiet_on_a_closed_pipe() -> None:
    """Commands that only read and print (`list`, `doctor`) end like any Unix tool when their
    reader goes (`nswrap doctor | head -1`): killed by SIGPIPE, silently. Never `run` or
    `cleanup`: they must finish what they change on the host."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def _exit_with(action, verbose: int) -> None:
    """Run a command's action; map every error to one line on stderr and its exit code."""
    _setup_logging(verbose)
    try:
        code = action()
    except NswrapError as e:
        if verbose >= 2:
            traceback.print_exc()
        log.error("%s", e)
        code = e.code
    except Exception as e:  # an nswrap bug: one line, unless -vv asks for the traceback
        if verbose >= 2:
            traceback.print_exc()
        log.error("internal error: %s: %s (run with -vv for details)", type(e).__name__, e)
        code = EXIT_FAILED
    sys.exit(code)


class _Formatter(logging.Formatter):
    """`nswrap: ` before every message, except the shell lines of -v: those are printed as they
    can be pasted into a root shell, each change followed by an empty line (transaction.Transaction
    marks them `shell`)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{text}\n" if getattr(record, "shell", False) else f"nswrap: {text}"


def _setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG)
    log.propagate = False


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="nswrap", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        if isinstance(e, click.UsageError) and e.format_message().startswith("Usage:"):  # a bare `nswrap`: the help
            click.echo(e.format_message(), err=True)
            sys.exit(EXIT_USAGE)
        if isinstance(e, click.BadParameter) and e.param is not None and e.param_hint is None:
            # Name where the bad value came from: the option, NSWRAP_X or the config file's key.
            e.param_hint = _origin(e.ctx, e.param.name) or " / ".join(repr(o) for o in e.param.opts)
        click.echo(f"nswrap: {cut(e.format_message(), 1000)}", err=True)  # an unknown 1 MB option, say
        sys.exit(EXIT_USAGE if isinstance(e, click.UsageError) else e.exit_code)
