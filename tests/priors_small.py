"""Scaled-down configs of the real SD v1.5 / DiT classes for the fast tier (same block types, smaller widths)."""

from engine.priors.dit import DIT_XL2_256, SD_VAE_FT_MSE
from engine.priors.sd15 import SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE

SMALL_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, sample_size=32)
SD15_SMALL = dict(
    vae={**SD15_VAE, **SMALL_VAE},
    unet={**SD15_UNET, "sample_size": 16, "block_out_channels": (16, 32), "layers_per_block": 1,
          "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
          "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32, "attention_head_dim": 4,
          "norm_num_groups": 4},
    text_encoder={**SD15_TEXT_ENCODER, "vocab_size": 514, "hidden_size": 32, "intermediate_size": 37,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 32},
)
DIT_SMALL = dict(
    vae={**SD_VAE_FT_MSE, **SMALL_VAE},
    transformer={**DIT_XL2_256, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "sample_size": 16},
)
