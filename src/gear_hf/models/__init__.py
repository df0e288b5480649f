from .configuration_gear_ar import LLAMAGEN_PRESETS, GEARConfig
from .configuration_gear_tokenizer import GEARTokenizerConfig
from .modeling_gear_ar import (
    GEARCausalImageLMOutput,
    GEARForCausalImageLM,
    GEARKVCache,
    GEARPreTrainedModel,
)
from .modeling_gear_tokenizer import (
    GEARTokenizerEncoderOutput,
    GEARTokenizerModel,
    GEARTokenizerOutput,
    GEARTokenizerPreTrainedModel,
)
from .quantizers import entropy_loss, hard_readout, soft_embed, soft_readout
