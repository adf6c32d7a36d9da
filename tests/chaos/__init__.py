"""Faults: processes killed, Redis away or slow, upstream faults, hostile clients."""
