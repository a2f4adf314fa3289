# The package's names, for type checkers and for lazy_loader (which loads each module on first use).

from .backbones import (
    PIXELS as PIXELS,
    TORCHVISION_BACKBONES as TORCHVISION_BACKBONES,
    Backbone as Backbone,
    build_backbone as build_backbone,
)
from .classifier import (
    BPNN as BPNN,
    Classifier as Classifier,
    build_model as build_model,
    count_parameters as count_parameters,
    gradcam_target_layer as gradcam_target_layer,
    pool_features as pool_features,
)
from .config import (
    BPNN_INPUT_SIZE as BPNN_INPUT_SIZE,
    DEFAULT_HIDDEN as DEFAULT_HIDDEN,
    EnsembleConfig as EnsembleConfig,
    EnsembleMember as EnsembleMember,
    ModelConfig as ModelConfig,
)
from .ensemble import (
    EnsembleClassifier as EnsembleClassifier,
    build_ensemble as build_ensemble,
)
from .fast import (
    PRECISIONS as PRECISIONS,
    CompiledClassifier as CompiledClassifier,
    FastClassifier as FastClassifier,
    Precision as Precision,
    PrecisionVerdict as PrecisionVerdict,
    bf16_supported as bf16_supported,
    bf16_verdict as bf16_verdict,
    binary_logits as binary_logits,
    use_bf16 as use_bf16,
)
from .heads import (
    linear_head as linear_head,
    mlp_head as mlp_head,
    paper_a_head as paper_a_head,
)
from .ood import (
    FeatureDensity as FeatureDensity,
    ImageStatsEnvelope as ImageStatsEnvelope,
    OODDetector as OODDetector,
)
from .weights import (
    downloads_disabled as downloads_disabled,
    read_state_dict as read_state_dict,
    torchvision_checkpoint_path as torchvision_checkpoint_path,
)
