"""Our distilled sets in the layout other engines publish: `python -m engine.interop export SET OUT`.

SRe2L, CDA, SC-DD (the authors' scripts) and RDED publish sets as ``new000/class000_id000.jpg, ...``
(engine.artifacts.reference_layout). ``export`` writes one of ours that way, so their training scripts
(torchvision ImageFolder) read it. The reverse, evaluating a released set beside ours with the same
teacher and student recipe, is one `scdd` run: ``scdd stage=evaluate evaluate.external_sets={name:/path}``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.artifacts.reference_layout import export_set
from engine.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.interop", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a distilled set as newNNN/classNNN_idNNN files")
    export.add_argument("set", type=Path, help="a distilled set folder, e.g. <run>/recover/ssl-noise")
    export.add_argument("out", type=Path, help="a new (or empty) folder for the reference layout")
    export.add_argument("--format", choices=("png", "jpeg"), default=None,
                        help="re-encode as png or jpeg; default: the set's own format, files copied byte for "
                             "byte (a PNG set keeps its exact pixels)")
    export.add_argument("--quality", type=int, default=95,
                        help="JPEG quality (90-100) when converting to jpeg; 4:4:4 chroma. The reference scripts "
                             "save with PIL's default (quality 75, 4:2:0)")
    args = parser.parse_args(argv)
    try:
        record = export_set(args.set, args.out, args.format, args.quality)
    except ConfigError as exc:
        print(f"interop: error: {exc}", file=sys.stderr)
        return 2
    how = "copied as stored" if record["copied"] else "re-encoded"
    quality = f" (quality {record['jpeg_quality']})" if record["jpeg_quality"] else ""
    print(f"exported {record['images']} images of {record['num_classes']} classes to {args.out}: "
          f"{record['image_format']}{quality}, {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
