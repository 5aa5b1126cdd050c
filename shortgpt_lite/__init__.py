"""shortgpt-lite: depth pruning of LLMs by Block Influence (ShortGPT), with the baselines it
is compared against, small enough to read in one sitting.

The public names a notebook imports live here.
"""

from .data import (
    BENCHMARKS,
    CORPORA,
    Item,
    corpus_documents,
    load_benchmark,
    load_text,
    token_windows,
)
from .models import BUNDLED_MODELS, cache_dir, load_model, pick_device

# Core: layers, Block Influence, importance metrics, removal
from .hooks import (
    LayerStatistics,
    angular_distance,
    block_influence,
    layer_similarity,
    layer_statistics,
)
from .importance import METRICS, layer_importance, layers_to_remove, skip_layer
from .layers import decoder_layers
from .removal import remove_layers

# Evaluation and cost
from .evaluate import (
    DEFAULT_SUITE,
    GENERATION_PROMPTS,
    binomial_ci,
    cost,
    evaluate_choices,
    evaluate_suite,
    generation_samples,
    loglikelihoods,
    perplexity,
    score_items,
    text_perplexity,
)

__version__ = "0.1.0"
