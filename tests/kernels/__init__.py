"""Tests of the Triton kernels in fasttangent.kernels (run in the interpreter)."""
