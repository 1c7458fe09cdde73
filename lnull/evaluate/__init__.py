"""Evaluation: the `evaluate` stage (``stage.py``), the scorer registry (``base.py``: ``Scorer`` and
``EvalContext``; ``registry.py``: finding a kind's scorer and checking an ``eval`` section) and one module per
benchmark kind (``harness.py``, ``likelihood.py``, ``heldout.py``, ``math.py``, ``code.py``, ``mtbench.py``,
``qa.py``), with the engines they generate through (``generate.py``, ``vllm_engine.py``) and the sandbox code
benchmarks run in (``sandbox.py``).

What other modules read of a run's records is re-exported here: :func:`expected_records` (a run's record keys
per benchmark, e.g. for tables), :func:`record_key` and :func:`scored_key`.
"""
from lnull.evaluate.stage import expected_records, record_key, scored_key

__all__ = ["expected_records", "record_key", "scored_key"]
