"""Data: a synthetic set with ground truth, ImageNet conversion, and one shard format and reader for both.

- :mod:`readout.data.format`: a sample (``jpg``/``png``, ``cls``, ``json``, ``mask.png``), ``manifest.json``.
- :mod:`readout.tools.synthetic`: shapes on clutter with boxes and masks; ``generate``, ``synthetic_batch``.
- :mod:`readout.tools.imagenet`: ILSVRC2012 folders to resumable shards.
- :mod:`readout.data.transforms`: train and eval transforms that move boxes and masks with the image.
- :mod:`readout.data.shards`: ``make_loader``; the batch format is documented there.
- :mod:`readout.data.resume`: a training epoch resumed part-way, passing over finished batches undecoded.
- :mod:`readout.data.device_decode`: JPEG batches decoded and cropped on the GPU.
"""
