"""Benchmarks behind `vmlab bench ...` (boot.py: boot and restore; vnet.py: vnet forwarding and
guest TCP). They print figures and never assert on time."""
