"""Evaluation suite: LongBench / RULER metrics (:mod:`caote.eval.metrics`) and the LongBench
loader and prompt builder (:mod:`caote.eval.longbench`)."""
