"""Prepare datasets (convert images, encode latents): `python dataset_tool.py --help`.

The command lives in `edm2.commands.dataset_tool` (also installed as a console script); this file keeps the
published command line `python dataset_tool.py ...` working from a checkout."""

from edm2.commands.dataset_tool import cli

if __name__ == '__main__':
    cli()
