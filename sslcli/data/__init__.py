"""Images in, views out: every concept of the data pipeline in its own module.

- :mod:`~sslcli.data.datasets`: a data spec (``digits``, ``DIR``, ``FORMAT:DIR``) → the
  dataset of a split (:func:`~sslcli.data.datasets.open_dataset`), format detection;
- :mod:`~sslcli.data.images`: the dataset classes (arrays in memory, lazily decoded files,
  labelled subsets); :mod:`~sslcli.data.formats`: the binary formats' readers (CIFAR,
  STL-10, IDX); :mod:`~sslcli.data.decode`: one image file → a uint8 square;
- :mod:`~sslcli.data.badfiles`: unreadable files (warning, shared mask, substitute,
  ``max_bad_fraction``), the one home of those rules for every reader;
- :mod:`~sslcli.data.views`: :class:`~sslcli.data.views.ViewSpec` and the published
  augmentations as named presets;
- :mod:`~sslcli.data.crops`: training crops cut from the original image in the workers;
  :mod:`~sslcli.data.gpu_decode`: JPEG decoding on the training device;
- :mod:`~sslcli.data.augment`: the batched view pipeline, from the per-sample ops of
  :mod:`~sslcli.data.geometric` (crop, flip), :mod:`~sslcli.data.photometric` (colour,
  blur, solarize, normalise) and the draws of :mod:`~sslcli.data.sampling`;
- :mod:`~sslcli.data.loader`: batches onto the device ahead of the step
  (:class:`~sslcli.data.loader.DevicePrefetcher`); :mod:`~sslcli.data.cache`: small
  datasets decoded once and held on the device.
"""
