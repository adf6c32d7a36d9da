"""Pure rules, in-process: no redis-server, upstream or gateway started; runs in seconds."""
