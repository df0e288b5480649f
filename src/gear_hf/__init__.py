"""gear_hf: GEAR (Guided End-to-End AutoRegression) on the Hugging Face stack."""

from .version import __version__

from .compatibility import warn_if_unsupported

warn_if_unsupported()  # before the imports below, which are the first to break on an unsupported version

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402

from .models.configuration_gear_ar import GEARConfig  # noqa: E402
from .models.configuration_gear_tokenizer import GEARTokenizerConfig  # noqa: E402
from .models.modeling_gear_ar import GEARForCausalImageLM  # noqa: E402
from .models.modeling_gear_tokenizer import GEARTokenizerModel  # noqa: E402

AutoConfig.register("gear_tokenizer", GEARTokenizerConfig)
AutoModel.register(GEARTokenizerConfig, GEARTokenizerModel)
AutoConfig.register("gear_ar", GEARConfig)
AutoModelForCausalLM.register(GEARConfig, GEARForCausalImageLM)

from .hub import GEARHubMixin, create_model_card, push_to_hub, write_model_card  # noqa: E402
from .pipelines import GEARPipeline, GEARPipelineOutput  # noqa: E402
