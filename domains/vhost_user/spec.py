"""The numbers of the vhost-user specification: request ids both ways, and feature bits.

They are the vocabulary the codec (``wire``), the back end and the tests
share, and nothing else: which requests we answer and which features we
offer is the back end's business.  Where they come from: QEMU's
``docs/interop/vhost-user.rst`` ("Front-end message types", "Back-end
message types", "Protocol features") and, for the transport's virtio bits,
the virtio 1.x specification ("Reserved Feature Bits").
"""

from __future__ import annotations

import enum

__all__ = ["Request", "BackendRequest", "ProtocolFeature", "VhostFeature"]


class Request(enum.IntEnum):
    """Front-end -> back-end requests (``VhostUserRequest``); the spec's ids."""
    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21      # formerly SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41


class BackendRequest(enum.IntEnum):
    """Back-end -> front-end requests on the optional back-end channel (not offered yet)."""
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of the protocol feature word (``VHOST_USER_PROTOCOL_F_*``)."""
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18


class VhostFeature(enum.IntEnum):
    """Bit numbers of the virtio/vhost feature word that the transport (not the device) owns."""
    NOTIFY_ON_EMPTY = 24
    LOG_ALL = 26                  # VHOST_F_LOG_ALL
    RING_INDIRECT_DESC = 28       # VIRTIO_RING_F_INDIRECT_DESC
    RING_EVENT_IDX = 29           # VIRTIO_RING_F_EVENT_IDX
    PROTOCOL_FEATURES = 30        # VHOST_USER_F_PROTOCOL_FEATURES (the reserved "UNUSED" bit)
    VERSION_1 = 32                # VIRTIO_F_VERSION_1
    ACCESS_PLATFORM = 33          # VIRTIO_F_ACCESS_PLATFORM (IOMMU)
    RING_PACKED = 34
    IN_ORDER = 35
