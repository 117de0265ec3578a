"""Triton kernels of lowrank, installed as `lowrank.kernels`."""
