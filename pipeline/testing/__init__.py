"""Test and benchmark helpers that ship with the package (so ``python -m pipeline.bench_*``
can use them as well as ``tests/``); nothing in the data path imports them."""
