"""The shipped model files, installed as the package data of ``readout.checkpoints``.

pyproject.toml maps this folder onto that package; readout/resources.py says how it is found. This file
makes the folder a regular package, the only kind that an editable install's finder can import.
"""
