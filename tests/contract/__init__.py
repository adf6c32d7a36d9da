"""The quota store on every topology (in-process, Redis, Cluster, Sentinel) and the upstream
transport against loopback servers: the contracts the gateway is built on."""
