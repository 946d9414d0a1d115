"""The evaluation wing: its config, the method registry and baselines, the runner and the report
(``python -m readout.evaluate``). The library never imports it."""
