"""Crystal language models as transformers models (torch + transformers only; no pymatgen here).

Importing this package registers the configurations and models with the Auto classes, so that
``AutoConfig`` / ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification`` resolve
``model_type`` ``mattergpt``, ``wyckoff_gpt`` and ``crystal_mlm`` in-process; saved folders also carry the remote code
(``auto_map``) and load anywhere crystal-lm is installed with ``trust_remote_code=True``; their
``custom_pipelines`` entry makes ``pipeline("text-generation" | "fill-mask", model=folder, trust_remote_code=True)``
answer with decoded crystals (``crystal_pipelines``; with a model object, pass ``pipeline_class=``).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from modeling.configuration_crystal_mlm import CrystalMLMConfig
from modeling.configuration_mattergpt import MatterGPTConfig
from modeling.configuration_wyckoff_gpt import WyckoffGPTConfig
from modeling.crystal_pipelines import CrystalFillMaskPipeline, CrystalPipelineError, CrystalTextGenerationPipeline
from modeling.generation import GenerateNumericOutput, NumericValuesProcessor
from modeling.modeling_crystal_mlm import (
    CrystalMLMForMaskedLM,
    CrystalMLMForSequenceClassification,
    CrystalMLMModel,
    CrystalMLMPreTrainedModel,
)
from modeling.modeling_mattergpt import (
    MatterGPTForCausalLM,
    MatterGPTForSequenceClassification,
    MatterGPTModel,
    MatterGPTPreTrainedModel,
)
from modeling.modeling_wyckoff_gpt import (
    WyckoffGPTForCausalLM,
    WyckoffGPTModel,
    WyckoffGPTPreTrainedModel,
)

AutoConfig.register(MatterGPTConfig.model_type, MatterGPTConfig, exist_ok=True)
AutoModel.register(MatterGPTConfig, MatterGPTModel, exist_ok=True)
AutoModelForCausalLM.register(MatterGPTConfig, MatterGPTForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(MatterGPTConfig, MatterGPTForSequenceClassification, exist_ok=True)
AutoConfig.register(WyckoffGPTConfig.model_type, WyckoffGPTConfig, exist_ok=True)
AutoModel.register(WyckoffGPTConfig, WyckoffGPTModel, exist_ok=True)
AutoModelForCausalLM.register(WyckoffGPTConfig, WyckoffGPTForCausalLM, exist_ok=True)
AutoConfig.register(CrystalMLMConfig.model_type, CrystalMLMConfig, exist_ok=True)
AutoModel.register(CrystalMLMConfig, CrystalMLMModel, exist_ok=True)
AutoModelForMaskedLM.register(CrystalMLMConfig, CrystalMLMForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(CrystalMLMConfig, CrystalMLMForSequenceClassification, exist_ok=True)

__all__ = [
    "CrystalFillMaskPipeline",
    "CrystalMLMConfig",
    "CrystalMLMForMaskedLM",
    "CrystalMLMForSequenceClassification",
    "CrystalMLMModel",
    "CrystalMLMPreTrainedModel",
    "CrystalPipelineError",
    "CrystalTextGenerationPipeline",
    "GenerateNumericOutput",
    "MatterGPTConfig",
    "MatterGPTForCausalLM",
    "MatterGPTForSequenceClassification",
    "MatterGPTModel",
    "MatterGPTPreTrainedModel",
    "NumericValuesProcessor",
    "WyckoffGPTConfig",
    "WyckoffGPTForCausalLM",
    "WyckoffGPTModel",
    "WyckoffGPTPreTrainedModel",
]
