# The package's names, for type checkers and for lazy_loader (which loads each module on first use).

from .clahe import (
    apply_clahe as apply_clahe,
)
from .config import (
    PreprocessConfig as PreprocessConfig,
)
from .lungs import (
    MODALITIES as MODALITIES,
    LungCrop as LungCrop,
    find_lungs as find_lungs,
    mask_outside as mask_outside,
)
from .pipeline import (
    Preprocessed as Preprocessed,
    limit_pixels as limit_pixels,
    percentile_normalize as percentile_normalize,
    preprocess as preprocess,
)
from .prepare import (
    PreparedImage as PreparedImage,
    PreparedSet as PreparedSet,
    prepare_image as prepare_image,
    prepare_manifest as prepare_manifest,
    prepare_paths as prepare_paths,
    to_model_batch as to_model_batch,
)
from .preview import (
    format_preview as format_preview,
    preview_lung_model as preview_lung_model,
    preview_sheet as preview_sheet,
)
from .transforms import (
    AUGMENT_PRESETS as AUGMENT_PRESETS,
    IMAGENET_MEAN as IMAGENET_MEAN,
    IMAGENET_STD as IMAGENET_STD,
    AugmentParams as AugmentParams,
    RandomGamma as RandomGamma,
    RandomJPEG as RandomJPEG,
    augment_params as augment_params,
    eval_transform as eval_transform,
    photometric_steps as photometric_steps,
    seeded as seeded,
    train_transform as train_transform,
)
