"""Triton kernels"""
