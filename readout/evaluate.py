"""``python -m readout.evaluate --config ...``: the launcher of :mod:`readout.evaluation.cli`."""

if __name__ == "__main__":
    from readout.evaluation.cli import main

    main()
