"""The simulator fitted to this machine and checked against the real cluster: engine step costs
(``steps``), cluster overheads (``overheads``), a trace replayed on the real cluster
(``replay``), the simulation timed as the driver times it (``driver_timed``), and the report
that puts them together (``calibrate``)."""
