"""Managing the gateway's own keys: the operations (`ops`), over HTTP for operators' tools
(`http`, /admin/keys) and on the command line (`cli`, `gateway keys ...`)."""
