"""Cluster assembly from ClusterConfig, and the trace-driven simulator."""
