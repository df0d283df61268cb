"""The trace simulator: Mooncake-format traces, a roofline of GPU instances, a discrete-event
loop that drives the very policy objects the conductor runs, and its results.

It never imports Ray: a scheduling study runs in seconds on a laptop. ``sim/calibration/`` fits
it to the real engine and compares it with a real replay (that part starts a local Ray cluster).
"""
