"""Through the gateway: real gateway processes, the fake upstream, the SDKs and raw HTTP."""
