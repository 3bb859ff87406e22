"""Test and benchmark helpers shared by tests/, benchmarks/ and scripts/: an independent
checker of the method's invariants (`invariants`), a scripted language model whose next-token
distributions are known (`scripted_lm`), and synthetic rollouts at any size (`synthetic`).
Installed with the project, so nothing needs a `sys.path` insert."""
