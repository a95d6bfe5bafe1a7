"""xen/include/public/grant_table.h: grant_entry_v1, GTF_* flags, GNTST_* codes.

A v1 grant entry is 8 bytes: ``flags`` (u16), ``domid`` (u16), ``frame``
(u32), little-endian on x86.  The granter writes domid and frame first and
flags last, so a reader that sees GTF_permit_access sees a complete entry.
"""

from __future__ import annotations

import struct
from typing import Final

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT

GRANT_ENTRY_V1: Final = struct.Struct("<HHI")
GRANT_ENTRY_V1_SIZE: Final = GRANT_ENTRY_V1.size  # 8
ENTRIES_PER_FRAME: Final = PAGE_SIZE // GRANT_ENTRY_V1_SIZE  # 512

# grant_entry_v1.flags, type field (bits 0-1)
GTF_invalid: Final = 0
GTF_permit_access: Final = 1
GTF_accept_transfer: Final = 2
GTF_transitive: Final = 3
GTF_type_mask: Final = 3
# subflags
GTF_readonly: Final = 1 << 2
GTF_reading: Final = 1 << 3
GTF_writing: Final = 1 << 4
GTF_PWT: Final = 1 << 5
GTF_PCD: Final = 1 << 6
GTF_PAT: Final = 1 << 7
GTF_sub_page: Final = 1 << 8

# xdom's extension, not Xen's ABI (bits 9-15 of a v1 entry's flags are unused
# by Xen and the table is shared by the granter and the broker only): the
# broker sets this bit when it maps the entry's frame for a grantee, and never
# clears it.  A grantee may keep a mapped frame in ways no hypervisor outside
# its address space can see (a forked child, a descriptor in flight in a
# socket, a page spliced into a pipe), so a granter that ends access to an
# entry with this bit set takes a fresh frame for that gfn from the broker
# (replace_frames) before it reuses the page.
XDOM_GTF_mapped: Final = 1 << 15

# GNTMAP_* flags of gnttab_map_grant_ref
GNTMAP_device_map: Final = 1 << 0
GNTMAP_host_map: Final = 1 << 1
GNTMAP_readonly: Final = 1 << 2
GNTMAP_application_map: Final = 1 << 3
GNTMAP_contains_pte: Final = 1 << 4

# GNTCOPY_* flags of gnttab_copy
GNTCOPY_source_gref: Final = 1 << 0
GNTCOPY_dest_gref: Final = 1 << 1

# struct gnttab_copy on x86_64, 40 bytes: source and dest are each a
# gnttab_copy_ptr (union {grant_ref_t ref; xen_pfn_t gmfn} u -- 8 bytes, a
# ref in the low 4 --, domid_t domid, uint16_t offset, 4 bytes of padding),
# then uint16_t len, uint16_t flags, int16_t status and 2 bytes of padding.
# GNTTABOP_copy's argument is an array of them; a side flagged as a grant
# reads u.ref only (GNTTAB_COPY_REF_MASK), as Xen does.
GNTTAB_COPY: Final = struct.Struct("<QHH4xQHH4xHHh2x")
GNTTAB_COPY_REF_MASK: Final = 0xFFFFFFFF

# enum grant_status
GNTST_okay: Final = 0
GNTST_general_error: Final = -1
GNTST_bad_domain: Final = -2
GNTST_bad_gntref: Final = -3
GNTST_bad_handle: Final = -4
GNTST_bad_virt_addr: Final = -5
GNTST_bad_dev_addr: Final = -6
GNTST_no_device_space: Final = -7
GNTST_permission_denied: Final = -8
GNTST_bad_page: Final = -9
GNTST_bad_copy_arg: Final = -10
GNTST_address_too_big: Final = -11
GNTST_eagain: Final = -12
GNTST_no_space: Final = -13

GNTST_NAMES: Final = {
    GNTST_okay: "okay",
    GNTST_general_error: "general error",
    GNTST_bad_domain: "invalid domain",
    GNTST_bad_gntref: "invalid grant reference",
    GNTST_bad_handle: "invalid mapping handle",
    GNTST_bad_virt_addr: "invalid virtual address",
    GNTST_bad_dev_addr: "invalid device address",
    GNTST_no_device_space: "no spare translation slot in the I/O MMU",
    GNTST_permission_denied: "permission denied",
    GNTST_bad_page: "bad page",
    GNTST_bad_copy_arg: "copy arguments cross page boundary",
    GNTST_address_too_big: "page address size too large",
    GNTST_eagain: "operation not done; try again",
    GNTST_no_space: "out of space",
}

# The first reserved references (xen/include/public/grant_table.h):
# GNTTAB_RESERVED_CONSOLE 0, GNTTAB_RESERVED_XENSTORE 1.
GNTTAB_RESERVED_CONSOLE: Final = 0
GNTTAB_RESERVED_XENSTORE: Final = 1
GNTTAB_NR_RESERVED_ENTRIES: Final = 8
