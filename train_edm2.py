"""Train EDM2 diffusion models: `python train_edm2.py --help`.

The command lives in `edm2.commands.train_edm2` (also installed as a console script); this file keeps the
published command line `python train_edm2.py ...` working from a checkout."""

from edm2.commands.train_edm2 import main

if __name__ == '__main__':
    main()
