"""`python -m edm2.checkpoint_cli info|convert`, kept for existing scripts: the command itself lives in
`edm2.commands.checkpoint_cli` (also installed as `edm2-checkpoint`); importing this module does nothing."""

if __name__ == '__main__':
    from edm2.commands.checkpoint_cli import cli
    cli(prog_name='python -m edm2.checkpoint_cli')
