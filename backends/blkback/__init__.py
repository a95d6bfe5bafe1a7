"""blkback: the block driver domain (Linux xen-blkback's protocol, in a process of its own)."""
