"""Fast tests of one layer at a time: no network, no server; at most a bare database."""
