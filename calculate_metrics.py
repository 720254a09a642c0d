"""FID, FD_DINOv2, precision/recall, the ADM protocol, the autoguidance sweep: `python calculate_metrics.py --help`.

The command lives in `edm2.commands.calculate_metrics` (also installed as a console script); this file keeps the
published command line `python calculate_metrics.py ...` working from a checkout."""

from edm2.commands.calculate_metrics import main

if __name__ == '__main__':
    main()
