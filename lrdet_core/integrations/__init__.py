"""Thin layers that plug LRDet into training frameworks' own entry points.

Each module here imports its framework and nothing else of it leaks into the core: ``import lrdet_core`` imports
none of them.

* :mod:`lrdet_core.integrations.ultralytics`: ``YOLO(...).train(trainer=lrdet_trainer(...))``.
"""
