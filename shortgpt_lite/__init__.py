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
from .models import BUNDLED_MODELS, cache_dir, load_model, pick_device, quiet_transformers

# Core: layers, Block Influence, importance metrics, removal
from .hooks import (
    LayerStatistics,
    angular_distance,
    angular_distance_per_token,
    block_influence,
    block_influence_per_token,
    layer_similarity,
    layer_statistics,
    relative_magnitude_per_token,
)
from .importance import METRICS, layer_importance, layers_to_remove, skip_layer
from .inputs import input_device, iter_batches
from .layers import decoder_layers
from .records import pruning_records
from .removal import remove_layers

# After removal: healing, and ShortGPT-gen's generation mode
from .healing import heal, healing_record
from .generation import shortgpt_gen

# Models larger than memory: streamed scoring, pruning on disk, conformance of the result
from .checkpoint import prune_checkpoint
from .conformance import check_model
from .stream import streamed_layer_statistics, streamed_wanda

# Reference runs: stored experiments and paired comparisons
from .experiments import (
    EXPERIMENTS,
    budget_variant,
    combining_variant,
    context_plans,
    paired_difference,
    paired_speedups,
    perplexity_ratio,
    reference,
    removal_curve,
    wanda_variant,
)
from .curves import (
    accuracy_drop,
    accuracy_table,
    area_under_curve,
    compare_accuracy,
    compare_healed,
    compare_orderings,
    compare_variants,
    curve_table,
    generation_table,
    healing_accuracy,
    healing_curve,
    rank_table,
    speed_table,
    variant_table,
)

# Evaluation and cost
from .costs import (
    cost,
    param_breakdown,
    param_counts,
    prefill_and_decode,
    serialized_bytes,
    speed_runs,
    summarise_speeds,
)
from .evaluate import (
    DEFAULT_SUITE,
    GENERATION_PROMPTS,
    binomial_ci,
    bootstrap_interval,
    decoded_accuracy,
    evaluate_choices,
    evaluate_suite,
    generation_samples,
    loglikelihoods,
    perplexity,
    score_items,
    text_perplexity,
)

# Baselines: Wanda, magnitude, context pruning, comparison
from .comparison import DEFAULT_CORPORA, METHODS, compare, prune_to_budget
from .heads import head_importance, remove_heads
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
    random_plan,
    shrink_vocabulary,
)
from .quantize import cpu_fp32_copy, int8_weights, quantize_int8, quantize_weights_int8
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
    accuracy_dots,
    adjacent_similarity,
    angular_distance_heatmap,
    bi_profile,
    book_style,
    healing_curves,
    pareto_plot,
    removal_curves,
    removal_overview,
    similarity_heatmap,
    speedup_plot,
)

# The book: claims of the text checked against outputs
from .claims import claim

# Teaching: the student version of the exercises, and grading its submissions
from .course import library_calls, student_version
from .grading import grade

__version__ = "0.1.0"

__all__ = [
    # data and models
    "BENCHMARKS", "BUNDLED_MODELS", "CORPORA", "Item", "cache_dir", "corpus_documents",
    "load_benchmark", "load_model", "load_text", "pick_device", "quiet_transformers",
    "token_windows",
    # Block Influence and the other layer statistics
    "LayerStatistics", "angular_distance", "angular_distance_per_token", "block_influence",
    "block_influence_per_token", "layer_similarity", "layer_statistics",
    "relative_magnitude_per_token",
    # importance, plans and removal
    "METRICS", "decoder_layers", "input_device", "iter_batches", "layer_importance",
    "layers_to_remove", "pruning_records", "removal_curve", "remove_layers", "skip_layer",
    # healing after removal, ShortGPT-gen
    "heal", "healing_record", "shortgpt_gen",
    # models larger than memory
    "check_model", "prune_checkpoint", "streamed_layer_statistics", "streamed_wanda",
    # reference runs
    "EXPERIMENTS", "accuracy_drop", "accuracy_table", "area_under_curve", "compare_accuracy",
    "budget_variant", "combining_variant", "context_plans", "paired_speedups",
    "compare_healed", "compare_orderings", "compare_variants", "curve_table",
    "generation_table", "healing_accuracy", "healing_curve", "paired_difference",
    "perplexity_ratio", "rank_table", "reference", "speed_table", "variant_table", "wanda_variant",
    # evaluation and cost
    "DEFAULT_SUITE", "GENERATION_PROMPTS", "binomial_ci", "bootstrap_interval", "cost",
    "decoded_accuracy",
    "evaluate_choices", "evaluate_suite", "generation_samples", "loglikelihoods",
    "param_breakdown", "param_counts", "perplexity", "prefill_and_decode", "score_items", "serialized_bytes",
    "speed_runs", "summarise_speeds", "text_perplexity",
    # baselines and the comparison
    "DEFAULT_CORPORA", "DOMAINS", "METHODS", "ContextPlan", "ContextStatistics",
    "VocabularyMap", "compare", "context_plan", "context_prune", "context_statistics",
    "cpu_fp32_copy", "domain_windows", "head_importance", "int8_weights", "magnitude_prune",
    "neuron_mask", "normalised_l1",
    "prunable_parameters", "prune_to_budget", "quantize_int8", "quantize_weights_int8",
    "random_plan", "remove_heads", "shrink_vocabulary", "sparsity_mask", "sparsity_report", "wanda_prune",
    "wanda_scores",
    # figures, the book's claims, teaching
    "accuracy_dots", "adjacent_similarity", "angular_distance_heatmap", "bi_profile", "book_style", "claim",
    "healing_curves",
    "pareto_plot",
    "removal_curves", "removal_overview", "similarity_heatmap", "speedup_plot", "student_version",
    "grade", "library_calls",
    "__version__",
]
