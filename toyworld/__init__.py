"""The toy world: a procedural image world, a small base model trained on it, and scorers.

``world`` draws the images and captions, ``analyse`` reads them back (attribute analyser
and concept detector), ``model`` loads the committed base model (``--base-model toy``), and
``train`` is the script that trained it.
"""
