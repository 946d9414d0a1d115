"""``python -m readout.export CKPT --out DIR``: the launcher of :mod:`readout.training.export`."""

if __name__ == "__main__":
    from readout.training.export import main

    main()
