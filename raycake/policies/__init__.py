"""Pure-Python decisions (no torch, no Ray): eviction, scheduling, routing, speculation.

Each policy is a small class behind a ``typing.Protocol``, chosen by name in config, so the
simulator and the real cluster run the very same objects.
"""
