"""``python -m readout.fit``: train a readout, then export it (launches :mod:`readout.training.fit`)."""

if __name__ == "__main__":
    # First, before the imports of training take seconds: a signal then is not lost
    # (readout.training.signals).
    from readout.training.signals import catch_early

    catch_early()

    from readout.training.fit import main

    main()
