"""Generate images with EDM2 networks, optionally guided: `python generate_images.py --help`.

The command lives in `edm2.commands.generate_images` (also installed as a console script); this file keeps the
published command line `python generate_images.py ...` working from a checkout."""

from edm2.commands.generate_images import main

if __name__ == '__main__':
    main()
