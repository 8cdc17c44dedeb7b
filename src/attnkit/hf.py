"""`attnkit.hf`: the Hugging Face transformers namespace (importing it registers "attnkit").

    import attnkit.hf
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnkit")
    attnkit.hf.use(model, method="moba", topk=8)
"""

from .integrations.hf_attention import (NAME, HFMethod, attention_forward, attention_modules, aux_losses, mask_interface,
                                       register, use)

__all__ = ["NAME", "HFMethod", "attention_forward", "attention_modules", "aux_losses", "mask_interface", "register", "use"]
from .integrations.hf_kv import kv_policy  # noqa: E402,F401  (attnkit.kv policies in generate)
