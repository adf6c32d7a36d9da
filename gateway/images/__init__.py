"""The image routes' pipeline: `flow` runs one request through the parts beside it."""

# The edit route. Upstream it is the same path under the upstream's base_url (which ends in /v1).
EDITS_PATH = "/v1/images/edits"
UPSTREAM_EDITS_PATH = EDITS_PATH.removeprefix("/v1")
