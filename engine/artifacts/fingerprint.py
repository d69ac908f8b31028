"""Fingerprints: the settings and inputs an artifact depends on, and the check a resume makes.

A fingerprint is a plain JSON-able dict. Its digest (16 hex digits of SHA-256 over the canonical
JSON) names it in downstream fingerprints, so a set made from a retrained teacher no longer
matches, and neither does a student trained on that set.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

log = logging.getLogger("scdd.artifacts")


def canonical(obj: Any) -> Any:
    """JSON-able form: dataclasses -> dicts, tuples -> lists, paths -> str, numpy scalars -> Python."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


def digest(fingerprint: Any) -> str:
    text = json.dumps(canonical(fingerprint), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(saved: Any, wanted: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, wanted value) for every leaf that differs."""
    saved, wanted = canonical(saved), canonical(wanted)
    if isinstance(saved, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(saved) | set(wanted)):
            name = f"{prefix}.{key}" if prefix else key
            if key not in saved or key not in wanted:
                out.append((name, saved.get(key, "<absent>"), wanted.get(key, "<absent>")))
            else:
                out.extend(differences(saved[key], wanted[key], name))
        return out
    return [] if saved == wanted else [(prefix or "<value>", saved, wanted)]


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


class StaleArtifact(ConfigError):
    """An artifact on disk was made with other settings than the run asks for."""


def require_match(path: Path, saved: Any, wanted: Any, what: str) -> None:
    """Refuse to reuse ``path`` when its fingerprint differs from the wanted one (resume=true)."""
    if saved is None:
        raise StaleArtifact(f"{what} {path} has no fingerprint (written by an older version); delete it "
                            f"to recompute it, or start a new run (new hydra.run.dir, or resume=false)")
    diffs = differences(saved, wanted)
    if not diffs:
        return
    shown = ", ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in diffs[:4])
    more = f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""
    raise StaleArtifact(f"{what} {path} was made with other settings ({shown}{more}); delete it to recompute "
                        f"it, or rerun with the settings it was made with, or start over (resume=false or "
                        f"a new hydra.run.dir)")


def announce_overwrite(path: Path, what: str) -> None:
    """resume=false over existing outputs: say so, never overwrite silently."""
    log.warning("resume=false: replacing the existing %s at %s", what, path)
    print(f"scdd: resume=false: replacing the existing {what} at {path}")
