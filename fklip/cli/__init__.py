"""The `fklip` command line: the group, its error handling, and the commands of the modules beside
this one. The only place that configures logging, prints errors and exits, and the only one that
imports fklip, export and engines together.

Each command builds one frozen config from its flags and hands it down. A command imports what
it runs inside its function (the CLI is the composition root), so `fklip --help` loads no torch.
"""

from __future__ import annotations

import errno
import logging
import os
import sys

import click

from fklip import __version__
from fklip.errors import ConfigError, FklipError, NotAvailableError

# Commands that later releases fill in: name -> (what it will do, the issue that tracks it).
PENDING: dict[str, tuple[str, int]] = {}
DISTRIBUTED_COMMANDS = {"train", "eval"}  # the ones that shard their work under torchrun


def _error(message: str) -> None:
    """One line on stderr, on a line of its own: progress bars an error cut short end first."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
    click.echo(message, err=True)


def _usage_line(e: click.UsageError) -> str:
    """click's usage error (three lines: usage, hint, error) as one line naming the help to read."""
    where = f"; see `{e.ctx.command_path} --help`" if e.ctx is not None else ""
    return f"fklip: error: {e.format_message().rstrip('.')}{where}"


class FklipGroup(click.Group):
    """Turns fklip's typed errors, click's usage errors and failed reads or writes into one line
    on stderr and their exit code (2; 3 for a pending command; 130 when interrupted)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # `fklip` alone: the help, as click shows it
            click.echo(e.ctx.get_help() if e.ctx is not None else e.format_message(), err=True)
            raise click.exceptions.Exit(e.exit_code) from None
        except click.UsageError as e:
            _error(_usage_line(e))
            raise click.exceptions.Exit(e.exit_code) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FklipError as e:
            _error(f"fklip: error: {e}")
            ctx.exit(e.exit_code)
        except click.exceptions.NoArgsIsHelpError as e:  # `fklip data` alone: the group's help
            click.echo(e.ctx.get_help() if e.ctx is not None else e.format_message(), err=True)
            ctx.exit(e.exit_code)
        except click.UsageError as e:
            _error(_usage_line(e))
            ctx.exit(e.exit_code)
        except OSError as e:  # a read or write the command did not turn into a FklipError itself
            if e.errno == errno.EPIPE:
                raise
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _error(f"fklip: error: {where}{e.strerror or e}")
            ctx.exit(2)
        except KeyboardInterrupt:
            _error("fklip: interrupted")
            ctx.exit(130)


@click.group(cls=FklipGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fklip")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """fklip: train, export and run FashionKLIP image-text retrieval models.

    Start with `fklip demo`: it generates a small dataset and runs the pipeline on it.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    command, world = click.get_current_context().invoked_subcommand, os.environ.get("WORLD_SIZE", "1")
    asks_help = bool({"-h", "--help"} & set(sys.argv[1:]))
    if world.isdigit() and int(world) > 1 and command not in DISTRIBUTED_COMMANDS and not asks_help:
        # N copies of a one-process command would each do all the work on the same device and
        # write the same files N times
        raise ConfigError(f"`fklip {command}` runs in one process, and this is one of {world} (torchrun's "
                          f"WORLD_SIZE); only {' and '.join(sorted(DISTRIBUTED_COMMANDS))} run under torchrun: "
                          f"start `fklip {command}` without it")


def _pending_command(name: str, what: str, issue: int) -> click.Command:
    @click.command(name, help=f"Not available yet: {what} (tracked in issue {issue}).",
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @click.pass_context
    def command(ctx: click.Context) -> None:
        raise NotAvailableError(f"`fklip {name}` ({what}) is not available in fklip "
                                f"{__version__} yet; it is tracked in issue {issue}")

    return command


for _name, (_what, _issue) in PENDING.items():
    cli.add_command(_pending_command(_name, _what, _issue))


from fklip.cli import data, demo, evaluate, export, predict, train  # noqa: E402 (they need the group's module loaded)

for _module in (data, evaluate, predict, train, demo, export):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    cli(prog_name="fklip")
