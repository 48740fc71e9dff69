"""The benchmark: the pipeline on Docker workers against a process-worker baseline (the same
components, each flow run a subprocess of a long-lived worker instead of a container), on a stack
of its own (stack.py), stage by stage (stages.py), from what a run leaves on the server and the
Docker engine (measure.py), into tables (report.py) and charts (charts.py). `python -m bench`."""
