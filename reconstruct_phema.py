"""Post-hoc EMA reconstruction from training snapshots: `python reconstruct_phema.py --help`.

The command lives in `edm2.commands.reconstruct_phema` (also installed as a console script); this file keeps the
published command line `python reconstruct_phema.py ...` working from a checkout."""

from edm2.commands.reconstruct_phema import main

if __name__ == '__main__':
    main()
