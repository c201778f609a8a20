"""Instruments for testing the GPU program where no GPU is: used by the test suite and by the
GPU check (benchmarks/gpu_check.py), never by training itself."""
