"""The real Ray cluster: its configuration, the driver that assembles named actors and runs each
request with retries, and the demo workload."""
