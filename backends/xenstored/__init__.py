"""xenstored: the configuration store as a driver domain (core, server, persistence)."""
