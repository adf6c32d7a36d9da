"""Process health shared by the server and the app: set when SIGTERM starts a graceful drain."""

draining = False
