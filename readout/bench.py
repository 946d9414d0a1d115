"""``python -m readout.bench ...``: speed ratios, side by side (launches :mod:`readout.tools.bench.cli`)."""

if __name__ == "__main__":
    from readout.tools.bench.cli import main

    main()
