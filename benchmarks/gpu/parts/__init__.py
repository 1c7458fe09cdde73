"""The GPU check's parts, a module each (benchmarks/gpu/smoke.py runs them): ``run(spec, work, dry, rec)`` measures
into the part's Recorder, ``summary_lines(result)`` gives its lines of gpu_check.md."""
