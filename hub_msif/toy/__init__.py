"""Toy worlds for the demo, tests and benchmarks: tiny models and tokenizers, the fact world."""
