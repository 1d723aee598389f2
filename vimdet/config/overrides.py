"""Clear messages for ``KEY VALUE`` config overrides that yacs cannot merge."""

from __future__ import annotations

import difflib
import re
from typing import List, Sequence

from detectron2.config import CfgNode

from vimdet.errors import same_type_error

__all__ = ["check_overrides", "explain_merge_error"]

_UNKNOWN_KEY = re.compile(r"Non-existent (?:config )?key: (\S+)")


def check_overrides(opts: Sequence[str]) -> None:
    """Raise ValueError for a command-line flag among the overrides or a key without a value."""
    flags = [item for item in opts if item.startswith("--")]
    if flags:
        raise ValueError(
            f"{flags[0]!r} comes after the KEY VALUE config overrides, so it would be read as a "
            "config key. Put command-line flags before the overrides: --config-file FILE "
            f"{' '.join(flags)} KEY VALUE ..."
        )
    if len(opts) % 2:
        raise ValueError(
            f"config overrides come in KEY VALUE pairs, and {opts[-1]!r} has no value "
            f"(overrides: {' '.join(opts)})"
        )


def _all_keys(node: CfgNode, prefix: str = "") -> List[str]:
    keys = []
    for key, value in node.items():
        keys += _all_keys(value, f"{prefix}{key}.") if isinstance(value, CfgNode) else []
        keys.append(prefix + key)
    return keys


def explain_merge_error(error: Exception, cfg: CfgNode, config_file: str) -> BaseException:
    """The error to raise for yacs's ``error``: same type, the source, and for an unknown key
    (only then) the closest existing keys."""
    text = str(error.args[0]) if error.args else str(error)
    message = f"{text} (in {config_file} or the command line)"
    unknown = _UNKNOWN_KEY.search(text)
    if unknown:
        close = difflib.get_close_matches(unknown.group(1), _all_keys(cfg), n=3, cutoff=0.75)
        message += (
            f". Did you mean {' or '.join(close)}?"
            if close
            else ". Check its spelling against vimdet/config/defaults.py and Detectron2's "
            "config/defaults.py"
        )
    return same_type_error(error, message)
