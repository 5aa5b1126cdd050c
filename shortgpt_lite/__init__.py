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
from .removal import removal_curve, remove_layers

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

# Baselines: Wanda, magnitude, context pruning, comparison
from .compare import DEFAULT_CORPORA, METHODS, compare, prune_to_budget
from .context import (
    DOMAINS,
    ContextPlan,
    ContextStatistics,
    VocabularyMap,
    context_plan,
    context_prune,
    context_statistics,
    domain_windows,
    neuron_mask,
    normalised_l1,
    shrink_vocabulary,
)
from .quantize import quantize_int8, serialized_bytes
from .wanda import (
    magnitude_prune,
    prunable_parameters,
    sparsity_mask,
    sparsity_report,
    wanda_prune,
    wanda_scores,
)

# Figures
from .plots import (
    adjacent_similarity,
    angular_distance_heatmap,
    bi_profile,
    book_style,
    removal_curves,
    similarity_heatmap,
    speedup_plot,
)

# The book: claims of the text checked against outputs
from .claims import claim

# Teaching: the student version of the exercises
from .course import student_version

__version__ = "0.1.0"
