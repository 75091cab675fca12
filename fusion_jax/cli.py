"""What the absl command lines (fusion_jax.main, fusion_jax.report) share."""

from __future__ import annotations

import os
import shlex
import sys

_HELP = {"--help", "-?", "--helpfull", "--helpshort"}


def parse_absl_flags(argv: list[str]) -> list[str]:
    """absl's flags.FLAGS(argv), with -h read as --help and status 0 after a help that was asked for (absl
    ends every help with 1), also where its reader left early (`--help | head`); its flags.Error and other
    errors are the caller's to say."""
    from absl import flags

    argv = [argv[0], *("--help" if a == "-h" else a for a in argv[1:])]
    asked = {a.split("=", 1)[0] for a in argv[1:]} & _HELP
    try:
        return flags.FLAGS(argv)
    except SystemExit as e:
        sys.exit(0 if asked and e.code == 1 else e.code)
    except BrokenPipeError:
        if not asked:
            raise
        # Python's own recipe: what is left to flush at exit goes nowhere, rather than fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


def flag_error(error: Exception) -> str:
    """absl's flag error in one line, without the 'ERROR:: ' that starts some (an unreadable --flagfile)."""
    return " ".join(str(error).split()).removeprefix("ERROR:: ")


def command_line(module: str, args: list[str]) -> str:
    """`python -m MODULE ARGS` as results record it, one string a shell takes back: an argument that needs
    quoting in double quotes where they suffice ("--config.seeds=(42,)"), else shlex's single quotes."""
    def quote(arg: str) -> str:
        if shlex.quote(arg) == arg or set(arg) & set('"$`\\!'):
            return shlex.quote(arg)
        return f'"{arg}"'

    return " ".join(["python", "-m", module, *map(quote, args)])
