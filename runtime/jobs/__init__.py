"""Batch jobs over image data sets, for the second kind of user (robust training and evaluation):
``augment`` writes adversarial variants, ``robustness`` measures accuracy under attack. Both read data
sets through :mod:`.datasets` and run on :mod:`.parallel`'s process pool or on Ray (:mod:`.ray_engine`).
"""
