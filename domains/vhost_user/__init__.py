"""vhost-user back end for real VMs: the wire codec, the protocol state machine, split
virtqueues and the INFLIGHT_SHMFD area (sans-IO), plus a thin I/O shell (``server``)."""
