"""MERT feature extractors on top of :mod:`mert_plugin`.

* :mod:`extractors.export_onnx` -- ``mert-export-onnx``: a fixed-window ONNX graph plus
  Essentia-style JSON metadata, gated on onnxruntime/PyTorch parity.
* :mod:`extractors.onnx_model` -- run such a graph with onnxruntime and stitch windows.
* :mod:`extractors.essentia` -- ``OnnxPredictMERT``, an Essentia-style algorithm
  (also reachable as ``essentia.standard.OnnxPredictMERT`` once imported).
* :mod:`extractors.hear` -- the HEAR benchmark API (``load_model``,
  ``get_scene_embeddings``, ``get_timestamp_embeddings``).
* :mod:`extractors.cli` -- ``mert-extract``: resumable batch extraction to ``.npy``.

Submodules import their optional dependencies (onnxruntime, essentia) lazily,
so importing this package costs nothing.
"""
