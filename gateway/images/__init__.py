"""The image routes' pipeline: `flow` runs one request through the parts beside it."""

# The routes. Upstream each is the same path under the upstream's base_url (which ends in /v1).
EDITS_PATH = "/v1/images/edits"
GENERATIONS_PATH = "/v1/images/generations"
UPSTREAM_EDITS_PATH = EDITS_PATH.removeprefix("/v1")
UPSTREAM_GENERATIONS_PATH = GENERATIONS_PATH.removeprefix("/v1")
# Route names, for the catalog's fields that only one of them takes (`only = ["edits"]`).
EDITS, GENERATIONS = "edits", "generations"
