"""The LLM half of EasyGen (paper Sec. 3.2-3.3): the projector joining BiDiffuser's features to the LLM,
the decoder-only (Vicuna/Llama) and FlanT5 models around it, LoRA, the conversation templates, the
tokenizers and the collators. `easygen.bidiffuser` is the other half."""
