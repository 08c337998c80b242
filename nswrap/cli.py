"""Command line: click only. Parse -> Config -> run; the one place that maps errors to exit codes."""

from __future__ import annotations

import logging
import sys
import traceback

import click

from nswrap import __version__
from nswrap.config import Config, parse_address, parse_mark_mask, parse_ports, parse_subnet, parse_uplink
from nswrap.errors import EXIT_FAILED, EXIT_USAGE, NswrapError

log = logging.getLogger("nswrap")


class DefaultRun(click.Group):
    """`nswrap [OPTIONS] -- COMMAND` means `nswrap run [OPTIONS] -- COMMAND`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultRun, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nswrap")
def cli() -> None:
    """Run an unmodified UDP/TCP server so that every client, on every uplink and every address of
    this host, gets its answer from the address it asked, through the uplink it came in on.

    \b
      nswrap --ports 53,53/tcp -- unbound -d
      nswrap --ports 123 --uplink eth0 --uplink eth1=198.51.100.1 -- chronyd -d
    """


@cli.command(context_settings={"allow_interspersed_args": False})
@click.option("-p", "--ports", "ports", multiple=True, metavar="SPEC",
              help="Published ports: PORT, OUTER:INNER, A-B or A-B:C-D, each optionally /udp (default) or /tcp; comma-separated, repeatable.")
@click.option("-u", "--uplink", "uplinks", multiple=True, metavar="IFACE[=GATEWAY]",
              help="Serve clients arriving on IFACE (repeatable). Default: every interface with a global IPv4 address.")
@click.option("--subnet", metavar="CIDR", help="Internal subnet between host and server (default: a free /30 in 198.18.0.0/15).")
@click.option("--mark-mask", default="0xf0000000", show_default=True, metavar="MASK", help="fwmark bits nswrap may use.")
@click.option("-a", "--address", "addresses", multiple=True, metavar="ADDR",
              help="Publish only on this host address (repeatable). Default: every address of the host, and 127.0.0.1.")
@click.option("--firewall", type=click.Choice(["auto", "off"]), default="auto", show_default=True,
              help="auto: where iptables (Docker, ufw) would drop the forwarded flows, add narrow accepts; off: refuse instead.")
@click.option("--no-outbound", is_flag=True, help="The server may not open connections of its own.")
@click.option("--helper", "helpers", multiple=True, type=click.Choice(["tftp"]),
              help="Conntrack helper for a protocol whose server answers from a new port (tftp: udp 69 must be published).")
@click.option("--user", metavar="USER[:GROUP]", help="Run the server as this user (it may still bind ports below 1024).")
@click.option("--stop-timeout", type=float, default=10.0, show_default=True, metavar="SECONDS",
              help="After forwarding SIGTERM/SIGINT, SIGKILL the server's processes after this long (0: never).")
@click.option("--ready-fd", type=int, metavar="N", help="Write a line to fd N once the rules are live and the server started.")
@click.option("--dry-run", is_flag=True, help="Print the plan (ip commands, sysctls, nft ruleset) and exit; change nothing.")
@click.option("-v", "--verbose", count=True, help="-v: log each host change as a shell line; -vv: debug.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(ports, uplinks, subnet, mark_mask, addresses, firewall, no_outbound, helpers, user, stop_timeout, ready_fd, dry_run,
        verbose, command) -> None:
    """Run COMMAND in its own network namespace, publishing --ports on the uplinks."""

    def start() -> int:
        config = Config(
            command=tuple(command),
            ports=parse_ports(ports),
            uplinks=tuple(parse_uplink(u) for u in uplinks),
            subnet=parse_subnet(subnet) if subnet else None,
            mark_mask=parse_mark_mask(mark_mask),
            dry_run=dry_run,
            verbosity=verbose,
            user=user,
            stop_timeout=stop_timeout,
            ready_fd=ready_fd,
            addresses=tuple(parse_address(a) for a in addresses),
            firewall=firewall,
            outbound=not no_outbound,
            helpers=tuple(helpers),
        )
        from nswrap.run import run as run_instance  # lazy: --help and usage errors stay fast

        return run_instance(config)

    _exit_with(start, verbose)


@cli.command()
@click.option("-v", "--verbose", count=True, help="-vv: debug output and tracebacks.")
def cleanup(verbose) -> None:
    """Remove what dead nswrap instances left behind (never touches a live one); idempotent."""
    from nswrap.run import cleanup as run_cleanup

    _exit_with(run_cleanup, verbose)


@cli.command()
@click.option("-p", "--ports", "ports", multiple=True, default=["53,53/tcp"], show_default=True, metavar="SPEC",
              help="The ports you would publish.")
@click.option("-u", "--uplink", "uplinks", multiple=True, metavar="IFACE[=GATEWAY]", help="The uplinks you would use.")
@click.option("--mark-mask", default="0xf0000000", show_default=True, metavar="MASK")
@click.option("--firewall", type=click.Choice(["auto", "off"]), default="auto", show_default=True)
@click.option("-v", "--verbose", count=True, help="-vv: tracebacks.")
def doctor(ports, uplinks, mark_mask, firewall, verbose) -> None:
    """Check whether nswrap would work on this host, one verdict per line; exit 0 only if it would."""

    def check() -> int:
        config = Config(
            command=(),
            ports=parse_ports(ports),
            uplinks=tuple(parse_uplink(u) for u in uplinks),
            mark_mask=parse_mark_mask(mark_mask),
            firewall=firewall,
            dry_run=True,
        )
        from nswrap.doctor import doctor as run_doctor

        return run_doctor(config)

    _exit_with(check, verbose)


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(as_json) -> None:
    """List the live nswrap instances on this host (network namespace)."""
    from nswrap.run import list_instances

    _exit_with(lambda: list_instances(as_json), 0)


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


def _setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("nswrap: %(message)s"))
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
        click.echo(f"nswrap: {e.format_message()}", err=True)
        sys.exit(EXIT_USAGE if isinstance(e, click.UsageError) else e.exit_code)
