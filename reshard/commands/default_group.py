"""The ``reshard`` command group: ``reshard --tp 8 MODEL`` means ``reshard convert --tp 8 MODEL``."""

from __future__ import annotations

import click


class DefaultToConvert(click.Group):
    """A group where a first positional argument that is not a subcommand means ``convert``.

    So ``reshard --tp 8 MODEL`` works exactly as written, options before the model, next to the subcommands.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        first = _first_positional(args, self.commands["convert"])
        wants_group_help = not args or args[0] in ("-h", "--help", "--version")
        if (first is None and not wants_group_help) or (first is not None and first not in self.commands):
            args = ["convert", *args]
        return super().parse_args(ctx, args)


def _first_positional(args: list[str], command: click.Command) -> str | None:
    takes_value = {
        opt for param in command.params if isinstance(param, click.Option) and not param.is_flag for opt in param.opts
    }
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--":
            return None
        if arg.startswith("-"):
            skip = arg in takes_value
            continue
        return arg
    return None
