"""Model loading (quantisation, LoRA, task heads), checkpoint verification and FLARE fusion."""
