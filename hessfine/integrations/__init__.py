"""Training callbacks that measure the Hessian distance measure while a model trains.

- :mod:`hessfine.integrations.transformers`: ``HessianMeasureCallback`` for transformers'
  ``Trainer`` (``pip install 'hessfine[transformers]'``);
- :mod:`hessfine.integrations.lightning`: ``HessianMeasureCallback`` for Lightning
  (``pip install 'hessfine[lightning]'``).

Each measures the model at each evaluation on fixed, seeded samples of the training and
evaluation data against the weights when training began (a PeftModel: its base), logs the
bounds, the measured gap and the sums over the layers through the framework's own logging, and
writes ``measurement.json`` files that ``hessfine compare`` reads. Importing this package imports
neither framework; each module imports its own.
"""
