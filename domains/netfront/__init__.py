"""netfront: the guest side of a Xen virtual network interface, exposed as a TAP device."""
