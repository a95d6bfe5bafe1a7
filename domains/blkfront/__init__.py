"""blkfront: the guest side of a Xen virtual block device."""
