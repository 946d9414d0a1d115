"""The training wing: the Lightning module and data module, ``readout.fit``, checkpoints, faults and
signals, the teacher maps of a distilled readout, and the export of a checkpoint as a bundle.

The library (``import readout``) never imports it (tests/test_import_graph.py)."""
