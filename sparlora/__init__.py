"""SPaRLoRA: spectral-phase residual LoRA initialization, and a recipe that adapts
FunASR Paraformer to Chinese dialects.

`sparlora.init` holds the math (torch only) and `sparlora.adapters` the PEFT wiring;
neither imports FunASR. The other modules make up the recipe that run.sh drives.
"""

__version__ = "0.1.0"
