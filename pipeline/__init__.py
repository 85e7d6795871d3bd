"""Stage one: read a dataset in its official layout, run a frozen backbone, write a feature cache.

Heavy packages (transformers, open_clip, whisper, torchvision, av) are imported lazily inside the
functions that need them, so that importing this package costs nothing.
"""
