"""The decoder family (Llama, Mistral, Qwen2/3, Gemma 1/2/3) and Hugging Face interop."""

from jaxdpo.models.config import ModelConfig
from jaxdpo.models.decoder import Decoder
from jaxdpo.models.hf_io import from_pretrained, load_config, save_pretrained

__all__ = ["Decoder", "ModelConfig", "from_pretrained", "load_config", "save_pretrained"]
