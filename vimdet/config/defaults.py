"""ViMDet's config keys, added to a Detectron2 config by :func:`add_vimdet_config`."""

from detectron2.config import CfgNode as CN

__all__ = ["add_vimdet_config"]


def add_vimdet_config(cfg: CN) -> None:
    """Add ViMDet's keys (``MODEL.VIM``, ``MODEL.VIM_FPN``, solver extras) to ``cfg`` in place."""
    cfg.MODEL.VIM = CN()
    # Width and depth have one source. SIZE names a published Vim ("tiny" 192 wide, "small" 384,
    # "base" 768, all 24 blocks deep) and EMBED_DIM/DEPTH then stay 0; or SIZE is "custom" and
    # EMBED_DIM and DEPTH (both > 0) give them. Anything else is an error naming the conflict.
    cfg.MODEL.VIM.SIZE = "tiny"
    # Embedding width, with SIZE "custom" only (e.g. test-sized models); 0 otherwise.
    cfg.MODEL.VIM.EMBED_DIM = 0
    # Number of Vim blocks, with SIZE "custom" only; 0 otherwise.
    cfg.MODEL.VIM.DEPTH = 0
    # Patch size and stride of the patch embedding, in pixels.
    cfg.MODEL.VIM.PATCH_SIZE = 16
    # Image size the position grid was trained at (224 -> a 14x14 grid, as released); the grid is
    # resized bicubically to each input's own token grid.
    cfg.MODEL.VIM.PRETRAIN_IMG_SIZE = 224
    # SSM state size N per channel.
    cfg.MODEL.VIM.D_STATE = 16
    # Kernel size of the causal depthwise conv1d in the mixer.
    cfg.MODEL.VIM.D_CONV = 4
    # Inner width of the mixer as a multiple of the embedding width.
    cfg.MODEL.VIM.EXPAND = 2
    # Rank of the delta projection; 0 means ceil(embed_dim / 16) as in Mamba.
    cfg.MODEL.VIM.DT_RANK = 0
    # Highest stochastic-depth rate; block i > 0 gets linspace(0, rate, depth)[i - 1].
    cfg.MODEL.VIM.DROP_PATH_RATE = 0.1
    # Selective-scan backend: "auto" (ViMDet's Triton scan on a GPU, chunked on the CPU),
    # "triton", "cuda" (mamba-ssm's kernel), "chunked" or "reference". $VIMDET_SCAN_BACKEND
    # overrides "auto". "triton" also runs the blocks' and the pyramid's norms as Triton kernels;
    # the others run them as PyTorch ops.
    cfg.MODEL.VIM.SCAN_BACKEND = "auto"
    # Recompute each block in the backward pass (activation checkpointing) to save memory.
    cfg.MODEL.VIM.USE_CHECKPOINT = False
    # Walks of the Mamba blocks over the token grid (docs/trunk_options.md): "row" (Vim's),
    # "row_column" (blocks alternate row- and column-major walks; same parameters as Vim) or
    # "cross" (every block walks rows and columns both ways and averages: VMamba's cross-scan).
    cfg.MODEL.VIM.SCAN_ROUTES = "row"
    # 1-based blocks that use global multi-head self-attention instead of the Mamba mixer
    # (MambaVision's late blocks), e.g. [21, 22, 23, 24]; [] for none.
    cfg.MODEL.VIM.ATTENTION_BLOCKS = []
    # Heads of those attention blocks; 0 means embed width // 64 (3 for Vim-T); must divide it.
    cfg.MODEL.VIM.ATTENTION_HEADS = 0
    # Retired: must stay "". Models no longer load weights when built; give a released Vim file
    # (or a converted one) as MODEL.WEIGHTS, which the checkpointer converts. Kept so that old
    # configs fail with that advice instead of an unknown-key error.
    cfg.MODEL.VIM.PRETRAINED = ""
    # Accept MODEL.WEIGHTS that cover the trunk only in part (missing or extra Vim blocks, no
    # trunk at all); False makes such a checkpoint an error that lists what is missing or extra.
    cfg.MODEL.VIM.ALLOW_PARTIAL_WEIGHTS = False

    cfg.MODEL.VIM_FPN = CN()
    # 1-based Vim blocks whose output stream feeds the pyramid, one per level. The only source
    # of the taps: the backbone builder makes the trunk return exactly these blocks.
    cfg.MODEL.VIM_FPN.IN_BLOCKS = [6, 12, 18, 24]
    # Output stride of the level fed by each of IN_BLOCKS (powers of 2; the trunk is stride 16).
    cfg.MODEL.VIM_FPN.STRIDES = [4, 8, 16, 32]
    # Channels of every pyramid level.
    cfg.MODEL.VIM_FPN.OUT_CHANNELS = 256
    # Norm of the pyramid's convs: "LN" (channel LayerNorm, as ViTDet), "GN", "" for none.
    cfg.MODEL.VIM_FPN.NORM = "LN"
    # Add a level at twice the coarsest stride by max-pooling it (p6 for RPN anchors).
    cfg.MODEL.VIM_FPN.TOP_BLOCK = True
    # Pad every batch to this square size (ViTDet's LSJ style); 0 pads only to divisibility.
    cfg.MODEL.VIM_FPN.SQUARE_PAD = 0
    # On a GPU, replay the backbone's forward and backward as CUDA graphs (one per input shape
    # and mode, at most this many; new shapes past it run eagerly): removes the host's launch
    # time, which bounds ViMDet's step on a slow host. 0 runs eagerly. Pair it with SQUARE_PAD.
    cfg.MODEL.VIM_FPN.CUDA_GRAPHS = 0

    # Training images that may fail to decode mid-run (each is skipped with a warning naming it
    # and counted); one more stops the run. Images are also header-checked before training.
    cfg.DATALOADER.MAX_BAD_IMAGES = 10

    # Optimizer for the detector: "ADAMW" (ViTDet's recipe) or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Adam betas.
    cfg.SOLVER.BETAS = (0.9, 0.999)
    # Layer-wise learning-rate decay over the Vim blocks (1.0 disables it).
    cfg.SOLVER.LAYER_DECAY = 0.75
    # Mixed-precision dtype when SOLVER.AMP.ENABLED: "bfloat16" or "float16".
    cfg.SOLVER.AMP.DTYPE = "bfloat16"

    # Number of test images drawn (predictions beside ground truth) into OUTPUT_DIR/predictions
    # as PNGs after training; 0 draws none.
    cfg.TEST.VIS_NUM_IMAGES = 8
    # Score threshold for the boxes drawn in those PNGs.
    cfg.TEST.VIS_SCORE_THRESH = 0.5
    # Before training (from iteration 0 only), COCO-evaluate the untrained model on the first
    # test set too, and print its AP beside the trained model's in the end-of-run summary.
    cfg.TEST.EVAL_UNTRAINED = False
