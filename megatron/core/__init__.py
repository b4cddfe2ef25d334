"""Parallel runtime: process groups and collectives; knows nothing about BLOOM."""
