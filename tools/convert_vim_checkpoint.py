#!/usr/bin/env python3
"""Convert a released Vim checkpoint (or a ViMDet detector's) into a trunk file for MODEL.WEIGHTS.

    python tools/convert_vim_checkpoint.py --input vim_t_midclstok_76p1acc.pth \\
        --output checkpoints/vim_t.pth [--size tiny]
    python tools/convert_vim_checkpoint.py --input output/run/model_final.pth --output trunk.pth \\
        [--keep-pyramid]

A released Vim ImageNet file: keeps every trunk tensor under ``backbone.net.`` (the detector's
names), drops ``head``, ``norm_f``, the class token and its position row, and keeps the 14x14
position grid (resized to each input's token grid at run time). A ViMDet training checkpoint:
keeps its ``backbone.net.*`` tensors (the trunk; with ``--keep-pyramid`` all of ``backbone.*``,
trunk and pyramid) and drops the RPN, the ROI heads and the trainer's state, so that it can start
another detector as an ImageNet trunk does. Prints what it kept and dropped.

The input is read with ``weights_only=True`` (a file that would run code is refused), the output
may not be the input (in any spelling: symlink, hard link), and it is written atomically.
"""

import argparse
import os
import sys
from collections import Counter

from vimdet.checkpoint import load_checkpoint_file
from vimdet.checkpoint.io import READ_ERRORS, atomic_save
from vimdet.modeling import TRUNK_PREFIX, VIM_SIZES, convert_vim_state_dict, trunk_tensors


def same_file(first: str, second: str) -> bool:
    """True if both paths name one file (same path, a symlink or a hard link to it)."""
    if os.path.exists(first) and os.path.exists(second):
        return os.path.samefile(first, second)
    return os.path.realpath(first) == os.path.realpath(second)


def detector_backbone(state, expected_dim, keep_pyramid):
    """The trunk of a ViMDet detector's state dict (the trunk's own names), its pyramid's tensors
    if ``keep_pyramid`` (the detector's names), and the ``kept``/``dropped`` report."""
    trunk = trunk_tensors(state)
    if "patch_embed.proj.weight" not in trunk:
        raise ValueError(
            f"the checkpoint has {TRUNK_PREFIX}* tensors but no {TRUNK_PREFIX}patch_embed: it is "
            "not a ViMDet detector's checkpoint"
        )
    width = trunk["patch_embed.proj.weight"].shape[0]
    if expected_dim is not None and width != expected_dim:
        raise ValueError(f"the detector's trunk is {width} wide, not {expected_dim} as --size asks")
    pyramid = {
        key: value
        for key, value in state.items()
        if keep_pyramid and key.startswith("backbone.") and not key.startswith(TRUNK_PREFIX)
    }
    counts = Counter(
        key.split(".")[0]
        for key in state
        if not key.startswith(TRUNK_PREFIX) and key not in pyramid
    )
    names = {"backbone": "backbone.* (the pyramid)"}
    dropped = [f"{names.get(g, g + '.*')}: {n} tensors" for g, n in sorted(counts.items())]
    return trunk, pyramid, {"kept": list(trunk) + list(pyramid), "dropped": dropped}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="released Vim .pth file")
    parser.add_argument("--output", required=True, help="where to write the converted .pth")
    parser.add_argument(
        "--size",
        choices=sorted(VIM_SIZES),
        default=None,
        help="refuse a checkpoint whose width is not this Vim size's",
    )
    parser.add_argument(
        "--keep-pyramid",
        action="store_true",
        help="from a ViMDet detector checkpoint, keep the pyramid (backbone.*) with the trunk",
    )
    args = parser.parse_args(argv)

    expected_dim = VIM_SIZES[args.size]["embed_dim"] if args.size else None
    if same_file(args.input, args.output):
        print(
            f"convert_vim_checkpoint: --output {args.output!r} is the --input file; writing it "
            "would destroy the released checkpoint. Choose another --output path",
            file=sys.stderr,
        )
        return 1
    try:
        state = load_checkpoint_file(args.input)
        if any(key.startswith(TRUNK_PREFIX) for key in state):
            trunk, pyramid, report = detector_backbone(state, expected_dim, args.keep_pyramid)
        elif args.keep_pyramid:
            raise ValueError(
                f"--keep-pyramid: {args.input!r} is a released Vim file, which has no pyramid; "
                "give a ViMDet detector checkpoint (model_final.pth), or leave the flag out"
            )
        else:
            trunk, report = convert_vim_state_dict(state, expected_dim=expected_dim)
            pyramid = {}
    except READ_ERRORS as error:
        print(f"convert_vim_checkpoint: {error}", file=sys.stderr)
        return 1
    width = trunk["patch_embed.proj.weight"].shape[0]
    depth = len({key.split(".")[1] for key in trunk if key.startswith("layers.")})
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    atomic_save(
        {
            "model": {**{TRUNK_PREFIX + key: v for key, v in trunk.items()}, **pyramid},
            "__author__": "vimdet",
            "matching_heuristics": False,
        },
        args.output,
    )
    print(
        f"Vim trunk: width {width}, {depth} blocks, position grid {tuple(trunk['pos_embed'].shape)}"
    )
    kept_as = f"{TRUNK_PREFIX}*" + (", the pyramid as backbone.*" if pyramid else "")
    print(f"kept {len(report['kept'])} tensors (the trunk as {kept_as})")
    print(f"dropped {len(report['dropped'])}: {', '.join(report['dropped'])}")
    print(f"wrote {args.output}; use it as MODEL.WEIGHTS {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
