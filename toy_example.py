"""The 2D toy example of the autoguidance paper: `python toy_example.py --help`.

The command lives in `edm2.commands.toy_example` (also installed as a console script); this file keeps the
published command line `python toy_example.py ...` working from a checkout."""

from edm2.commands.toy_example import cli

if __name__ == '__main__':
    cli()
