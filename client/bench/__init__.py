"""``cellserve bench``: load generator, same-run baselines (echo, naive stateless, raw ORT), report."""
