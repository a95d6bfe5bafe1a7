"""An NBD server (newstyle fixed handshake) that exports a block device to real NBD clients."""
