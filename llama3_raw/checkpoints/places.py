"""Where checkpoints are looked for when no --ckpt-dir is given, in a clone and in an installed package alike.

In order: the folder named by the environment variable LLAMA3_RAW_WEIGHTS, ./weights/ in the working
directory, the clone's weights/ (when running from a clone), and last the small model this project trains
and ships inside the package (llama3_raw/shipped/shakespeare, also reachable as weights/shakespeare in a
clone), so that `pip install .` gives a `llama3-raw` that runs without a download.
"""

import os
from pathlib import Path

from ..errors import UserError
from .loading import is_checkpoint_dir

WEIGHTS_ENV = "LLAMA3_RAW_WEIGHTS"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
CLONE_WEIGHTS_DIR = PACKAGE_DIR.parent / "weights"  # exists in a clone; an installed package has none beside it
SHIPPED_MODEL = PACKAGE_DIR / "shipped" / "shakespeare"

DOWNLOAD_HELP = (
    "no checkpoint found in {places}; download Meta-Llama-3-8B (from llama.meta.com, or the 'original/' folder "
    "of meta-llama/Meta-Llama-3-8B on Hugging Face: consolidated.00.pth, params.json, tokenizer.model) into "
    "./weights/Meta-Llama-3-8B/ (or into a folder named by the environment variable " + WEIGHTS_ENV + "), "
    "or pass --ckpt-dir DIR."
)


def weights_places() -> list[Path]:
    """The folders searched for official checkpoints, in order, without repeats."""
    places = []
    from_env = os.environ.get(WEIGHTS_ENV)
    if from_env:
        if not Path(from_env).is_dir():
            raise UserError(f"{WEIGHTS_ENV}={from_env} is not a folder; set it to the folder that holds your "
                            f"checkpoints (or a checkpoint folder itself), or unset it.")
        places.append(Path(from_env))
    for folder in (Path("weights"), CLONE_WEIGHTS_DIR):
        if folder.is_dir() and all(folder.resolve() != place.resolve() for place in places):
            places.append(folder)
    return places


def is_shipped_model(path: Path) -> bool:
    return path.resolve() == SHIPPED_MODEL.resolve()


def official_checkpoint_in(place: Path) -> Path | None:
    """`place` itself if it is a checkpoint, else the first folder in it (or its original/ subfolder) that is."""
    if is_checkpoint_dir(place) and not is_shipped_model(place):
        return place
    for folder in sorted(place.iterdir()):
        for candidate in (folder, folder / "original"):
            if is_checkpoint_dir(candidate) and not is_shipped_model(candidate):
                return candidate
    return None


def find_default_checkpoint(places: list[Path] | None = None, shipped: Path | None = None) -> Path:
    """The first official checkpoint in `places` (default: weights_places()), else the shipped model."""
    places = weights_places() if places is None else places
    shipped = SHIPPED_MODEL if shipped is None else shipped
    for place in places:
        found = official_checkpoint_in(place)
        if found is not None:
            return found
    if is_checkpoint_dir(shipped):
        return shipped
    searched = [f"${WEIGHTS_ENV} (unset)"] if os.environ.get(WEIGHTS_ENV) is None else []
    searched += [str(place) for place in places] + [f"the shipped model's folder {shipped}"]
    raise UserError(DOWNLOAD_HELP.format(places=", ".join(searched)))
