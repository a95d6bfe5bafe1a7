"""``xdom vm-image``: build (or find) the project's VM image and say where it is."""

from __future__ import annotations

import argparse
import json

from ..exit_codes import EXIT_ERROR, EXIT_OK
from .image import ImageError, describe, ensure_image


def cmd_vm_image(args: argparse.Namespace) -> int:
    try:
        img = ensure_image(fio=args.fio, release=args.kernel_release)
    except ImageError as e:
        print(f"xdom vm-image: {e}")
        return EXIT_ERROR
    if args.print:
        print(img.kernel)
        print(img.initrd)
    elif args.json:
        print(json.dumps({"kernel": str(img.kernel), "initrd": str(img.initrd), "append": img.append(),
                          "cached": img.cached, **img.manifest}, indent=2))
    else:
        print(describe(img))
    if args.accel:
        from .accel import choose_accel
        choice = choose_accel(refresh=args.accel == "reprobe")
        print(f"accel    auto picks {choice.accel}: {choice.reason}")
    return EXIT_OK


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``vm-image`` to the ``xdom`` command's subcommands."""
    p = sub.add_parser("vm-image", help="build the VM image (kernel + initramfs) if needed and say where it is")
    p.add_argument("--print", action="store_true", help="print only the kernel and initrd paths, one a line")
    p.add_argument("--json", action="store_true", help="print paths and the build manifest as JSON")
    p.add_argument("--fio", action="store_true", help="the image with fio and its libraries (~80 MB more)")
    p.add_argument("--kernel-release", default=None,
                   help="another installed kernel (/boot/vmlinuz-RELEASE) instead of linux-image-cloud-amd64's")
    p.add_argument("--accel", nargs="?", const="show", choices=["show", "reprobe"], default=None,
                   help="also say what accel=\"auto\" picks on this host (reprobe: boot the KVM probe again)")
    p.set_defaults(func=cmd_vm_image)
