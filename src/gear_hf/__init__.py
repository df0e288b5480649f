"""gear_hf: GEAR (Guided End-to-End AutoRegression) on the Hugging Face stack."""

__version__ = "0.1.0.dev0"

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .models.configuration_gear_ar import GEARConfig
from .models.configuration_gear_tokenizer import GEARTokenizerConfig
from .models.modeling_gear_ar import GEARForCausalImageLM
from .models.modeling_gear_tokenizer import GEARTokenizerModel

AutoConfig.register("gear_tokenizer", GEARTokenizerConfig)
AutoModel.register(GEARTokenizerConfig, GEARTokenizerModel)
AutoConfig.register("gear_ar", GEARConfig)
AutoModelForCausalLM.register(GEARConfig, GEARForCausalImageLM)

from .hub import GEARHubMixin, create_model_card, push_to_hub, write_model_card  # noqa: E402
from .pipelines import GEARPipeline, GEARPipelineOutput  # noqa: E402
