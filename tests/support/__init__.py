"""Test support: the fake upstream, Redis topologies, images and request helpers."""
