"""Training a small Llama 3 from scratch with the same functional `forward` that inference runs.

recipe.py      a recipe JSON: model shape, tokenizer size, data, optimiser settings
bpe.py         learning the byte-level BPE tokenizer (Meta's tokenizer.model format)
data.py        the character split into train / validation, encoded once and cached
objective.py   initial weights, batches, the loss, the learning-rate schedule, validation
dropout.py     dropout with masks drawn per row of the global batch (a recipe option, training only)
data_parallel.py  the ranks' shares of each global batch, gradients summed over them (torchrun)
evaluation.py  validation loss and a sample at every evaluation; bf16 autocast on CUDA
loop.py        set-up/resume, one step, evaluate and export: `train(recipe, out_dir)`
state.py       the resumable state and the JSONL log on disk
export.py      the weights in Meta's checkpoint format; loss_curve.py the PNG
"""

from .loop import train
from .stops import TrainingStop
from .recipe import DEFAULT_RECIPE, Recipe, TrainSettings, load_recipe

__all__ = ["DEFAULT_RECIPE", "Recipe", "TrainSettings", "TrainingStop", "load_recipe", "train"]
